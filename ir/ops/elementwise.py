"""Elementwise ops: unary math and activations, broadcasting binary ops, select and cast."""

from __future__ import annotations

import operator

import torch
import torch.nn.functional as F

from kiln.ir.ops.registry import OPS, register
from kiln.ir.types import torch_dtype


def _tensor(x, like: torch.Tensor | None = None) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        return x
    return torch.tensor(x, device=like.device if like is not None else None)


# -- unary math and activations -------------------------------------------------------------

_UNARY = {
    "neg": torch.neg,
    "exp": torch.exp,
    "log": torch.log,
    "sqrt": torch.sqrt,
    "rsqrt": torch.rsqrt,
    "sin": torch.sin,
    "cos": torch.cos,
    "tanh": torch.tanh,
    "sigmoid": torch.sigmoid,
    "silu": F.silu,
    "relu": torch.relu,
    "abs": torch.abs,
    "reciprocal": torch.reciprocal,
    "erf": torch.erf,
    "floor": torch.floor,
    "ceil": torch.ceil,
    "logical_not": torch.logical_not,
    "sign": torch.sign,
    "square": torch.square,
    "log1p": torch.log1p,
    "expm1": torch.expm1,
    "exp2": torch.exp2,
    "mish": torch.nn.functional.mish,
    "hardswish": torch.nn.functional.hardswish,
    "hardsigmoid": torch.nn.functional.hardsigmoid,
    "elu": torch.nn.functional.elu,
    "isnan": torch.isnan,
    "isinf": torch.isinf,
}
for _name, _fn in _UNARY.items():
    register(_name, arity=1, kind="elementwise")(lambda x, _fn=_fn: _fn(x))


@register("gelu", arity=1, kind="elementwise", attrs=("approximate",))
def gelu(x: torch.Tensor, approximate: str) -> torch.Tensor:
    """GELU, exact ("none") or with the tanh approximation."""
    return F.gelu(x, approximate=approximate)


@register("softplus", arity=1, kind="elementwise", attrs=("beta", "threshold"))
def softplus(x: torch.Tensor, beta: float, threshold: float) -> torch.Tensor:
    """log(1 + exp(beta*x)) / beta, linear above threshold."""
    return F.softplus(x, beta=beta, threshold=threshold)


@register("leaky_relu", arity=1, kind="elementwise", attrs=("negative_slope",))
def leaky_relu(x: torch.Tensor, negative_slope: float) -> torch.Tensor:
    """max(x, 0) + negative_slope * min(x, 0)."""
    return F.leaky_relu(x, negative_slope)


@register("cast", arity=1, kind="elementwise", attrs=("dtype",))
def cast(x: torch.Tensor, dtype: str) -> torch.Tensor:
    """Convert to another dtype."""
    return _tensor(x).to(torch_dtype(dtype))


@register("clamp", arity=1, kind="elementwise", optional_attrs=("min", "max"))
def clamp(x: torch.Tensor, min: float | None = None, max: float | None = None) -> torch.Tensor:
    """Clamp to [min, max] (either bound may be absent)."""
    return torch.clamp(x, min=min, max=max)


# -- binary, broadcasting --------------------------------------------------------------------

_BINARY = {
    "add": operator.add,
    "sub": operator.sub,
    "mul": operator.mul,
    "pow": torch.pow,
    "eq": operator.eq,
    "ne": operator.ne,
    "lt": operator.lt,
    "le": operator.le,
    "gt": operator.gt,
    "ge": operator.ge,
    "logical_and": lambda a, b: torch.logical_and(_tensor(a, b), _tensor(b, a)),
    "logical_or": lambda a, b: torch.logical_or(_tensor(a, b), _tensor(b, a)),
    "bitwise_and": operator.and_,
    "bitwise_or": operator.or_,
    "maximum": lambda a, b: torch.maximum(_tensor(a, b), _tensor(b, a)),
    "minimum": lambda a, b: torch.minimum(_tensor(a, b), _tensor(b, a)),
    "remainder": operator.mod,
}
for _name, _fn in _BINARY.items():
    register(_name, arity=2, kind="elementwise")(lambda a, b, _fn=_fn: _fn(a, b))


@register("div", arity=2, kind="elementwise", optional_attrs=("rounding_mode",))
def div(a: torch.Tensor, b: torch.Tensor, rounding_mode: str | None = None) -> torch.Tensor:
    """a / b; rounding_mode "trunc" or "floor" for integer-style division."""
    if rounding_mode is None:
        return a / b
    return torch.div(_tensor(a, b if isinstance(b, torch.Tensor) else None), b, rounding_mode=rounding_mode)


@register("where", arity=3, kind="elementwise")
def where(cond: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a where cond holds, else b."""
    return torch.where(_tensor(cond), a, b)


@register("dropout", arity=1, kind="elementwise", attrs=("p",))
def dropout(x: torch.Tensor, p: float) -> torch.Tensor:
    """Dropout at inference: the identity (canonicalize removes it)."""
    return x


# -- fused elementwise groups (the cpu pipeline's fuse-elementwise pass) ---------------------


def _step_arg(ref, inputs: tuple, values: list):
    """An operand of a fused step: "x<i>" input i, "v<j>" step j's result, a number as it is."""
    if isinstance(ref, str):
        return inputs[int(ref[1:])] if ref[0] == "x" else values[int(ref[1:])]
    return ref


@register("fused_elementwise", kind="elementwise", attrs=("expr",))
def fused_elementwise(*inputs: torch.Tensor, expr: list) -> torch.Tensor:
    """A group of elementwise ops as one op: `expr` lists its steps in order, each
    [op, [operands], {attrs}], an operand "x<i>" (input i), "v<j>" (step j's result) or a
    scalar constant; the result is the last step's. Each step runs its own op's reference, so
    the result is bitwise the unfused chain's."""
    values: list = []
    for op, args, attrs in expr:
        values.append(OPS[op].impl(*(_step_arg(a, inputs, values) for a in args), **attrs))
    return values[-1]
