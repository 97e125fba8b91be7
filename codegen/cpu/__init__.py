"""The cpu target: kernel-set ops run as TVM kernels (`tvm:<function>`, kiln.kernels.tvm_kernels)
compiled by LLVM for the host processor into one shared library in the artifact (build.py);
paged attention too when kiln.kernels.tvm_kernels.attention is present. Any other op runs its
torch reference (`torch:<op>`), recorded as a fallback (`kiln inspect` lists them). Generic
elementwise glue arrives in groups, one `fused_elementwise` node each (the cpu pipeline's
fuse-elementwise pass), built into one kernel (kiln.kernels.tvm_kernels.fused).

Paged attention needs a constant block size (its key loop steps through a block in vectors), so
its kernel is built for the engine's default, DEFAULT_BLOCK_SIZE; the kernel's build.json record
says so (`"fixed": {"BS": 16}`) and the runtime refuses another block size for the artifact.
"""

from __future__ import annotations

import dataclasses

from kiln.codegen.lowering import LoweredModule, build_plan
from kiln.errors import UnsupportedOpError
from kiln.ir.graph import Graph, Node
from kiln.ir.step_inputs import DEFAULT_BLOCK_SIZE
from kiln.ir.types import TensorType
from kiln.kernels import torch_provider, tvm_kernels, tvm_provider
from kiln.kernels.tvm_kernels import Kernel, OpInfo

TARGET = "cpu"

SPECIALIZE: dict[str, dict[str, int]] = {"paged_attention": {"BS": DEFAULT_BLOCK_SIZE}}
"""Per op, the symbolic dims its kernel is built for at one value (the rest stay symbolic)."""


def _fix(t: TensorType, values: dict[str, int]) -> TensorType:
    return dataclasses.replace(t, shape=tuple(values.get(d, d) if isinstance(d, str) else d for d in t.shape))


def op_info(node: Node) -> OpInfo:
    """What a kernel builder sees of `node`: tensor input types (None for a scalar constant, whose
    value OpInfo.consts holds), result types and attributes; the dims SPECIALIZE fixes for its op replaced by their values
    (and listed in OpInfo.fixed when a type had them)."""
    inputs = tuple(
        x.type if isinstance(x.type, TensorType) and not x.is_scalar_const else None for x in node.inputs
    )
    consts = tuple(x.attrs["value"] if x.is_scalar_const else None for x in node.inputs)
    consts = consts if any(c is not None for c in consts) else ()
    outputs = tuple(node.type.types)
    values = SPECIALIZE.get(node.op, {})
    used = {d for t in (*inputs, *outputs) if t is not None for d in t.shape if isinstance(d, str) and d in values}
    if not used:
        return OpInfo(node.op, inputs, outputs, dict(node.attrs), consts=consts)
    inputs = tuple(t if t is None else _fix(t, values) for t in inputs)
    outputs = tuple(_fix(t, values) for t in outputs)
    return OpInfo(node.op, inputs, outputs, dict(node.attrs), fixed={d: values[d] for d in sorted(used)},
                  consts=consts)


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
