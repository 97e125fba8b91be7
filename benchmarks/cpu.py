"""The cpu target on this machine's CPU, with its peers measured in the same run (float32).

    python benchmarks/cpu.py [--models demo,llama-100m] [--tune-budget SECONDS] [--out benchmarks/results/cpu.json]

Per model (the bundled demo model, and a ~100M-parameter Llama shape with random weights
synthesized here by kiln.models.shapes): batch-1 and batch-8 decode tok/s (64-token prompts;
(B * (N - 1)) tokens over the median time of an N-token generation less the median time of a
1-token one, --reps of each) and 512-token prefill tok/s (one 512-token prompt, one token out; 223 tokens on the demo
model, whose context is 256), for
- kiln's `cpu` target (TVM kernels) and `reference` target, through `LLM.generate`; the cpu
  artifact tuned first as a user would (`kiln tune ARTIFACT --budget SECONDS`, its Python API
  kiln.codegen.cpu.tune.tune, in a process of its own; --tune-budget 0 measures it untuned),
  the tuner's before/after table printed and kept in the JSON (the row's "tune");
- transformers eager `generate`;
- transformers with a static cache and `torch.compile` of the forward;
- ONNX Runtime on the transformers model exported with its KV cache as inputs and outputs
  (torch.onnx.export, dynamo), driven by a greedy decode loop; a failed export is reported.
Greedy decoding, ignore EOS. Prints a table and writes JSON. Needs the `bench` extra
(`pip install -e ".[bench]"`: onnx, onnxruntime, onnxscript).

Also (benchmarks/cpu_floors.py): the machine's measured memory bandwidth and fp32 peak; per
kernel of kiln's cpu target, its time in a batch-1 decode step and a 512-token prefill beside
its floor; the cpu artifact's load time and resident memory. Every engine runs in a fresh
process of its own, on --threads (default: the cores this process may use). Others may load
the machine: each engine's row records the load average and the share of the cores that other
processes used while it ran.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import platform
import statistics
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import torch

import kiln
from kiln import LLM, SamplingParams
from kiln.errors import KilnError
from kiln.models.shapes import synthesize_checkpoint
from kiln.runtime.threads import available_cores

sys.path.insert(0, str(Path(__file__).parent))
from cpu_floors import format_floors, kernel_floors, load_stats, machine  # noqa: E402

PROMPT, DECODE = 64, 33
TUNE_BUDGET = 240.0
"""Seconds of `kiln tune` search per cpu artifact: the whole run (two models) stays under ~20
minutes on a 2-core machine (llama-100m's tune took 249 s with its rebuild, the rest of its kiln
cpu row 50 s)."""
PREFILL = 512
"""Prefill prompt length: 512, or what fits the model's context (the demo model's is 256)."""


def _ids(batch: int, length: int, vocab: int, seed: int) -> torch.Tensor:
    return torch.randint(10, vocab, (batch, length), generator=torch.Generator().manual_seed(seed))


def _rates(gen, vocab: int, reps: int) -> dict:
    """decode tok/s at batch 1 and 8 and prefill tok/s of one engine: gen(ids [B, L], n) -> seconds."""
    out: dict = {"prefill_tokens": PREFILL}
    gen(_ids(1, 8, vocab, 99), 2)  # warm
    for b in (1, 8):
        # (DECODE - 1) decode steps: the median time of DECODE tokens less that of 1 (prompt and
        # first token), each over reps calls; one slow 1-token call would otherwise shrink a
        # single difference and inflate its rate
        ones, alls = [], []
        for r in range(reps):
            ids = _ids(b, PROMPT, vocab, r)
            ones.append(gen(ids, 1))
            alls.append(gen(ids, DECODE))
        out[f"decode_b{b}_tok_s"] = b * (DECODE - 1) / (statistics.median(alls) - statistics.median(ones))
    out["prefill_tok_s"] = statistics.median(PREFILL / gen(_ids(1, PREFILL, vocab, 100 + r), 1) for r in range(reps))
    return out


def prepare_kiln(ckpt: Path, target: str, work: Path, threads: int, tune_budget: float,
                 quantize: str | None = None) -> dict:
    """Compile the checkpoint for `target` (its linear layers quantized by `quantize`: int8 |
    int4 | fp8, or not) into work/art-<target>[-<quantize>] and, on the cpu target with a
    budget, tune it as `kiln tune` does (on `threads` TVM threads, the pool the engine serves
    with): {"artifact": path} plus "tune" (what the tuner returned, its table, and "by_kernel":
    tuning.json's entries) or "error"."""
    try:
        art = kiln.compile(ckpt, work / "-".join(["art", target, *([quantize] if quantize else [])]), target=target,
                           overwrite=True, quantize=quantize)
    except KilnError as e:
        return {"error": str(e)}
    out: dict = {"artifact": str(art)}
    if target == "cpu" and tune_budget > 0:
        from kiln.codegen.cpu.tune import tune
        from kiln.runtime.artifact import TUNING, Artifact
        from kiln.runtime.threads import configure

        configure(threads, "cpu")
        t = time.perf_counter()
        done = tune(art, budget=tune_budget, progress=False)
        done["wall_s"] = time.perf_counter() - t
        done["by_kernel"] = Artifact(art, target="cpu").read_json(TUNING)["kernels"]  # configs, µs before/after
        out["tune"] = done
    return out


def kiln_engine(art: Path, target: str, vocab: int, reps: int, threads: int, limits: dict) -> dict:
    llm = LLM(art, max_num_seqs=8, max_num_batched_tokens=1024, enable_prefix_caching=False, threads=threads)

    def gen(ids: torch.Tensor, n: int) -> float:
        t = time.perf_counter()
        llm.generate([{"prompt_token_ids": row} for row in ids.tolist()],
                     SamplingParams(temperature=0, max_tokens=n, ignore_eos=True), use_tqdm=False)
        return time.perf_counter() - t

    res = _rates(gen, vocab, reps)
    res["threads"] = llm.engine.threads
    if target == "cpu":
        limits.update(machine(limits))
        res["kernels"] = kernel_floors(art, limits, threads)
        res["kernels"]["limits"] = dict(limits)
        res["load"] = load_stats(art)
    torch.set_num_threads(threads)  # the engine gave torch one thread beside TVM's pool
    return res


def hf_engine(ckpt: Path, vocab: int, reps: int, compiled: bool) -> dict:
    from transformers import AutoModelForCausalLM, StaticCache

    model = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32).eval()
    caches: dict[int, StaticCache] = {}
    if compiled:
        # One static cache per batch size, of one length, reused: its shapes never change, so
        # the compiled forward recompiles only for new input lengths (a fresh cache per
        # generate call sized to the request recompiled past dynamo's limit).
        torch._dynamo.config.recompile_limit = 64
        model.forward = torch.compile(model.forward, fullgraph=True)

    def gen(ids: torch.Tensor, n: int) -> float:
        kw = {}
        if compiled:
            if ids.shape[0] not in caches:
                caches[ids.shape[0]] = StaticCache(config=model.config, max_cache_len=PREFILL + DECODE + 8)
            kw["past_key_values"] = caches[ids.shape[0]]
            kw["past_key_values"].reset()
        t = time.perf_counter()
        with torch.no_grad():
            model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                           do_sample=False, pad_token_id=0, **kw)
        return time.perf_counter() - t

    t = time.perf_counter()
    if compiled:  # compile every shape the measurement uses before timing
        for b, length in ((1, 8), (1, PROMPT), (8, PROMPT), (1, PREFILL)):
            for n in (1, 3):  # a 1-token generate passes the forward other arguments
                gen(_ids(b, length, vocab, 98), n)
    res = _rates(gen, vocab, reps)
    if compiled:
        res["warmup_s"] = time.perf_counter() - t
    return res


