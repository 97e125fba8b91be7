"""The cpu target's linear kernel (kiln.kernels.tvm_kernels.linear) at prefill row counts beside
torch.mm on the same threads: median ms and GFLOP/s per shape and weight layout.

    python benchmarks/cpu_linear.py [--rows 512,244] [--threads 2] [--config '{"mr": 6}']

torch is timed first, in full, before TVM's thread pool starts (its spinning workers would take
the cores torch's next region needs); a sample repeats a call for ~50 ms, the median of 7
samples is its time. The machine's load (`uptime`) is printed before and after: others' work
lowers both columns.
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
LAYOUTS = ("out_in", "in_out")


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
    g = torch.Generator().manual_seed(0)
    w = torch.randn((n, k) if layout == "out_in" else (k, n), generator=g)
    return torch.randn(rows, k, generator=g), w, torch.empty(rows, n)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", default="512,244")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--config", default=None, help="knobs of the linear schedule (JSON); default: its default")
    a = p.parse_args()
    rows = [int(r) for r in a.rows.split(",")]
    cases = [(m, k, n, lay) for m in rows for k, n in SHAPES for lay in LAYOUTS]
    os.environ["TVM_NUM_THREADS"] = str(a.threads)
    torch.set_num_threads(a.threads)
    print("load:", os.popen("uptime").read().strip())
    ref = {}
    for m, k, n, lay in cases:
        x, w, y = _operands(m, k, n, lay)
        wt = w.t() if lay == "out_in" else w
        ref[m, k, n, lay] = median_ms(lambda x=x, wt=wt, y=y: torch.mm(x, wt, out=y))

    from kiln.codegen.cpu.build import compile_kernels
    from kiln.ir.types import TensorType
    from kiln.kernels.tvm_kernels import OpInfo, build
    from kiln.kernels.tvm_provider import make_launcher

    config = json.loads(a.config) if a.config else None
    print(f"{'T':>4} {'K':>5} {'N':>5} {'layout':>7} {'kiln ms':>8} {'GF/s':>5} {'torch ms':>8} {'GF/s':>5} {'ratio':>5}")
    for m, k, n, lay in cases:
        x, w, y = _operands(m, k, n, lay)
        info = OpInfo("linear", (TensorType("float32", ("T", k)), TensorType("float32", tuple(w.shape))),
                      (TensorType("float32", ("T", n)),), {"weight_layout": lay})
        kernel = build(info, config)
        launch = make_launcher(compile_kernels([kernel])[kernel.name], kernel.table())
        ms = median_ms(lambda f=launch, x=x, w=w, y=y: f([y], [x, w], {}))
        gf = 2 * m * k * n / 1e6
        t = ref[m, k, n, lay]
        print(f"{m:>4} {k:>5} {n:>5} {lay:>7} {ms:8.2f} {gf / ms:5.0f} {t:8.2f} {gf / t:5.0f} {ms / t:5.2f}", flush=True)
    print("load:", os.popen("uptime").read().strip())


if __name__ == "__main__":
    main()
