"""The cuda target: kernel ops run as Triton kernels (`triton:<op>`); dense GEMMs are
`triton:linear`, which calls cuBLAS through torch unless the artifact's tuning.json chose the
Triton GEMM for a weight shape and bucket (`kiln tune`); the embedding gather goes to torch, and
any other op runs its torch reference on the GPU, recorded as a fallback (`kiln inspect` lists
them). So does a node that its op's Triton kernel does not cover (`triton_provider.covers`);
`quantized_linear`'s kernels cover int4 / int8 / fp8 weights, with or without quantized
activations (kernels/triton_kernels/quant_linear.py).

The compiled binaries are not built here: lowering needs no GPU. `build.py` builds them on the
GPU the artifact will serve on (compile-model does it when one is present; `kiln tune` does it
later), so an artifact's kernels/ match that GPU and Triton version.
"""

from __future__ import annotations

from kiln.codegen.lowering import LoweredModule, build_plan
from kiln.errors import UnsupportedOpError
from kiln.ir.graph import Graph, Node
from kiln.kernels import torch_provider, triton_provider

TARGET = "cuda"

VENDOR = frozenset({"matmul", "embedding"})
"""Ops that go to cuBLAS / torch's gather through torch by design, not as fallbacks."""


def lower(graph: Graph) -> LoweredModule:
    """The execution plan: Triton kernels where one exists, torch for the rest."""
    fallbacks: set[str] = set()

    def kernel(node: Node) -> str:
        if node.op not in VENDOR and triton_provider.launcher(node.op) is not None \
                and triton_provider.covers(node.op, node.attrs):
            return f"{triton_provider.PREFIX}:{node.op}"
        if torch_provider.launcher(node.op) is None:
            raise UnsupportedOpError(node.op, hint="neither Triton nor torch has a kernel for it")
        if node.op not in VENDOR:
            fallbacks.add(node.op)
        return f"{torch_provider.PREFIX}:{node.op}"

    plan = build_plan(graph, TARGET, kernel)
    return LoweredModule(plan, fallbacks=sorted(fallbacks))
