"""Where wall time goes on the GPU: profiler timelines of kiln's time to first token, batch-1
decode and a window of the offline workload, reduced to GPU busy time against wall time.

    python benchmarks/cuda_timeline.py --shapes llama-3.1-8b --out results/cuda-timeline.json

Per shape (random bf16 weights, kiln.models.shapes; compiled untuned unless --tune-budget):
    ttft      one 2048-token prompt, 1 output token
    decode_b1 one 128-token prompt, 64 output tokens
    offline   --offline-requests requests (lengths uniform in 100..1024, ignore EOS) added at
              once and run to the end; after --warm-steps steps, --window steps are profiled;
              the run's seconds and tokens per phase (filling, full, draining) are reported
For each: wall time, GPU busy time (the union of kernel and copy intervals), the delay from the
window's start to its first kernel, the tail from its last kernel to the window's end, the
largest idle gaps (with the host op that ended last before each) and the kernels by total time.
Prints a table and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile, record_function

import kiln
from kiln import LLM, SamplingParams
from kiln.models.shapes import synthesize_checkpoint

DEVICE_CATS = {"kernel", "gpu_memcpy", "gpu_memset"}
WINDOW = "timeline_window"


def _prompt(length: int, vocab: int, g: torch.Generator) -> dict:
    return {"prompt_token_ids": torch.randint(10, vocab, (length,), generator=g).tolist()}


def reduce_trace(trace: dict, top: int = 12) -> dict:
    """Busy time, gaps and per-kernel totals of the device events inside the window annotation."""
    events = trace["traceEvents"]
    win = next(e for e in events if e.get("name") == WINDOW and e.get("cat") == "user_annotation")
    w0, w1 = win["ts"], win["ts"] + win["dur"]
    dev = sorted((e["ts"], e["ts"] + e.get("dur", 0), e["name"]) for e in events
                 if e.get("cat") in DEVICE_CATS and w0 <= e["ts"] <= w1)
    host = sorted((e["ts"] + e.get("dur", 0), e["name"]) for e in events if e.get("cat") == "cpu_op")
    busy, gaps, end = 0.0, [], None
    for s, e, _ in dev:
        if end is not None and s > end:
            gaps.append((s - end, end))
        start = s if end is None else max(s, end)
        busy += max(0.0, e - start)
        end = e if end is None else max(end, e)
    kernels: dict[str, list[float]] = {}
    for s, e, name in dev:
        k = kernels.setdefault(name[:80], [0.0, 0])
        k[0] += e - s
        k[1] += 1

    def before(t: float) -> str:
        names = [n for h, n in host if h <= t]
        return names[-1] if names else "-"

    gaps.sort(reverse=True)
    return {
        "wall_ms": (w1 - w0) / 1e3,
        "gpu_busy_ms": busy / 1e3,
        "busy_fraction": busy / max(w1 - w0, 1e-9),
        "first_kernel_ms": (dev[0][0] - w0) / 1e3 if dev else None,
        "tail_ms": (w1 - end) / 1e3 if dev else None,
        "kernels": len(dev),
        "gaps_total_ms": sum(g for g, _ in gaps) / 1e3,
        "largest_gaps": [{"us": round(g, 1), "after_host_op": before(t)} for g, t in gaps[:top]],
        "top_kernels": [{"name": n, "ms": round(v[0] / 1e3, 3), "calls": v[1]}
                        for n, v in sorted(kernels.items(), key=lambda kv: -kv[1][0])[:top]],
    }


def profiled(fn) -> dict:
    """fn() under the profiler, reduced (reduce_trace)."""
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        with record_function(WINDOW):
            fn()
        torch.cuda.synchronize()
    with tempfile.NamedTemporaryFile(suffix=".json") as f:
        prof.export_chrome_trace(f.name)
        return reduce_trace(json.loads(Path(f.name).read_text()))


def run_shape(art: Path, vocab: int, a) -> dict:
    g = torch.Generator().manual_seed(0)
    greedy = lambda n: SamplingParams(temperature=0, max_tokens=n, ignore_eos=True)  # noqa: E731
    llm = LLM(art, device="cuda", max_model_len=4096, max_num_seqs=256, max_num_batched_tokens=2048,
              enable_prefix_caching=False)
    for _ in range(3):
        llm.generate([_prompt(2048, vocab, g)], greedy(1), use_tqdm=False)
        llm.generate([_prompt(128, vocab, g)], greedy(8), use_tqdm=False)
    res = {"ttft": profiled(lambda: llm.generate([_prompt(2048, vocab, g)], greedy(1), use_tqdm=False))}
    res["decode_b1"] = profiled(lambda: llm.generate([_prompt(128, vocab, g)], greedy(64), use_tqdm=False))
    res["decode_b1"]["ms_per_step"] = res["decode_b1"]["wall_ms"] / 64

    def timed(length: int, n: int) -> float:
        t = time.perf_counter()
        llm.generate([_prompt(length, vocab, g)], greedy(n), use_tqdm=False)
        return time.perf_counter() - t

    res["ttft"]["unprofiled_ms"] = 1e3 * statistics.median(timed(2048, 1) for _ in range(5))
    res["decode_b1"]["unprofiled_ms_per_step"] = 1e3 * statistics.median(
        (timed(128, 65) - timed(128, 1)) / 64 for _ in range(3))
    del llm
    torch.cuda.empty_cache()
    if a.offline_requests:
        llm = LLM(art, device="cuda", max_model_len=4096, max_num_seqs=a.offline_max_seqs,
                  max_num_batched_tokens=a.offline_batched_tokens, enable_prefix_caching=False)
        lens = torch.randint(100, 1025, (a.offline_requests, 2), generator=g).tolist()
        for p, o in lens:
            llm.engine.add_request(None, _prompt(p, vocab, g), greedy(o))
        res["offline"], res["offline_phases"] = offline(llm.engine, a)
    return res


def offline(eng, a) -> tuple[dict, dict]:
    """Step the engine's queued requests to the end, recording each step (wall time, its decode
    rows and prefill tokens, running and waiting requests, tokens generated); steps warm_steps
    .. warm_steps + window run under the profiler. Returns the window's reduction and the run's
    time per phase: "fill" (requests still waiting and fewer than 90% of max_num_seqs running),
    "full" (at least 90% running), "drain" (nothing waiting)."""
    sched = eng.scheduler
    schedule, shapes = sched.schedule, []

    def recording():
        out = schedule()
        shapes.append((sum(n == 1 for n in out.num_new_tokens), sum(n for n in out.num_new_tokens if n > 1)))
        return out

    sched.schedule = recording
    steps: list[dict] = []
    window: dict = {}
    start = time.perf_counter()
    while eng.has_unfinished_requests():
        if len(steps) == a.warm_steps:
            window = profiled(lambda: [eng.step() for _ in range(a.window)])
            steps += [{"profiled": True}] * a.window
            continue
        t, gen = time.perf_counter(), eng.num_generated_tokens
        eng.step()
        steps.append({"s": time.perf_counter() - t, "tokens": eng.num_generated_tokens - gen,
                      "running": len(sched.running), "waiting": len(sched.waiting)})
    total = time.perf_counter() - start
    sched.schedule = schedule
    phases: dict[str, dict] = {}
    for st, (decodes, prefill) in zip(steps, shapes, strict=False):
        if st.get("profiled"):
            continue
        name = "drain" if not st["waiting"] else "full" if st["running"] >= 0.9 * sched.max_num_seqs else "fill"
        ph = phases.setdefault(name, {"steps": 0, "seconds": 0.0, "tokens": 0, "decode_rows": 0, "prefill_tokens": 0})
        ph["steps"] += 1
        ph["seconds"] += st["s"]
        ph["tokens"] += st["tokens"]
        ph["decode_rows"] += decodes
        ph["prefill_tokens"] += prefill
    for ph in phases.values():
        ph["tok_s"] = ph["tokens"] / ph["seconds"]
        ph["ms_per_step"] = 1e3 * ph["seconds"] / ph["steps"]
    phases["run"] = {"seconds": total, "tokens": eng.num_generated_tokens, "tok_s": eng.num_generated_tokens / total,
                     "preemptions": sched.num_preemptions}
    return window, phases


def shape_artifact(shape: str, work: str | Path, tune_budget: float = 0.0) -> tuple[Path, Path]:
    """The checkpoint and cuda artifact of a real model's shape under work/shape, synthesized,
    compiled (and tuned for tune_budget seconds) unless already there."""
    ckpt, art = Path(work) / shape / "ckpt", Path(work) / shape / "artifact"
    if not (ckpt / "config.json").exists():
        synthesize_checkpoint(shape, ckpt, torch.bfloat16, "cuda")
    if not (art / "manifest.json").exists():
        kiln.compile(ckpt, art, target="cuda", dtype="bfloat16", overwrite=True)
        if tune_budget > 0:
            from kiln.codegen.cuda.tune import tune

            tune(art, budget=tune_budget)
    return ckpt, art


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", default="llama-3.1-8b")
    ap.add_argument("--work", default="/tmp/kiln-bench", help="checkpoints and artifacts go here")
    ap.add_argument("--tune-budget", type=float, default=0.0, help="seconds of `kiln tune` first (0: untuned)")
    ap.add_argument("--offline-requests", type=int, default=1000)
    ap.add_argument("--offline-max-seqs", type=int, default=512)
    ap.add_argument("--offline-batched-tokens", type=int, default=8192)
    ap.add_argument("--warm-steps", type=int, default=150)
    ap.add_argument("--window", type=int, default=20)
    ap.add_argument("--out", default="results/cuda-timeline.json")
    a = ap.parse_args()
    report: dict = {"gpu": torch.cuda.get_device_name(), "kiln": kiln.__version__, "shapes": {}}
    for shape in a.shapes.split(","):
        ckpt, art = shape_artifact(shape, a.work, a.tune_budget)
        vocab = json.loads((ckpt / "config.json").read_text())["vocab_size"]
        report["shapes"][shape] = run_shape(art, vocab, a)
        torch.cuda.empty_cache()
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(report, indent=1))
    print(f"{'shape':14} {'window':10} {'wall ms':>9} {'busy ms':>9} {'busy':>6} {'first':>7} {'tail':>7} {'gaps ms':>8}")
    for shape, rows in report["shapes"].items():
        for name, r in rows.items():
            if name == "offline_phases":
                continue
            print(f"{shape:14} {name:10} {r['wall_ms']:9.2f} {r['gpu_busy_ms']:9.2f} {r['busy_fraction']:6.1%} "
                  f"{r['first_kernel_ms']:7.2f} {r['tail_ms']:7.2f} {r['gaps_total_ms']:8.2f}")
        for name, ph in rows.get("offline_phases", {}).items():
            print(f"{shape:14} offline {name:6} " + " ".join(f"{k}={v:.1f}" for k, v in ph.items()))


if __name__ == "__main__":
    main()
