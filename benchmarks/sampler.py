"""The sampler's time per step: its torch path against its Triton kernels, on the same logits.

    python benchmarks/sampler.py                          # batch 1/32/256, vocab 128256
    python benchmarks/sampler.py --batches 1 8 --steps 5 --out /tmp/sampler.json

Per batch size and workload (greedy; temperature 0.8 unfiltered; temperature 0.8 with top-p 0.9)
the median wall time of one `Sampler.__call__` (which ends in the token copy to the host, so
each step is complete when it returns) over --steps steps after --warmup, on N(0, 5^2) logits
(peaked, as trained models' are) of the given dtype. The Triton path runs only on a CUDA
device (on the CPU it would be Triton's interpreter). Prints a table and writes JSON (--out).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch

from kiln.runtime.sampler import Sampler, SamplingState
from kiln.runtime.sampling_params import SamplingParams

WORKLOADS = {
    "greedy": lambda i: SamplingParams(temperature=0),
    "t0.8": lambda i: SamplingParams(temperature=0.8, seed=i),
    "t0.8 top-p0.9": lambda i: SamplingParams(temperature=0.8, top_p=0.9, seed=i),
}


def _step_ms(sampler: Sampler, logits: torch.Tensor, workload: str, steps: int, warmup: int) -> float:
    """Median milliseconds of one sampler call on `logits` [B, V] for fresh states of `workload`."""
    make = WORKLOADS[workload]
    states = [SamplingState(make(i), prompt_token_ids=[1, 2, 3]) for i in range(logits.shape[0])]
    times = []
    for step in range(warmup + steps):
        if logits.is_cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        sampler(logits, states)
        if step >= warmup:
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--vocab", type=int, default=128256)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 32, 256])
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    ap.add_argument("--steps", type=int, default=None, help="timed steps (default 30 on CUDA, 3 on CPU)")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--out", default="/tmp/kiln_bench_sampler.json")
    args = ap.parse_args()
    dev = torch.device(args.device)
    steps = args.steps or (30 if dev.type == "cuda" else 3)
    paths = ["torch", "triton"] if dev.type == "cuda" else ["torch"]
    g = torch.Generator(device=dev).manual_seed(0)
    rows = []
    print(f"sampler step, vocab {args.vocab}, {args.dtype} logits, {dev} "
          f"({torch.cuda.get_device_name(dev) if dev.type == 'cuda' else platform.processor() or 'cpu'})")
    print(f"{'batch':>6} {'workload':<15}" + "".join(f"{p + ' ms':>12}" for p in paths)
          + ("  speedup" if len(paths) > 1 else ""))
    for batch in args.batches:
        logits = (torch.randn(batch, args.vocab, device=dev, generator=g) * 5).to(getattr(torch, args.dtype))
        for workload in WORKLOADS:
            ms = {p: _step_ms(Sampler(use_triton=p == "triton"), logits, workload, steps, args.warmup) for p in paths}
            rows.append({"batch": batch, "workload": workload, **{f"{p}_ms": v for p, v in ms.items()}})
            line = f"{batch:>6} {workload:<15}" + "".join(f"{ms[p]:>12.3f}" for p in paths)
            if len(paths) > 1:
                line += f"  {ms['torch'] / ms['triton']:>6.2f}x"
            print(line, flush=True)
    out = {
        "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__,
        "vocab": args.vocab,
        "dtype": args.dtype,
        "steps": steps,
        "rows": rows,
    }
    if "triton" in paths:
        import triton

        out["triton"] = triton.__version__
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
