"""Reductions and ops along one axis: sums and means, softmax, cumulative sums, top-k."""

from __future__ import annotations

import torch

from kiln.ir.ops.registry import register
from kiln.ir.types import torch_dtype

# -- reductions over `dims` ------------------------------------------------------------------

_REDUCE = {"sum": torch.sum, "mean": torch.mean, "amax": torch.amax, "amin": torch.amin}
for _name, _fn in _REDUCE.items():
    register(_name, arity=1, kind="reduce", attrs=("dims", "keepdim"), optional_attrs=("dtype",))(
        lambda x, dims, keepdim, dtype=None, _fn=_fn: (
            _fn(x, dim=dims, keepdim=keepdim) if dtype is None else _fn(x.to(torch_dtype(dtype)), dim=dims, keepdim=keepdim)
        )
    )


@register("var", arity=1, kind="reduce", attrs=("dims", "keepdim", "correction"))
def var(x: torch.Tensor, dims: list[int], keepdim: bool, correction: float) -> torch.Tensor:
    """Variance over dims with Bessel-style correction."""
    return torch.var(x, dim=dims, keepdim=keepdim, correction=correction)


@register("logsumexp", arity=1, kind="reduce", attrs=("dims", "keepdim"))
def logsumexp(x: torch.Tensor, dims: list[int], keepdim: bool) -> torch.Tensor:
    """log(sum(exp(x))) over dims, computed stably."""
    return torch.logsumexp(x, dim=dims, keepdim=keepdim)


@register("vector_norm", arity=1, kind="reduce", attrs=("ord", "dims", "keepdim"))
def vector_norm(x: torch.Tensor, ord: float, dims: list[int], keepdim: bool) -> torch.Tensor:
    """The ord-norm over dims."""
    return torch.linalg.vector_norm(x, ord=ord, dim=dims, keepdim=keepdim)


@register("argmax", arity=1, kind="dim", attrs=("dim", "keepdim"))
def argmax(x: torch.Tensor, dim: int, keepdim: bool) -> torch.Tensor:
    """Index of the largest element along dim."""
    return torch.argmax(x, dim=dim, keepdim=keepdim)


@register("max_dim", arity=1, kind="dim", attrs=("dim", "keepdim", "output"))
def max_dim(x: torch.Tensor, dim: int, keepdim: bool, output: int) -> torch.Tensor:
    """torch.max along dim: output 0 is the values, 1 the indices."""
    return torch.max(x, dim=dim, keepdim=keepdim)[output]


# -- along one axis --------------------------------------------------------------------------


@register("softmax", arity=1, kind="dim", attrs=("dim",), optional_attrs=("dtype",))
def softmax(x: torch.Tensor, dim: int, dtype: str | None = None) -> torch.Tensor:
    """Softmax along dim, computed in dtype when given."""
    return torch.softmax(x, dim=dim, dtype=torch_dtype(dtype) if dtype else None)


@register("log_softmax", arity=1, kind="dim", attrs=("dim",), optional_attrs=("dtype",))
def log_softmax(x: torch.Tensor, dim: int, dtype: str | None = None) -> torch.Tensor:
    """Log-softmax along dim."""
    return torch.log_softmax(x, dim=dim, dtype=torch_dtype(dtype) if dtype else None)


@register("cumsum", arity=1, kind="dim", attrs=("dim",), optional_attrs=("dtype",))
def cumsum(x: torch.Tensor, dim: int, dtype: str | None = None) -> torch.Tensor:
    """Inclusive prefix sum along dim."""
    return torch.cumsum(x, dim=dim, dtype=torch_dtype(dtype) if dtype else None)


@register("topk", arity=1, kind="dim", attrs=("k", "dim", "largest", "sorted", "output"))
def topk(x: torch.Tensor, k: int, dim: int, largest: bool, sorted: bool, output: int) -> torch.Tensor:
    """The k largest (or smallest) along dim: output 0 is the values, 1 the indices."""
    return torch.topk(x, k, dim=dim, largest=largest, sorted=sorted)[output]


@register("sort", arity=1, kind="dim", attrs=("dim", "descending", "output"))
def sort(x: torch.Tensor, dim: int, descending: bool, output: int) -> torch.Tensor:
    """Stable sort along dim: output 0 is the values, 1 the indices."""
    return torch.sort(x, dim=dim, descending=descending, stable=True)[output]
