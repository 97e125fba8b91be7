"""Kernel-set coverage: the share of each architecture's FLOPs and weight bytes that runs in
kernel-set ops (kiln.ir.ops.kernels) after a target's pass pipeline, and every other op left.

    python benchmarks/kernel_coverage.py [--targets cuda cpu] [--size realistic|tiny]

Graphs are traced on the meta device from configs alone (no weights): `realistic` scales each
supported architecture's tiny test config to ~1B-model widths (2 layers), `tiny` keeps the test
shapes. FLOPs are those of a nominal 512-token prefill step (kiln.ir.cost). Prints a table and
writes JSON (--out).
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch

from kiln.codegen.fold_weights import fold_weights
from kiln.frontend import import_model
from kiln.ir.cost import kernel_coverage
from kiln.models.checkpoint import write_weightless_checkpoint
from kiln.models.tiny_configs import TINY_CONFIGS, realistic_config, tiny_config
from kiln.passes import PassManager, get_pass
from kiln.passes.registry import pipeline


def coverage_row(arch: str, target: str, size: str, workdir: Path) -> dict:
    """Trace `arch` at `size`, run `target`'s pipeline, fold weights, measure coverage."""
    config = realistic_config(arch) if size == "realistic" else tiny_config(arch)
    model_dir = workdir / f"{arch}-{size}"
    if not model_dir.exists():
        write_weightless_checkpoint(config, model_dir)
    imported = import_model(str(model_dir), torch.bfloat16)
    graph = PassManager([get_pass(n) for n in pipeline(target)]).run(imported.graph)
    graph, _ = fold_weights(graph, imported.weights)
    cov = kernel_coverage(graph)
    return {
        "arch": arch,
        "target": target,
        "flop_share": cov.flop_share,
        "weight_share": cov.weight_share,
        "gflops": cov.flops / 1e9,
        "kernel_ops": dict(cov.kernel_ops),
        "other_ops": dict(cov.other_ops.most_common()),
        "other_flops": {k: v for k, v in cov.other_flops.most_common() if v},
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--targets", nargs="+", default=["cuda", "cpu"])
    ap.add_argument("--size", choices=["realistic", "tiny"], default="realistic")
    ap.add_argument("--archs", nargs="+", default=list(TINY_CONFIGS))
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/kernel-coverage.json"))
    args = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for target in args.targets:
            for arch in args.archs:
                rows.append(coverage_row(arch, target, args.size, Path(tmp)))
    print(f"{'target':7s} {'arch':12s} {'FLOPs':>8s} {'weights':>8s}  ops outside the kernel set (count)")
    for r in rows:
        others = ", ".join(f"{k} {v}" for k, v in r["other_ops"].items())
        print(f"{r['target']:7s} {r['arch']:12s} {r['flop_share']:8.2%} {r['weight_share']:8.2%}  {others}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"size": args.size, "rows": rows}, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
