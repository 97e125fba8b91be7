"""`kiln tune` for the cpu target: search the schedule knobs of an artifact's hottest TVM kernels
on this processor, then rebuild its kernel library with the winners.

    plan.json + graph.json -> the kernels the plan calls (built as the lowering builds them)
    rank those with knobs (kiln.kernels.tvm_kernels.knobs) by elements read per token x calls
    per kernel, until its share of the budget is spent:
        candidate config -> TVMScript -> tvm.compile (LLVM, this mcpu) -> time it on random
        inputs at each bucket's row count (tuning.BUCKETS: decode 1 row, prefill 512 rows),
        median of 5 samples, with the TVM thread pool a cpu engine serves with
        (kiln.runtime.threads: the available cores, or TVM_NUM_THREADS)
    tuning.json (configs and timings, kiln.codegen.cpu.tuning) + kernels/cpu/kernels.so and
    build.json rebuilt from it -> the artifact (replace_files: the manifest's hashes follow)

The search is a coordinate search, not a random one, so a small budget still finds the obvious
wins: the default; the configs of an earlier tune on this processor; each knob moved alone;
per bucket, the best value of every knob together; then the rest of the space in a fixed
pseudo-random order. Every candidate is compiled once and timed at both buckets; at the end the
default and the winners are timed again in turns (the median of 3), and a winner must beat the
default by 3% there to replace it.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import random
import statistics
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from kiln.codegen.cpu.tuning import BUCKETS, FORMAT
from kiln.errors import KilnError
from kiln.kernels import tvm_kernels
from kiln.kernels.tvm_kernels import Kernel
from kiln.runtime.artifact import GRAPH, PLAN, TUNING, Artifact

DEFAULT_BUDGET = 120.0
"""Seconds of search when --budget is not given."""
SAMPLES = 5
"""Timed samples per candidate and bucket (their median is its time)."""
MARGIN = 0.03
"""A config replaces the default only when it is at least this much faster (timing noise)."""
CONFIRM_ROUNDS = 3
"""Turns of timing the default against the winners after the search."""
SAMPLE_S = 2e-3
"""Each sample repeats the call until it lasts about this long."""
ROUND_BYTES = 128 << 20
"""At decode row counts the weights a timing goes round pass this (4x a 32 MiB L3)."""


def plan_kernels(art: Artifact) -> tuple[list[Kernel], dict[str, int]]:
    """The TVM kernels the artifact's plan calls, rebuilt (default schedules) from its graph the
    way the cpu lowering builds them, and how many plan steps call each."""
    from kiln.codegen.cpu import op_info
    from kiln.ir.serialize import loads

    calls: dict[str, int] = {}
    for step in art.read_json(PLAN)["steps"]:
        provider, _, name = step["kernel"].partition(":")
        if provider == "tvm":
            calls[name] = calls.get(name, 0) + 1
    kernels: dict[str, Kernel] = {}
    for node in loads(art.read_bytes(GRAPH).decode()).ops():
        if node.op == "get_result":
            continue
        k = tvm_kernels.build(op_info(node))
        if k is not None and k.name in calls:
            kernels.setdefault(k.name, k)
    missing = sorted(set(calls) - set(kernels))
    if missing:
        raise KilnError(
            f"'{art.root}': its plan calls TVM kernels that this kiln does not build ({', '.join(missing[:4])}):"
            " recompile the model with this kiln, then tune it"
        )
    return list(kernels.values()), calls


def _cost(k: Kernel) -> int:
    """Elements a call reads per token row: what ranks kernels by heat (a weight counts whole)."""
    assert k.info is not None
    return sum(
        math.prod(d for d in t.shape if isinstance(d, int)) for t in k.info.inputs if t is not None
    )


def _tensors(k: Kernel, rows: int, seed: int) -> tuple[list[list[Any]], list[torch.Tensor]]:
    """Sets of random op inputs and empty results of kernel k with `rows` for every symbolic dim:
    one set, or for a (quantized) linear at decode row counts (at most tuning.BUCKETS' decode max_rows) as
    many sets with their own weights (inputs of static shape) as pass ROUND_BYTES, which a
    timing goes round: in a model step a decode GEMV reads its weight from memory, not from the
    L3 where one weight timed alone stays (serial and parallel schedules rank differently there)."""
    assert k.info is not None
    g = torch.Generator().manual_seed(seed)

    def shape(t):
        return [rows if not isinstance(d, int) else d for d in t.shape]

    def tensor(t):
        return None if t is None else torch.randn(shape(t), generator=g).to(getattr(torch, t.dtype))

    args = [tensor(t) for t in k.info.inputs]
    static = [i for i, t in enumerate(k.info.inputs) if t is not None and all(isinstance(d, int) for d in t.shape)]
    weight_bytes = sum(args[i].nbytes for i in static)
    decode = k.info.op in ("linear", "quantized_linear") and rows <= BUCKETS["decode"]["max_rows"]
    copies = -(-ROUND_BYTES // weight_bytes) if static and decode else 1
    sets = [args] + [[tensor(t) if i in static else a for i, (t, a) in enumerate(zip(k.info.inputs, args, strict=True))]
                     for _ in range(copies - 1)]
    return sets, [torch.empty(shape(t), dtype=getattr(torch, t.dtype)) for t in k.info.outputs]


def _time_us(launch, outs, sets) -> float:
    """Median microseconds per call, the calls going round the input sets."""
    turn = itertools.cycle(sets)
    for _ in range(2):
        launch(outs, next(turn), {})
    t0 = time.perf_counter()
    launch(outs, next(turn), {})
    number = max(1, min(1000, int(SAMPLE_S / max(time.perf_counter() - t0, 1e-7))))
    samples = []
    for _ in range(SAMPLES):
        t0 = time.perf_counter()
        for _ in range(number):
            launch(outs, next(turn), {})
        samples.append((time.perf_counter() - t0) / number)
    return statistics.median(samples) * 1e6


def measure(
    k: Kernel, inputs: dict[str, tuple[list[list[Any]], list[torch.Tensor]]], compiled: dict[int, Any]
) -> dict[str, float]:
    """Time kernel k at every bucket: bucket -> µs per call; compiled alone the first time
    (`compiled`: launchers by the function's structural hash, kept for the confirming rounds)."""
    import tvm_ffi

    from kiln.codegen.cpu.build import compile_kernels
    from kiln.kernels.tvm_provider import make_launcher

    h = tvm_ffi.structural_hash(k.func)
    if h not in compiled:
        lib = compile_kernels([k])
        compiled[h] = (make_launcher(lib[k.name], k.table()), lib)
    launch = compiled[h][0]
    return {b: _time_us(launch, outs, sets) for b, (sets, outs) in inputs.items()}


def candidates(
    op: str, seed: str, earlier: list[dict], best: dict[str, dict[str, dict]]
) -> Iterator[dict]:
    """Configs to try in order (see the module docstring); `best[bucket][knob]` is filled by the
    caller with the best single-knob config seen so far."""
    space = tvm_kernels.knobs(op)
    yield {}
    yield from earlier
    for knob, values in space.items():
        for v in values:
            yield {knob: v}
    for bucket in BUCKETS:
        merged: dict = {}
        for c in best.get(bucket, {}).values():
            merged |= c
        yield merged
    keys = sorted(space)
    rest = [
        dict(zip(keys, vals, strict=True)) for vals in itertools.product(*(space[k] for k in keys))
    ]
    random.Random(seed).shuffle(rest)
    yield from rest


def tune_kernel(k: Kernel, calls: int, seconds: float, earlier: list[dict]) -> dict[str, Any]:
    """Search k's configs for about `seconds` (the default is always timed); its tuning.json entry."""
    import tvm_ffi

    assert k.info is not None
    inputs = {b: _tensors(k, spec["rows"], seed=1) for b, spec in BUCKETS.items()}
    start = time.perf_counter()
    seen: set[int] = set()
    tried: list[tuple[dict, dict[str, float]]] = []
    kernels: list[Kernel] = []
    compiled: dict[int, Any] = {}
    best: dict[str, dict[str, dict]] = {}
    for config in candidates(k.info.op, k.name, earlier, best):
        if tried and time.perf_counter() - start > seconds:
            break
        try:
            cand = tvm_kernels.build(k.info, config) if config else k
        except ValueError:  # a knob value that does not divide this shape
            continue
        h = (
            tvm_ffi.structural_hash(cand.func) if cand is not None else None
        )  # knobs that change nothing here
        if h is None or h in seen:
            continue
        seen.add(h)
        times = measure(cand, inputs, compiled)
        tried.append((config, times))
        kernels.append(cand)
        if len(config) == 1:
            knob = next(iter(config))
            for b, t in times.items():
                held = best.setdefault(b, {}).get(knob)
                if held is None or t < _time_of(tried, held, b):
                    best[b][knob] = config
    # the default and each bucket's winner timed again, in turns, so that a load that came and
    # went during the search favours none of them; a winner must beat the default by MARGIN
    finalists = sorted(
        {0} | {min(range(len(tried)), key=lambda i: tried[i][1][b]) for b in BUCKETS}
    )
    rounds: dict[int, list[dict[str, float]]] = {i: [] for i in finalists}
    for _ in range(CONFIRM_ROUNDS if len(finalists) > 1 else 0):
        for i in finalists:
            rounds[i].append(measure(kernels[i], inputs, compiled))
    final = {
        i: {b: statistics.median([r[b] for r in rs]) for b in BUCKETS} if rs else tried[i][1]
        for i, rs in rounds.items()
    }
    entry: dict[str, Any] = {"op": k.info.op, "calls": calls}
    for b in BUCKETS:
        win = min(finalists, key=lambda i: final[i][b])
        if final[win][b] > final[0][b] * (1 - MARGIN):  # within the noise: keep the default
            win = 0
        entry[b] = {
            "config": _essential(kernels[win], tried[win][0]),
            "default_us": round(final[0][b], 2),
            "tuned_us": round(final[win][b], 2),
            "tried": len(tried),
        }
    return entry


def _essential(k: Kernel, config: dict) -> dict:
    """config without the knobs that change nothing in k's function (nv of an out_in linear, a
    value equal to the default): what tuning.json and the table show."""
    import tvm_ffi

    h = tvm_ffi.structural_hash(k.func)
    for key in sorted(config):
        rest = {n: v for n, v in config.items() if n != key}
        try:
            same = tvm_ffi.structural_hash(tvm_kernels.build(k.info, rest).func) == h
        except ValueError:
            same = False
        config = rest if same else config
    return config


def _time_of(tried: list[tuple[dict, dict[str, float]]], config: dict, bucket: str) -> float:
    return next(t[bucket] for c, t in tried if c == config)


def _earlier(art: Artifact, host: dict[str, Any]) -> dict[str, dict]:
    """The kernel entries of an earlier tune of this artifact on this processor ({} otherwise)."""
    if not art.has(TUNING):
        return {}
    old = art.read_json(TUNING)
    same = old.get("format") == FORMAT and old.get("host", {}).get("mcpu") == host["mcpu"]
    return old.get("kernels", {}) if same else {}


def tune(
    artifact: str | Path,
    budget: float | None = None,
    kernels: int | None = None,
    progress: bool | None = None,
) -> dict[str, Any]:
    """Tune a cpu artifact in place for this processor (see the module docstring): `budget`
    seconds of search over the `kernels` hottest kernels with knobs (default: all). Returns what
    was done, with the printable before/after table under "table"."""
    from kiln.codegen.artifact_writer import replace_files
    from kiln.codegen.cpu.build import library_files
    from kiln.runtime.threads import configure
    from kiln.runtime.tvm_library import LIBRARY, host

    art = Artifact(artifact, target="cpu")
    here = host()
    threads = configure(None, "cpu")["tvm"]  # time kernels with the pool a cpu engine serves with
    budget = DEFAULT_BUDGET if budget is None else max(0.0, float(budget))
    if kernels is not None and kernels < 0:
        raise KilnError(f"--kernels must be 0 or more, not {kernels}")
    all_kernels, calls = plan_kernels(art)
    tunable = sorted(
        (k for k in all_kernels if tvm_kernels.knobs(k.info.op)),
        key=lambda k: (-_cost(k) * calls[k.name], k.name),
    )[:kernels]
    # smallest search spaces first: the budget they leave flows to the big ones (each kernel's
    # share is the budget left over the kernels left)
    tunable.sort(key=lambda k: math.prod(len(v) for v in tvm_kernels.knobs(k.info.op).values()))
    earlier = _earlier(art, here)
    entries: dict[str, Any] = {}
    start = time.perf_counter()
    bar = tqdm(tunable, desc="kiln tune", unit="kernel", disable=progress is False or None)
    for i, k in enumerate(bar):
        bar.set_postfix_str(k.name[:48])
        share = max(0.0, budget - (time.perf_counter() - start)) / (len(tunable) - i)
        old = earlier.get(k.name, {})
        before = [c for c in ((old.get(b) or {}).get("config") for b in BUCKETS) if c]
        entries[k.name] = tune_kernel(k, calls[k.name], share, before)
    bar.close()
    table = {
        "format": FORMAT,
        "target": "cpu",
        "host": {key: here[key] for key in ("tvm", "triple", "mcpu")} | {"cores": os.cpu_count()},
        "threads": threads,
        "buckets": BUCKETS,
        "budget_s": budget,
        "search_s": round(time.perf_counter() - start, 1),
        "kernels": entries,
    }
    files = library_files(all_kernels, table)
    files[TUNING] = json.dumps(table, indent=1, sort_keys=True).encode()
    replace_files(art.root, files, prefixes=(str(Path(LIBRARY).parent), TUNING))
    return {
        "target": "cpu",
        "mcpu": here["mcpu"],
        "tuned": len(entries),
        "kernels": len(all_kernels),
        "search_s": table["search_s"],
        "table": format_table(table),
    }


def format_table(table: dict[str, Any]) -> str:
    """The before/after table: per tuned kernel and bucket, the default and tuned µs per call;
    then per bucket the sum over the plan's calls (one step of the model)."""
    rows = [("kernel", "bucket", "calls", "default µs", "tuned µs", "speedup", "config")]
    total = {b: [0.0, 0.0] for b in BUCKETS}
    for name, e in table["kernels"].items():
        for b in BUCKETS:
            r = e[b]
            rows.append(
                (
                    name,
                    f"{b} (T={BUCKETS[b]['rows']})",
                    str(e["calls"]),
                    f"{r['default_us']:.1f}",
                    f"{r['tuned_us']:.1f}",
                    f"{r['default_us'] / max(r['tuned_us'], 1e-9):.2f}x",
                    ",".join(f"{k}={v}" for k, v in sorted(r["config"].items())) or "default",
                )
            )
            total[b][0] += e["calls"] * r["default_us"]
            total[b][1] += e["calls"] * r["tuned_us"]
    for b, (d, t) in total.items():
        rows.append(
            (
                "all tuned calls of a step",
                b,
                "",
                f"{d:.1f}",
                f"{t:.1f}",
                f"{d / max(t, 1e-9):.2f}x",
                "",
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = [
        "  ".join(
            c.ljust(w) if i in (0, 1, 6) else c.rjust(w)
            for i, (c, w) in enumerate(zip(r, widths, strict=True))
        )
        for r in rows
    ]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(line.rstrip() for line in lines)
