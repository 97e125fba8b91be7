"""Data movement: views, slicing, concatenation, indexing, and tensors made from shapes."""

from __future__ import annotations

import torch

from kiln.ir.ops.registry import register
from kiln.ir.types import torch_dtype

# -- views -----------------------------------------------------------------------------------


@register("reshape", arity=1, kind="opaque", attrs=("shape",), dim_attrs=("shape",))
def reshape(x: torch.Tensor, shape: list[int]) -> torch.Tensor:
    """Same elements, new shape (one entry may be -1)."""
    return x.reshape(shape)


@register("repeat", arity=1, kind="opaque", attrs=("repeats",), dim_attrs=("repeats",))
def repeat(x: torch.Tensor, repeats: list[int]) -> torch.Tensor:
    """Tile x: axis i repeated repeats[i] times (leading new axes allowed)."""
    return x.repeat(repeats)


@register("permute", arity=1, kind="opaque", attrs=("dims",))
def permute(x: torch.Tensor, dims: list[int]) -> torch.Tensor:
    """Reorder axes: output axis i is input axis dims[i]."""
    return x.permute(dims)


@register("expand", arity=1, kind="opaque", attrs=("shape",), dim_attrs=("shape",))
def expand(x: torch.Tensor, shape: list[int]) -> torch.Tensor:
    """Broadcast size-1 axes to shape (-1 keeps an axis)."""
    return x.expand(shape)


@register("slice", arity=1, kind="dim", attrs=("dim", "start", "end", "step"), dim_attrs=("start", "end"))
def slice_(x: torch.Tensor, dim: int, start: int, end: int, step: int) -> torch.Tensor:
    """x[start:end:step] along dim (bounds clamped as in Python)."""
    idx = [slice(None)] * x.dim()
    idx[dim] = slice(start, end, step)
    return x[tuple(idx)]


# -- combining and indexing ------------------------------------------------------------------


@register("cat", arity=None, kind="dim", attrs=("dim",))
def cat(*xs: torch.Tensor, dim: int) -> torch.Tensor:
    """Concatenate along dim."""
    return torch.cat(xs, dim=dim)


@register("index_select", arity=2, kind="dim", attrs=("dim",), scalar_inputs=False)
def index_select(x: torch.Tensor, index: torch.Tensor, dim: int) -> torch.Tensor:
    """Rows of x along dim at the positions of a 1-D index."""
    return torch.index_select(x, dim, index)


@register("gather", arity=2, kind="dim", attrs=("dim",), scalar_inputs=False)
def gather(x: torch.Tensor, index: torch.Tensor, dim: int) -> torch.Tensor:
    """torch.gather along dim."""
    return torch.gather(x, dim, index)


@register("index", arity=(2, 9), kind="opaque", attrs=("axes",), scalar_inputs=False)
def index(x: torch.Tensor, *indices: torch.Tensor, axes: list[int]) -> torch.Tensor:
    """Advanced indexing: x[..., indices[0] at axes[0], ...] (NumPy rules, as torch's x[idx])."""
    key: list[object] = [slice(None)] * x.dim()
    for axis, idx in zip(axes, indices, strict=True):
        key[axis] = idx
    return x[tuple(key)]


@register("scatter_add", arity=3, kind="dim", attrs=("dim",), scalar_inputs=False)
def scatter_add(x: torch.Tensor, index: torch.Tensor, src: torch.Tensor, dim: int) -> torch.Tensor:
    """x with src added at index along dim (out of place)."""
    return torch.scatter_add(x, dim, index, src)


@register("scatter", arity=3, kind="dim", attrs=("dim",), scalar_inputs=False)
def scatter(x: torch.Tensor, index: torch.Tensor, src: torch.Tensor, dim: int) -> torch.Tensor:
    """x with src written at index along dim (out of place)."""
    return torch.scatter(x, dim, index, src)


@register("repeat_interleave", arity=1, kind="dim", attrs=("repeats", "dim"))
def repeat_interleave(x: torch.Tensor, repeats: int, dim: int) -> torch.Tensor:
    """Repeat each element `repeats` times along dim."""
    return torch.repeat_interleave(x, repeats, dim=dim)


@register("flip", arity=1, kind="opaque", attrs=("dims",))
def flip(x: torch.Tensor, dims: list[int]) -> torch.Tensor:
    """Reverse the order along dims."""
    return torch.flip(x, dims)


@register("tril", arity=1, kind="opaque", attrs=("diagonal",))
def tril(x: torch.Tensor, diagonal: int) -> torch.Tensor:
    """Lower triangle of the last two axes."""
    return torch.tril(x, diagonal)


@register("triu", arity=1, kind="opaque", attrs=("diagonal",))
def triu(x: torch.Tensor, diagonal: int) -> torch.Tensor:
    """Upper triangle of the last two axes."""
    return torch.triu(x, diagonal)


# -- tensors made from sizes -----------------------------------------------------------------


@register("arange", arity=0, attrs=("start", "end", "step", "dtype"), dim_attrs=("start", "end"), device_arg=True)
def arange(start: int, end: int, step: int, dtype: str, device: torch.device | str | None = None) -> torch.Tensor:
    """start, start+step, ... below end (on `device`, which the executor passes)."""
    return torch.arange(start, end, step, dtype=torch_dtype(dtype), device=device)


@register("full", arity=0, attrs=("shape", "value", "dtype"), dim_attrs=("shape",), device_arg=True)
def full(shape: list[int], value: float, dtype: str, device: torch.device | str | None = None) -> torch.Tensor:
    """A tensor of one value (on `device`, which the executor passes)."""
    return torch.full(shape, value, dtype=torch_dtype(dtype), device=device)


@register("full_like", arity=1, kind="elementwise", attrs=("value", "dtype"))
def full_like(x: torch.Tensor, value: float, dtype: str) -> torch.Tensor:
    """A tensor of one value, shaped like x."""
    return torch.full_like(x, value, dtype=torch_dtype(dtype))
