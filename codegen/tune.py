"""`kiln tune ARTIFACT [--budget SECONDS] [--kernels N]`: fit an artifact's compiled kernels to
the machine it runs on.

cpu: searches the schedule knobs of the hottest TVM kernels (every linear, the norms) on this
processor, at a decode and a prefill shape bucket, prints a before/after table, and stores the
winners in the artifact: tuning.json and the kernel library rebuilt with them
(kiln.codegen.cpu.tune). cuda: searches the paged-attention configs (prefill and decode
buckets) and, per weight shape and token-count bucket, cuBLAS against the Triton GEMM on this
GPU, prints a before/after table, writes tuning.json and rebuilds the artifact's kernel
binaries for this GPU and Triton version (kiln.codegen.cuda.tune). reference: nothing to tune. `python -m kiln.codegen.tune` takes the same arguments as `kiln tune`.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from kiln.errors import KilnError
from kiln.runtime.artifact import read_manifest


def tune(
    artifact: str | Path, budget: float | None = None, kernels: int | None = None
) -> dict[str, Any]:
    """Tune the artifact in place for this machine; returns what was done (printable JSON).
    `budget` (seconds of search) and `kernels` (how many of the hottest) bound the cpu search."""
    target = read_manifest(artifact).get("target")
    if target == "cpu":
        from kiln.codegen.cpu.tune import tune as tune_cpu

        return tune_cpu(artifact, budget=budget, kernels=kernels)
    if target == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise KilnError(
                f"'{artifact}' is a cuda artifact: tune it on the GPU that will serve it (no CUDA GPU here)"
            )
        from kiln.codegen.cuda.tune import tune as tune_cuda

        return tune_cuda(artifact, budget=budget)
    if target == "reference":
        return {
            "target": target,
            "note": "the reference target runs torch references: nothing to tune",
        }
    raise KilnError(
        f"kiln tune does not support target '{target}' (it tunes cpu and cuda artifacts)"
    )


def main_text(artifact: str | Path, budget: float | None = None, kernels: int | None = None) -> str:
    """What `kiln tune` prints: the before/after table (cpu), then what was done as JSON."""
    done = tune(artifact, budget=budget, kernels=kernels)
    table = done.pop("table", None)
    text = json.dumps(done, indent=1)
    return f"{table}\n{text}" if table else text


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """`kiln tune`'s options (the artifact, --budget, --kernels)."""
    parser.add_argument("artifact")
    parser.add_argument(
        "--budget",
        type=float,
        default=None,
        metavar="SECONDS",
        help="seconds of search, shared by the kernels tuned (default: cpu 120, cuda 240)",
    )
    parser.add_argument(
        "--kernels",
        type=int,
        default=None,
        metavar="N",
        help="tune only the N hottest kernels (cpu; default: every kernel with knobs)",
    )


def main(argv: list[str] | None = None) -> int:
    """`python -m kiln.codegen.tune ARTIFACT [--budget SECONDS] [--kernels N]`."""
    parser = argparse.ArgumentParser(prog="kiln tune", description=__doc__.splitlines()[0])
    add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        print(main_text(args.artifact, budget=args.budget, kernels=args.kernels))
    except KilnError as e:
        parser.exit(1, f"error: {e}\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
