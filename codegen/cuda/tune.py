"""`kiln tune` for a cuda artifact: re-measure its kernel choices on the GPU it runs on and store
the winners in the artifact (tuning.json), then rebuild its kernel binaries with them.

What is searched, on the shapes the artifact's plan launches:

    paged_attention   AttentionConfig knobs, per bucket: "prefill" (one sequence of
                      PREFILL_TOKENS tokens) and "decode" (the sum over DECODE_BATCHES
                      sequences of DECODE_CONTEXT tokens; tile size, warps, stages, split-KV parts)
    quantized_linear  per packed weight, the GEMV's knobs at one row (tune_quant.py)
    linear            per weight shape (K x N) and bucket of M (kiln.kernels.triton_kernels.linear
                      BUCKETS): cuBLAS through torch, the Triton GEMM with its best config, or
                      in buckets of at most gemv.MAX_M rows the Triton GEMV with its best config

Every candidate is timed as the runtime runs it: calls captured in a CUDA graph (no launch
overhead, as decode steps replay), round-robin over enough copies of the weights or caches that
each call reads memory, not the 50 MB L2. A Triton choice must beat cuBLAS by MARGIN.

    tuning.json {"format": 1, "target": "cuda", "gpu", "triton", "torch", "search_s",
                 "kernels": {"paged_attention": {"prefill": {"config", "default_us", "tuned_us",
                                                             "tried"}, "decode": {...}},
                             "linear": {"KxN": [{"max_m", "provider", "config"?}, ...]},
                             "quantized_linear": {...} (tune_quant.py)},
                 "linear_times": {"KxN": {"M": {"torch_us", "triton_us", "gemv_us"?}}}}
"""

from __future__ import annotations

import itertools
import json
import statistics
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
import triton
from tqdm.auto import tqdm

from kiln.codegen.artifact_writer import replace_files
from kiln.codegen.cuda.tune_quant import quant_workload, table_rows, tune_quant
from kiln.kernels.triton_kernels import attention, gemv, linear
from kiln.runtime.artifact import TUNING, Artifact
from kiln.runtime.plan import ExecutionPlan, load_plan

FORMAT = 1
PREFILL_TOKENS = 2048
DECODE_BATCHES = (1, 32, 256)
DECODE_CONTEXT = 1024
COLD_BYTES = 256 << 20
"""Bytes each timed call rotates over (five times the H200's L2)."""
MARGIN = 0.97
"""A Triton GEMM or GEMV is chosen where it takes less than this fraction of cuBLAS's time."""

PREFILL_SPACE = {"block_m": (64, 128), "block_n": (32, 64, 128), "num_warps": (4, 8), "num_stages": (2, 3, 4)}
DECODE_SPACE = {"block_n": (32, 64, 128), "num_warps": (2, 4), "num_stages": (2, 3), "num_splits": (8, 16, 32)}
SMALL_GEMMS = [linear.GemmConfig(16, n, k, 8, 4, s) for n in (16, 32, 64) for k in (128, 256) for s in (3, 4, 5)]
LARGE_GEMMS = [linear.GemmConfig(m, n, 64, 8, w, s) for m, n in ((64, 128), (128, 128), (128, 256))
               for w in (4, 8) for s in (3, 4)]


def graph_time_us(calls: list[Callable[[], None]], min_calls: int = 24, reps: int = 7) -> float:
    """Median µs per call of `calls` replayed from one CUDA graph (round-robin, at least
    `min_calls` calls per replay)."""
    for c in calls:
        c()
    torch.cuda.synchronize()
    n = max(min_calls, len(calls))
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for i in range(n):
            calls[i % len(calls)]()
    g.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(reps):
        start.record()
        g.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / n)
    return statistics.median(times)


@dataclass(frozen=True)
class LinearShape:
    k: int
    n: int
    bias: bool
    layout: str
    dtype: torch.dtype
    gate: tuple[tuple[str, Any], ...] = ()
    """A gated_linear's attributes (its input is [gate | up], 2K wide), () for a linear."""

    @property
    def key(self) -> str:
        return f"{self.k}x{self.n}"


@dataclass(frozen=True)
class AttentionShape:
    hq: int
    hkv: int
    d: int
    dv: int
    dtype: torch.dtype
    attrs: tuple[tuple[str, Any], ...]
    sinks: bool


