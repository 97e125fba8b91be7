"""Neural-network ops: projections, matmuls, embeddings, norms."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F

from kiln.errors import VerifyError
from kiln.ir.dims import dims_equal, from_expr, to_expr
from kiln.ir.ops.kernels import rms_normalize
from kiln.ir.ops.registry import register
from kiln.ir.types import TensorType


@register("linear", arity=(2, 3), kind="opaque", optional_attrs=("weight_layout",), scalar_inputs=False,
          infer=lambda types, attrs: _linear_infer(types, attrs), kernel=True)
def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, *,
           weight_layout: str = "out_in") -> torch.Tensor:
    """x @ weight.T (+ bias); weight [out, in], or in a layout a target asks for, stored that way
    by weight folding: [in, out] ("in_out"), or [out / nb, in, nb] ("panels": nb output columns
    per panel, each input's nb weights contiguous; kiln.passes.weight_panels)."""
    if weight_layout == "panels":
        weight = weight.transpose(1, 2).reshape(-1, weight.shape[1])
    elif weight_layout == "in_out":
        out = x @ weight
        return out + bias if bias is not None else out
    return F.linear(x, weight, bias)


LINEAR_LAYOUTS = ("out_in", "in_out", "panels")


def _linear_infer(types: Sequence[TensorType], attrs: Mapping[str, Any]) -> TensorType:
    x, w = types[:2]
    layout = attrs.get("weight_layout", "out_in")
    if layout not in LINEAR_LAYOUTS:
        raise VerifyError(f"linear weight_layout '{layout}' is not one of {', '.join(LINEAR_LAYOUTS)}")
    if w.rank != (3 if layout == "panels" else 2):
        raise VerifyError(f"linear {layout} weight {w}: expected " + ("[out / nb, in, nb]" if layout == "panels" else "rank 2"))
    if layout == "panels":
        k, n = w.shape[1], from_expr(to_expr(w.shape[0]) * to_expr(w.shape[2]))
    else:
        k, n = (w.shape[1], w.shape[0]) if layout == "out_in" else (w.shape[0], w.shape[1])
    if not dims_equal(x.shape[-1], k):
        raise VerifyError(f"linear of {x} by a {layout} weight {w}: inner dims differ")
    if len(types) == 3 and (types[2].rank != 1 or not dims_equal(types[2].shape[0], n)):
        raise VerifyError(f"linear bias {types[2]} does not match {n} outputs")
    return TensorType(x.dtype, (*x.shape[:-1], n))


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
