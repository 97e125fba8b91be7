"""Neural-network ops: projections, matmuls, embeddings, norms."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kiln.ir.ops.kernels import rms_normalize
from kiln.ir.ops.registry import register


@register("linear", arity=(2, 3), kind="opaque", scalar_inputs=False, kernel=True)
def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x @ weight.T (+ bias); weight: [out, in]."""
    return F.linear(x, weight, bias)


@register("matmul", arity=2, kind="opaque", scalar_inputs=False)
def matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Batched matrix product with NumPy broadcasting of leading axes."""
    return torch.matmul(a, b)


@register("embedding", arity=2, kind="opaque", scalar_inputs=False, kernel=True)
def embedding(weight: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Rows of weight [V, H] for integer ids of any shape."""
    return F.embedding(ids, weight)


@register("layer_norm", arity=(1, 3), kind="opaque", attrs=("normalized_shape", "eps"),
          optional_attrs=("has_weight", "has_bias"), scalar_inputs=False, kernel=True)
def layer_norm(x: torch.Tensor, *wb: torch.Tensor, normalized_shape: list[int], eps: float,
               has_weight: bool = True, has_bias: bool = True) -> torch.Tensor:
    """LayerNorm over the trailing normalized_shape axes; inputs (x[, weight][, bias])."""
    it = iter(wb)
    weight = next(it) if has_weight else None
    bias = next(it) if has_bias else None
    return F.layer_norm(x, normalized_shape, weight, bias, eps)


@register("rms_norm", arity=(1, 2), kind="opaque", attrs=("normalized_shape", "eps"),
          optional_attrs=("offset", "weight_fp32"), scalar_inputs=False, kernel=True)
def rms_norm(x: torch.Tensor, weight: torch.Tensor | None = None, *, normalized_shape: list[int],
             eps: float, offset: float | None = None, weight_fp32: bool | None = None) -> torch.Tensor:
    """RMSNorm over the trailing normalized_shape axes. Without offset/weight_fp32, as
    torch.nn.functional.rms_norm; with them, over the last axis as transformers' modules
    compute it (see kernels.rms_normalize: Llama, Gemma's 1 + w, OLMo2)."""
    if offset is None and weight_fp32 is None:
        return F.rms_norm(x, normalized_shape, weight, eps)
    return rms_normalize(x, weight, eps, offset or 0.0, bool(weight_fp32))


@register("einsum", arity=None, kind="opaque", attrs=("equation",), scalar_inputs=False)
def einsum(*xs: torch.Tensor, equation: str) -> torch.Tensor:
    """Einstein summation over the operands."""
    return torch.einsum(equation, *xs)
