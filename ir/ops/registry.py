"""The op registry: each op once, with its schema, its type rule and its torch reference."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import sympy
import torch

from kiln.errors import VerifyError
from kiln.ir.dims import Dim, evaluate, from_expr, shape_symbols
from kiln.ir.types import TensorType, TupleType, ValueType, dtype_name, torch_dtype

InferFn = Callable[[Sequence[TensorType], Mapping[str, Any]], TensorType | TupleType]


@dataclass(frozen=True)
class OpDef:
    """How one IR op is typed and computed."""

    name: str
    """The op's name in the IR text and JSON."""
    impl: Callable[..., torch.Tensor]
    """Torch reference: impl(*inputs, **attrs) with dim attrs already resolved to ints."""
    attrs: tuple[str, ...] = ()
    """Attribute names every node of this op carries."""
    optional_attrs: tuple[str, ...] = ()
    """Attribute names a node may carry."""
    arity: int | tuple[int, int] | None = None
    """Number of inputs: exact, (min, max), or None for variadic."""
    kind: str = "opaque"
    """Layout class for generic passes: elementwise | reduce | dim | opaque."""
    dim_attrs: tuple[str, ...] = ()
    """Attributes holding (lists of) symbolic dims, bound to ints before impl runs."""
    infer: InferFn | None = None
    """Type rule; None derives it by running impl on meta tensors (see infer_type)."""
    doc: str = ""
    scalar_inputs: bool = field(default=True)
    """Whether rank-0 const inputs may be passed to impl as Python numbers."""
    writes: tuple[int, ...] = ()
    """Operands the op writes in place. Result i < len(writes) (element i of a tuple result, or
    the single result) is the written operand writes[i] after the write: it aliases that
    operand's storage, and every later reader must read it instead of the operand (the verifier
    checks). Results after those are fresh values (rope_kv_cache_write's rotated q)."""
    device_arg: bool = False
    """Whether impl makes a tensor from nothing and takes the executing device as `device=`."""
    kernel: bool = False
    """Whether the op is in the kernel op set that every target implements as a kernel."""


OPS: dict[str, OpDef] = {}


def register(name: str, **kw: Any) -> Callable[[Callable[..., torch.Tensor]], Callable[..., torch.Tensor]]:
    """Decorator registering `impl` as the reference implementation of op `name`."""

    def deco(impl: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
        if name in OPS:
            raise ValueError(f"op '{name}' registered twice")
        OPS[name] = OpDef(name=name, impl=impl, doc=(impl.__doc__ or "").strip(), **kw)
        return impl

    return deco


def get_op(name: str) -> OpDef:
    """The definition of a registered op; VerifyError naming the known ops otherwise."""
    try:
        return OPS[name]
    except KeyError:
        raise VerifyError(f"unknown op '{name}'; registered ops: {', '.join(sorted(OPS))}") from None


def resolve_attrs(op: OpDef, attrs: Mapping[str, Any], bindings: Mapping[str, int]) -> dict[str, Any]:
    """attrs with every symbolic dim in op.dim_attrs replaced by its value under `bindings`."""
    out = dict(attrs)
    for key in op.dim_attrs:
        v = out.get(key)
        if isinstance(v, list | tuple):
            out[key] = [evaluate(d, bindings) for d in v]
        elif v is not None:
            out[key] = evaluate(v, bindings)
    return out


def _probe(op: OpDef, types: Sequence[TensorType], attrs: Mapping[str, Any], bindings: Mapping[str, int]) -> tuple[str, list[int]]:
    args = [
        torch.empty([evaluate(d, bindings) for d in t.shape], dtype=torch_dtype(t.dtype), device="meta")
        for t in types
    ]
    out = op.impl(*args, **resolve_attrs(op, attrs, bindings))
    return dtype_name(out.dtype), list(out.shape)


# Distinct primes large enough that no op clamps them, small enough to stay cheap on meta.
_BASE, _STEP = 1009, 7


def infer_type(op: OpDef, types: Sequence[ValueType], attrs: Mapping[str, Any]) -> ValueType:
    """The result type of `op` on inputs of `types`.

    Ops without an explicit rule are evaluated on meta tensors: each symbol gets a large prime,
    then each symbol alone is moved, and every output dim is fitted as an affine function of the
    symbols (the shapes LLM graphs produce: T, 2*T, T+1). A third probe checks the fit.
    """
    if op.infer is not None:
        return op.infer(types, attrs)
    if any(isinstance(t, TupleType) for t in types):
        raise VerifyError(f"op '{op.name}' reads a multi-result value; project it with get_result")
    if op.kind == "elementwise":
        # Meta kernels skip some dtype checks (bool arithmetic, say): run the real kernel on
        # one element per operand so the verifier rejects what the interpreter cannot run.
        one = [torch.ones([1] * t.rank, dtype=torch_dtype(t.dtype)) for t in types]
        op.impl(*one, **attrs)
    attr_dims: list[Dim] = []
    for key in op.dim_attrs:
        v = attrs.get(key)
        attr_dims.extend(v if isinstance(v, list | tuple) else [v] if v is not None else [])
    syms = shape_symbols([*(t.shape for t in types), attr_dims])
    base = {s: _BASE + 101 * i for i, s in enumerate(syms)}
    dtype, out0 = _probe(op, types, attrs, base)
    coeffs: dict[str, list[int]] = {}
    for s in syms:
        _, out1 = _probe(op, types, attrs, {**base, s: base[s] + _STEP})
        diffs = [b - a for a, b in zip(out0, out1, strict=True)]
        if any(d % _STEP for d in diffs):
            raise VerifyError(f"op '{op.name}': output shape is not affine in symbol {s}")
        coeffs[s] = [d // _STEP for d in diffs]
    shape: list[Dim] = []
    for i, v in enumerate(out0):
        expr = v - sum(coeffs[s][i] * base[s] for s in syms)
        for s in syms:
            if coeffs[s][i]:
                expr = expr + coeffs[s][i] * sympy.Symbol(s)
        shape.append(from_expr(expr) if syms else v)
    if syms:
        check = {s: base[s] + 2 * _STEP + 3 for s in syms}
        _, out2 = _probe(op, types, attrs, check)
        if out2 != [evaluate(d, check) for d in shape]:
            raise VerifyError(f"op '{op.name}': output shape is not affine in {', '.join(syms)}")
    return TensorType(dtype, tuple(shape))