def workload(plan: ExecutionPlan) -> tuple[Counter[LinearShape], Counter[AttentionShape]]:
    """The linear weight shapes and attention shapes the plan launches, with their call counts."""
    from kiln.ir.types import torch_dtype

    linears: Counter[LinearShape] = Counter()
    attns: Counter[AttentionShape] = Counter()
    buf = plan.buffers
    for s in plan.steps:
        if s.kernel in ("triton:linear", "triton:gated_linear"):  # gated_linear: a linear of its weight
            w = buf[s.inputs[1]]
            layout = s.attrs.get("weight_layout", "out_in")
            if w.kind != "param" or len(w.shape) != 2:
                continue
            n, k = w.shape if layout == "out_in" else w.shape[::-1]
            gate = tuple(sorted(s.attrs.items())) if s.kernel == "triton:gated_linear" else ()
            linears[LinearShape(k, n, len(s.inputs) > 2, layout, torch_dtype(w.dtype), gate)] += 1
        elif s.kernel == "triton:paged_attention":
            q, kc, vc = (buf[i] for i in s.inputs[:3])
            attrs = {**s.attrs, **{k: v for k, v in s.dim_attrs.items() if isinstance(v, int)}}
            attns[AttentionShape(q.shape[1], kc.shape[2], kc.shape[3], vc.shape[3], torch_dtype(kc.dtype),
                                 tuple(sorted(attrs.items())), len(s.inputs) > 6)] += 1
    return linears, attns


# -- linear -------------------------------------------------------------------------------------


def linear_call(shape: LinearShape, m: int, choice: linear.LinearChoice) -> Callable[[torch.Tensor], None]:
    """call(w): one call of m rows through the launcher that runs `choice` on weight w
    (gated_linear's for a gated shape, so a fused GEMV is timed against the gated kernel plus a
    GEMM), on inputs and outputs made once."""
    dev = torch.device("cuda")
    b = [torch.randn(shape.n, device=dev, dtype=shape.dtype)] if shape.bias else []
    x = torch.randn(m, shape.k * (2 if shape.gate else 1), device=dev, dtype=shape.dtype)
    outs = [torch.empty(m, shape.n, device=dev, dtype=shape.dtype)]
    attrs = dict(shape.gate) if shape.gate else {"weight_layout": shape.layout}
    if shape.gate:
        outs.append(torch.empty(m, shape.k, device=dev, dtype=shape.dtype))
    launch = linear.make_launchers({shape.key: [choice.to_json()]})["gated_linear" if shape.gate else "linear"]
    return lambda w: launch(outs, [x, w, *b], attrs)


def weight(shape: LinearShape, scale: float = 0.02) -> torch.Tensor:
    """A random weight of the shape in its layout, on the GPU (scale 0: zeros)."""
    wshape = (shape.n, shape.k) if shape.layout == "out_in" else (shape.k, shape.n)
    return torch.randn(wshape, device="cuda", dtype=shape.dtype) * scale


