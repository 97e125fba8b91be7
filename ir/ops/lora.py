"""lora: the low-rank update of a linear layer, one adapter per token (multi-LoRA batches).

    lora(x [T, K], a [NL, R, K], b [NL, N, R], index [T] int32[, base [T, N]]) -> [T, N]

    y[t] = base[t] + b[index[t]] @ (a[index[t]] @ x[t])   for index[t] >= 0
    y[t] = base[t]                                         for index[t] == -1 (the base model)

base (x's dtype) is optional: without it, it is zero. The update is computed in x's dtype and
then added to base in that dtype.

NL adapter slots (a symbolic dim: the engine decides how many), R the slot rank (the largest
rank the artifact serves; an adapter of smaller rank is zero-padded). The adapter's scaling
(alpha / r, or alpha / sqrt(r) with rslora) is folded into b when a slot is filled: the op has
none. The lora pass puts it after a linear, its result the base: lora(x, A, B, lora_index,
linear(x, W)), so the kernel adds the update where it writes it (no separate add).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from kiln.errors import VerifyError
from kiln.ir.ops.registry import register
from kiln.ir.types import FLOAT_DTYPES, TensorType, ValueType

INDEX_DTYPE = "int32"
"""The dtype of the per-token slot index."""


def _infer(types: Sequence[ValueType], attrs: Mapping[str, Any]) -> TensorType:
    x, a, b, index = types[:4]
    if not all(isinstance(t, TensorType) for t in types):
        raise VerifyError(f"lora reads tensors, got {', '.join(map(str, types))}")
    if x.rank != 2 or a.rank != 3 or b.rank != 3 or index.rank != 1:
        raise VerifyError(f"lora takes x [T, K], a [NL, R, K], b [NL, N, R], index [T]; got {x}, {a}, {b}, {index}")
    if x.dtype not in FLOAT_DTYPES or a.dtype != x.dtype or b.dtype != x.dtype:
        raise VerifyError(f"lora: x, a and b must share one float dtype, got {x.dtype}, {a.dtype}, {b.dtype}")
    if index.dtype != INDEX_DTYPE:
        raise VerifyError(f"lora: index must be {INDEX_DTYPE} (a slot per token, -1 for none), got {index.dtype}")
    if a.shape[0] != b.shape[0] or a.shape[1] != b.shape[2]:
        raise VerifyError(f"lora: a {a} and b {b} disagree on slots or rank (a [NL, R, K], b [NL, N, R])")
    if a.shape[2] != x.shape[1] or index.shape[0] != x.shape[0]:
        raise VerifyError(f"lora: x {x}, a {a} and index {index} disagree on K or T")
    out = TensorType(x.dtype, (x.shape[0], b.shape[1]))
    if len(types) == 5 and not out.same_as(types[4]):
        raise VerifyError(f"lora: base {types[4]} must be the result's type {out} (x's dtype, [T, N])")
    return out


@register("lora", arity=(4, 5), kind="opaque", infer=_infer, scalar_inputs=False, kernel=True)
def lora(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, index: torch.Tensor,
         base: torch.Tensor | None = None) -> torch.Tensor:
    """base[t] + b[index[t]] @ (a[index[t]] @ x[t]) per token t, base[t] (0 without base) where
    index[t] is -1."""
    live = index >= 0  # [T]
    slot = index.clamp(min=0).long()  # [T]
    shrunk = torch.bmm(a[slot], x.unsqueeze(-1))  # [T, R, 1]
    y = torch.bmm(b[slot], shrunk).squeeze(-1)  # [T, N]
    y = y * live.unsqueeze(-1).to(y.dtype)
    return y if base is None else base + y