def ort_engine(ckpt: Path, work: Path, vocab: int, reps: int) -> dict:
    """ONNX Runtime on the exported model; decode = one session run per token with the cache."""
    import onnxruntime as ort
    from transformers import AutoModelForCausalLM, DynamicCache

    model = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32).eval()
    cfg = model.config
    layers, hkv = cfg.num_hidden_layers, cfg.num_key_value_heads
    d = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads

    class Step(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.m = model

        def forward(self, input_ids, position_ids, past):
            cache = DynamicCache()
            for i in range(layers):
                cache.update(past[2 * i], past[2 * i + 1], i)
            out = self.m(input_ids=input_ids, position_ids=position_ids, past_key_values=cache, use_cache=True)
            return out.logits[:, -1], torch.stack([t for layer in cache.layers for t in (layer.keys, layer.values)])

    path = work / "step.onnx"
    example = (torch.zeros(2, 3, dtype=torch.long), torch.arange(5, 8).repeat(2, 1), torch.zeros(2 * layers, 2, hkv, 5, d))
    dims = {"B": torch.export.Dim("B", min=1, max=64), "T": torch.export.Dim("T", min=1, max=4096),
            "P": torch.export.Dim("P", min=1, max=4096)}
    try:
        torch.onnx.export(Step(), example, path, dynamo=True, input_names=["input_ids", "position_ids", "past"],
                          dynamic_shapes={"input_ids": {0: dims["B"], 1: dims["T"]},
                                          "position_ids": {0: dims["B"], 1: dims["T"]},
                                          "past": {1: dims["B"], 3: dims["P"]}})
    except Exception as e:  # noqa: BLE001 - any exporter failure is a result to report
        return {"error": f"export failed: {type(e).__name__}: {str(e).splitlines()[0][:300]}"}
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = torch.get_num_threads()
    sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])

    def gen(ids: torch.Tensor, n: int) -> float:
        b, length = ids.shape
        t = time.perf_counter()
        # The prompt with a one-position dummy cache (the export needs P >= 1): position 0 is a
        # zero key/value the prompt attends to, a small cost measured with the rest.
        past = np.zeros((2 * layers, b, hkv, 1, d), dtype=np.float32)
        tok, pos = ids.numpy(), np.arange(1, length + 1)[None].repeat(b, 0)
        for _ in range(n):
            logits, past = sess.run(None, {"input_ids": tok, "position_ids": pos, "past": past})
            tok = logits.argmax(-1)[:, None]
            pos = pos[:, -1:] + 1
        return time.perf_counter() - t

    return _rates(gen, vocab, reps)