def _linear_calls(shape: LinearShape, m: int, choice: linear.LinearChoice) -> list[Callable[[], None]]:
    """`linear_call`s, each on its own copy of the weight (together past the L2)."""
    copies = max(1, min(16, COLD_BYTES // (shape.k * shape.n * shape.dtype.itemsize)))
    call = linear_call(shape, m, choice)
    return [lambda w=w: call(w) for w in [weight(shape) for _ in range(copies)]]


def _candidates(shape: LinearShape, bound: int) -> list[tuple[str, Any]]:
    """(provider, config) pairs timed on a bucket: the GEMV's (a few rows, out_in weights) first,
    then the GEMM's."""
    out: list[tuple[str, Any]] = []
    if bound <= gemv.MAX_M and shape.layout == "out_in":
        out += [("gemv", c) for n, k, w in itertools.product(*gemv.KNOBS.values())
                if (c := gemv.GemvConfig(bound, n, k, w)).fits()]
    return out + [("triton", c) for c in (SMALL_GEMMS if bound <= 64 else LARGE_GEMMS)]


def tune_linear(shape: LinearShape, max_m: int, deadline: float) -> tuple[list[dict], dict[str, dict]]:
    """The choices of one weight shape per bucket (merged where neighbours agree) and the times
    (each provider's best)."""
    times: dict[str, dict] = {}
    choices: list[linear.LinearChoice] = []
    for bound in [b for b in linear.BUCKETS if b <= max_m]:
        torch_us = graph_time_us(_linear_calls(shape, bound, linear.LinearChoice(bound, "torch")))
        best: dict[str, tuple[float, Any]] = {}
        for provider, c in _candidates(shape, bound):
            if time.monotonic() > deadline:
                break
            try:
                us = graph_time_us(_linear_calls(shape, bound, linear.LinearChoice(bound, provider, c)))
            except (RuntimeError, triton.runtime.errors.OutOfResources):
                continue  # a config this GPU cannot run (shared memory)
            if us < best.get(provider, (float("inf"),))[0]:
                best[provider] = (us, c)
        times[str(bound)] = {"torch_us": torch_us, "triton_us": best.get("triton", (None,))[0],
                             **({"gemv_us": best["gemv"][0]} if "gemv" in best else {})}
        fastest = min(best, key=lambda p: best[p][0], default=None)
        pick = (linear.LinearChoice(bound, fastest, best[fastest][1])
                if fastest is not None and best[fastest][0] < MARGIN * torch_us else linear.LinearChoice(bound, "torch"))
        if choices and (choices[-1].provider, choices[-1].config) == (pick.provider, pick.config):
            choices[-1] = replace(choices[-1], max_m=bound)
        else:
            choices.append(pick)
    return [c.to_json() for c in choices], times


# -- attention ----------------------------------------------------------------------------------


def attention_calls(shape: AttentionShape, seqs: list[int], q_lens: list[int]) -> Callable[
        [Callable], list[Callable[[], None]]]:
    dev = torch.device("cuda")
    bs = 16
    blocks = [-(-c // bs) for c in seqs]
    per_copy = sum(blocks)
    copies = max(1, min(8, COLD_BYTES // (per_copy * bs * shape.hkv * (shape.d + shape.dv) * shape.dtype.itemsize)))
    nb = copies * per_copy + 1
    kc = torch.randn(nb, bs, shape.hkv, shape.d, device=dev, dtype=shape.dtype)
    vc = torch.randn(nb, bs, shape.hkv, shape.dv, device=dev, dtype=shape.dtype)
    mb = max(max(blocks), 4096 // bs)  # a table row as wide as a 4096-token model's
    perm = torch.randperm(nb - 1) + 1
    tables = []
    for c in range(copies):
        t = torch.zeros(len(seqs), mb, dtype=torch.int32)
        used = perm[c * per_copy:(c + 1) * per_copy].int()
        offs = [0, *itertools.accumulate(blocks)]
        for i in range(len(seqs)):
            t[i, : blocks[i]] = used[offs[i]:offs[i + 1]]
        tables.append(t.to(dev))
    q = torch.randn(sum(q_lens), shape.hq, shape.d, device=dev, dtype=shape.dtype)
    out = torch.empty(sum(q_lens), shape.hq, shape.dv, device=dev, dtype=shape.dtype)
    lens = torch.tensor(seqs, device=dev, dtype=torch.int32)
    cu = torch.tensor([0, *itertools.accumulate(q_lens)], device=dev, dtype=torch.int32)
    rest = [torch.zeros(shape.hq, device=dev, dtype=shape.dtype)] if shape.sinks else []
    attrs = dict(shape.attrs)

    def calls(launch: Callable) -> list[Callable[[], None]]:
        return [lambda t=t: launch([out], [q, kc, vc, t, lens, cu, *rest], attrs) for t in tables]

    return calls


def _configs(space: dict[str, tuple]) -> Iterator[dict[str, Any]]:
    for values in itertools.product(*space.values()):
        yield dict(zip(space, values, strict=True))


def _search(cases: list[Callable], space: dict[str, tuple], deadline: float) -> dict[str, Any]:
    def cost(cfg: attention.AttentionConfig) -> float:
        launch = attention.make_launcher(cfg)
        return sum(graph_time_us(calls(launch)) for calls in cases)

    default_us = cost(attention.DEFAULT_CONFIG)
    best, best_us, tried = {}, default_us, 1
    for values in _configs(space):
        if time.monotonic() > deadline:
            break
        try:
            us = cost(attention.config_from(values))
        except (RuntimeError, triton.runtime.errors.OutOfResources):
            continue
        tried += 1
        if us < best_us:
            best, best_us = values, us
    essential = {k: v for k, v in best.items() if getattr(attention.DEFAULT_CONFIG, k) != v}
    return {"config": essential, "default_us": default_us, "tuned_us": best_us, "tried": tried}


def tune_attention(shape: AttentionShape, deadline_prefill: float, deadline_decode: float) -> dict[str, Any]:
    prefill = [attention_calls(shape, [PREFILL_TOKENS], [PREFILL_TOKENS])]
    decode = [attention_calls(shape, [DECODE_CONTEXT] * b, [1] * b) for b in DECODE_BATCHES]
    return {"prefill": _search(prefill, PREFILL_SPACE, deadline_prefill),
            "decode": _search(decode, DECODE_SPACE, deadline_decode)}


# -- the artifact -------------------------------------------------------------------------------


def tune(artifact: str | Path, budget: float | None = None, max_tokens: int = PREFILL_TOKENS,
         progress: bool | None = None) -> dict[str, Any]:
    """Search, write tuning.json into the artifact and rebuild its kernels; returns what was
    done, with the printable before/after table under "table"."""
    from kiln.codegen.cuda.build import build_kernels
    from kiln.runtime.kernel_binaries import environment

    root = Path(artifact).resolve()
    plan = load_plan(Artifact(root, "cuda"))
    linears, attns = workload(plan)
    quants = quant_workload(plan)
    budget = 240.0 if budget is None else budget
    started = time.monotonic()
    # one paged_attention config serves every attention call of the model: tuned on its most called shape
    jobs = [("attention", max(attns, key=attns.get))] if attns else []
    jobs += [("linear", s) for s in sorted(linears, key=lambda s: -linears[s])]
    jobs += [("quant", s) for s in sorted(quants, key=lambda s: -quants[s])]
    share = budget / max(1, len(jobs))
    kernels: dict[str, Any] = {}
    linear_times: dict[str, Any] = {}
    for i, (kind, shape) in enumerate(tqdm(jobs, desc="kiln tune", unit="shape", disable=progress is False or None)):
        deadline = started + share * (i + 1)
        if kind == "attention":  # its share split between the two buckets
            half = started + share * i + share / 2
            kernels["paged_attention"] = tune_attention(shape, half, deadline)
        elif kind == "quant":
            kernels.setdefault("quantized_linear", {})[shape.key] = tune_quant(shape, deadline)
        else:
            choices, times = tune_linear(shape, max_tokens, deadline)
            kernels.setdefault("linear", {})[shape.key] = choices
            linear_times[shape.key] = times
    env = environment(torch.device("cuda"))
    table = {"format": FORMAT, "target": "cuda", **{k: env[k] for k in ("gpu", "arch", "cuda", "triton", "torch")
                                                     if k in env},
             "search_s": round(time.monotonic() - started, 1), "kernels": kernels, "linear_times": linear_times}
    replace_files(root, {TUNING: json.dumps(table, indent=1, sort_keys=True).encode()}, (TUNING,))
    built = build_kernels(root)
    return {"target": "cuda", "tuning": TUNING, "search_s": table["search_s"], "kernels": built,
            "table": format_table(table)}


def format_table(table: dict[str, Any]) -> str:
    """Per tuned kernel and bucket: the default and tuned µs per call and the choice."""
    rows = [f"{'kernel':<34}{'bucket':>10}{'default us':>12}{'tuned us':>12}{'speedup':>9}  choice"]
    for bucket, e in table["kernels"].get("paged_attention", {}).items():
        rows.append(f"{'paged_attention':<34}{bucket:>10}{e['default_us']:>12.1f}{e['tuned_us']:>12.1f}"
                    f"{e['default_us'] / e['tuned_us']:>8.2f}x  {e['config'] or 'default'}")
    for key, times in table.get("linear_times", {}).items():
        choices = table["kernels"]["linear"][key]
        for m, t in times.items():
            pick = next((c for c in choices if int(m) <= c["max_m"]), choices[-1])
            tuned = t[f"{pick['provider']}_us"]
            rows.append(f"{'linear ' + key:<34}{'M<=' + m:>10}{t['torch_us']:>12.1f}{tuned:>12.1f}"
                        f"{t['torch_us'] / tuned:>8.2f}x  {pick['provider']}"
                        + (f" {_short(pick['config'])}" if pick.get("config") else ""))
    rows += table_rows(table["kernels"].get("quantized_linear", {}))
    return "\n".join(rows)


def _short(config: dict[str, Any]) -> str:
    return " ".join(f"{k.replace('block_', 'b').replace('num_', '')}={v}" for k, v in config.items() if k != "group_m")


__all__ = ["AttentionShape", "LinearShape", "attention_calls", "format_table", "graph_time_us", "linear_call", "tune",
           "weight", "workload"]
