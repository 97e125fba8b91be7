"""The cpu target: kernel-set ops run as TVM kernels (`tvm:<function>`, kiln.kernels.tvm_kernels)
compiled by LLVM for the host processor into one shared library in the artifact (build.py);
paged attention too when kiln.kernels.tvm_kernels.attention is present. Any other op runs its
torch reference (`torch:<op>`), recorded as a fallback (`kiln inspect` lists them).
"""

from __future__ import annotations

from kiln.codegen.lowering import LoweredModule, build_plan
from kiln.errors import UnsupportedOpError
from kiln.ir.graph import Graph, Node
from kiln.ir.types import TensorType
from kiln.kernels import torch_provider, tvm_kernels, tvm_provider
from kiln.kernels.tvm_kernels import Kernel, OpInfo

TARGET = "cpu"


def op_info(node: Node) -> OpInfo:
    """What a kernel builder sees of `node`: tensor input types (None for a scalar constant),
    result types and attributes."""
    inputs = tuple(
        x.type if isinstance(x.type, TensorType) and not x.is_scalar_const else None for x in node.inputs
    )
    return OpInfo(node.op, inputs, tuple(node.type.types), dict(node.attrs))


def lower(graph: Graph) -> LoweredModule:
    """The execution plan and the compiled kernel library: TVM where a builder covers the node,
    torch for the rest."""
    kernels: dict[str, Kernel] = {}
    fallbacks: set[str] = set()

    def kernel(node: Node) -> str:
        k = tvm_kernels.build(op_info(node))  # (the name `build` is this package's build.py)
        if k is not None:
            kernels.setdefault(k.name, k)
            return f"{tvm_provider.PREFIX}:{k.name}"
        if torch_provider.launcher(node.op) is None:
            raise UnsupportedOpError(node.op, hint="neither TVM nor torch has a kernel for it")
        fallbacks.add(node.op)
        return f"{torch_provider.PREFIX}:{node.op}"

    plan = build_plan(graph, TARGET, kernel)
    files = {}
    if kernels:
        from kiln.codegen.cpu.build import library_files

        files = library_files(list(kernels.values()))
    return LoweredModule(plan, files=files, fallbacks=sorted(fallbacks))
