"""The cpu target's linear kernel (kiln.kernels.tvm_kernels.linear) beside torch.mm on the same
threads: median ms, GFLOP/s and GB/s of weights read per shape and weight layout (out_in, in_out,
and the panels the cpu pipeline stores), at prefill and decode row counts.

    python benchmarks/cpu_linear.py [--rows 512,244] [--threads 2] [--config '{"mr": 6}']
    python benchmarks/cpu_linear.py --rows 1 --layouts out_in,panels     # batch-1 decode GEMVs

torch is timed first, in full, before TVM's thread pool starts (its spinning workers would take
the cores torch's next region needs); a sample repeats a call for ~50 ms, the median of 7
samples is its time. At decode row counts (at most 16) the calls go round copies of the weight
that together pass 256 MiB, so each call reads its weight from memory as a model's step does
(one weight alone would sit in the 32 MiB L3). The machine's load (`uptime`) is printed before
and after: others' work lowers every column.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch

SHAPES = [(768, 4096), (768, 2304), (2048, 768), (256, 1376), (1376, 256)]
"""(K, N): a small llama's QKV, MLP up, MLP down, and two narrow projections."""
LAYOUTS = ("out_in", "in_out", "panels")
PANEL = 32
"""Columns per panel (the weight-panels pass's width for these shapes)."""
ROTATE_BYTES = 256 << 20
"""At decode row counts, the weight copies a case goes round pass this many bytes."""


def median_ms(fn, samples: int = 7, sample_s: float = 0.05) -> float:
    fn()
    t = time.perf_counter()
    fn()
    number = max(1, int(sample_s / max(time.perf_counter() - t, 1e-6)))
    times = []
    for _ in range(samples):
        t = time.perf_counter()
        for _ in range(number):
            fn()
        times.append((time.perf_counter() - t) / number)
    return statistics.median(times) * 1e3


def _operands(rows: int, k: int, n: int, layout: str):
    """x, the weight copies a call goes round (in `layout`) and y."""
    g = torch.Generator().manual_seed(0)
    copies = -(-ROTATE_BYTES // (k * n * 4)) if rows <= 16 else 1
    ws = [torch.randn(n, k, generator=g) for _ in range(copies)]
    if layout == "panels":
        ws = [w.view(n // PANEL, PANEL, k).transpose(1, 2).contiguous() for w in ws]
    elif layout == "in_out":
        ws = [w.t().contiguous() for w in ws]
    return torch.randn(rows, k, generator=g), ws, torch.empty(rows, n)


def _round(fn, ws):
    """fn(w) over the weight copies in turn, one copy per call."""
    turn = iter(range(1 << 62))
    return lambda: fn(ws[next(turn) % len(ws)])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", default="512,244")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--config", default=None, help="knobs of the linear schedule (JSON); default: its default")
    p.add_argument("--layouts", default=",".join(LAYOUTS))
    a = p.parse_args()
    rows = [int(r) for r in a.rows.split(",")]
    cases = [(m, k, n, lay) for m in rows for k, n in SHAPES for lay in a.layouts.split(",")]
    os.environ["TVM_NUM_THREADS"] = str(a.threads)
    torch.set_num_threads(a.threads)
    print("load:", os.popen("uptime").read().strip())
    ref = {}
    for m, k, n in dict.fromkeys(case[:3] for case in cases):  # torch reads the out_in weight, as F.linear
        x, ws, y = _operands(m, k, n, "out_in")
        ref[m, k, n] = median_ms(_round(lambda w, x=x, y=y: torch.mm(x, w.t(), out=y), ws))

    from kiln.codegen.cpu.build import compile_kernels
    from kiln.ir.types import TensorType
    from kiln.kernels.tvm_kernels import OpInfo, build
    from kiln.kernels.tvm_provider import make_launcher

    config = json.loads(a.config) if a.config else None
    print(f"{'T':>4} {'K':>5} {'N':>5} {'layout':>7} {'kiln ms':>8} {'GF/s':>5} {'GB/s':>5} "
          f"{'torch ms':>8} {'GF/s':>5} {'GB/s':>5} {'ratio':>5}")
    for m, k, n, lay in cases:
        x, ws, y = _operands(m, k, n, lay)
        info = OpInfo("linear", (TensorType("float32", ("T", k)), TensorType("float32", tuple(ws[0].shape))),
                      (TensorType("float32", ("T", n)),), {"weight_layout": lay})
        kernel = build(info, config)
        launch = make_launcher(compile_kernels([kernel])[kernel.name], kernel.table())
        ms = median_ms(_round(lambda w, f=launch, x=x, y=y: f([y], [x, w], {}), ws))
        gf, mb = 2 * m * k * n / 1e6, 4 * k * n / 1e6
        t = ref[m, k, n]
        print(f"{m:>4} {k:>5} {n:>5} {lay:>7} {ms:8.3f} {gf / ms:5.0f} {mb / ms:5.1f} "
              f"{t:8.3f} {gf / t:5.0f} {mb / t:5.1f} {ms / t:5.2f}", flush=True)
    print("load:", os.popen("uptime").read().strip())


if __name__ == "__main__":
    main()