ENGINES = ("kiln cpu", "kiln cpu int8", "kiln cpu int4", "kiln reference", "transformers eager", "torch.compile",
           "onnxruntime")
"""Engines; "kiln TARGET [QUANTIZE]" compiles for TARGET with `--quantize QUANTIZE`."""
DEFAULT_ENGINES = tuple(e for e in ENGINES if e.count(" ") < 2 or not e.startswith("kiln "))
"""What a run measures unless --engines names others (the quantized cpu rows on request: each
adds a compile and a tune)."""


def _cpu_busy() -> tuple[float, float]:
    """(seconds all cores were busy, seconds this process and its children ran) so far."""
    ticks = os.sysconf("SC_CLK_TCK")
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    busy = (sum(fields) - fields[3] - fields[4]) / ticks  # all but idle and iowait
    t = os.times()
    return busy, t.user + t.system + t.children_user + t.children_system


def _in_fresh_process(fn, *args):
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(fn, *args).result()


def run_engine(engine: str, ckpt: Path, work: Path, vocab: int, reps: int, threads: int, limits: dict,
               tune_budget: float) -> dict:
    """One engine's row (or its error), measured in a fresh process of its own (no thread pool
    or allocator state left by another engine: TVM's workers spin after their work, and two
    engines in one process were measured 2-4x apart), with the machine's load while it ran: the
    1-minute load average at its end and the share of all cores that other processes used. A
    kiln engine's artifact is compiled (and tuned) in a process before that."""
    busy0, ours0 = _cpu_busy()
    t = time.perf_counter()
    try:
        if engine.startswith("kiln "):
            target, _, quantize = engine.removeprefix("kiln ").partition(" ")
            res = _in_fresh_process(prepare_kiln, ckpt, target, work, threads, tune_budget, quantize or None)
            if "artifact" in res:
                res |= _in_fresh_process(_run_engine, engine, Path(res.pop("artifact")), vocab, reps, threads,
                                         limits, PREFILL)
        else:
            res = _in_fresh_process(_run_engine, engine, ckpt, vocab, reps, threads, limits, PREFILL, work)
    except Exception as e:  # noqa: BLE001 - a peer that fails is a result to report, not the end of the run
        res = {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"}
    busy1, ours1 = _cpu_busy()
    wall = time.perf_counter() - t
    res["machine_load"] = {"loadavg_1m": os.getloadavg()[0], "wall_s": wall,
                           "others_core_share": max(busy1 - busy0 - (ours1 - ours0), 0) / (wall * (os.cpu_count() or 1))}
    return res


def _run_engine(engine: str, source: Path, vocab: int, reps: int, threads: int, limits: dict, prefill: int,
                work: Path | None = None) -> dict:
    """Measure one engine on `source`: a kiln artifact, or the checkpoint (ONNX Runtime exports
    into `work`)."""
    global PREFILL
    PREFILL = prefill
    torch.set_num_threads(threads)
    if engine.startswith("kiln "):
        return kiln_engine(source, engine.removeprefix("kiln ").partition(" ")[0], vocab, reps, threads, limits)
    if engine == "onnxruntime":
        return ort_engine(source, work, vocab, reps)
    if engine in ("transformers eager", "torch.compile"):
        return hf_engine(source, vocab, reps, compiled=engine == "torch.compile")
    raise SystemExit(f"unknown engine '{engine}'; known: {', '.join(ENGINES)}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="demo,llama-100m")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=available_cores())
    ap.add_argument("--engines", default=",".join(DEFAULT_ENGINES), help=f"known: {', '.join(ENGINES)}")
    ap.add_argument("--out", default="benchmarks/results/cpu.json")
    ap.add_argument("--tune-budget", type=float, default=TUNE_BUDGET, metavar="SECONDS",
                    help=f"seconds of `kiln tune` search per cpu artifact before it is measured (default "
                         f"{TUNE_BUDGET:g}; 0: measure it untuned)")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    engines = a.engines.split(",")
    limits = machine()
    print("machine", json.dumps(limits), flush=True)
    report: dict = {"cpu": _cpu_name(), "cores": os.cpu_count(), "threads": a.threads, "torch": torch.__version__,
                    "machine": limits, "tune_budget_s": a.tune_budget, "command": "python " + " ".join(sys.argv), "models": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for name in a.models.split(","):
            work = Path(tmp) / name
            work.mkdir(parents=True)
            ckpt = Path("models/demo") if name == "demo" else synthesize_checkpoint(name, work / "ckpt", torch.float32)
            cfg = json.loads((ckpt / "config.json").read_text())
            vocab = cfg["vocab_size"]
            global PREFILL
            PREFILL = min(512, cfg["max_position_embeddings"] - DECODE)  # the demo model's context is 256
            row: dict = {}
            for engine in engines:
                row[engine] = run_engine(engine, ckpt, work, vocab, a.reps, a.threads, limits, a.tune_budget)
                brief = {k: v for k, v in row[engine].items() if k not in ("kernels", "tune")}
                print(name, engine, json.dumps(brief), flush=True)
                if "tune" in row[engine]:
                    tuned = row[engine]["tune"]
                    print(f"{name} {engine}: kiln tune, {tuned['search_s']:.0f} s of search "
                          f"({tuned['wall_s']:.0f} s with the rebuild)\n{tuned['table']}", flush=True)
                if "kernels" in row[engine]:
                    print(format_floors(name, row[engine]["kernels"]), flush=True)
                report["models"][name] = row
                _write(a.out, report)  # after every engine: a later failure keeps what was measured
    _write(a.out, report)
    print(_table(report))


def _write(out: str, report: dict) -> None:
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(json.dumps(report, indent=1))


def _cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else []:
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def _table(report: dict) -> str:
    metrics = ("decode_b1_tok_s", "decode_b8_tok_s", "prefill_tok_s")
    lines = [f"{'model':11} {'engine':19} " + " ".join(f"{m:>18}" for m in metrics)]
    for model, row in report["models"].items():
        for engine, r in row.items():
            cells = [f"{r[m]:18.1f}" if m in r else f"{'-':>18}" for m in metrics]
            load = r.get("machine_load", {}).get("others_core_share")
            note = f"  (others used {load:.0%} of the cores)" if load is not None else ""
            lines.append(f"{model:11} {engine:19} " + " ".join(cells) + (f"  {r['error'][:60]}" if "error" in r else note))
    return "\n".join(lines)


if __name__ == "__main__":
    main()
