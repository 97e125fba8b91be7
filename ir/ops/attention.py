"""Attention over a flattened batch of sequences (the op every architecture's attention becomes).

Layout: the sequences of one step are concatenated along the token axis.

    q: [T, Hq, D]   k: [T, Hkv, D]   v: [T, Hkv, Dv]   cu_seqlens: int32 [S+1]
    tokens cu_seqlens[s] : cu_seqlens[s+1] belong to sequence s, which attends only to itself.

A leading batch axis of size 1 (graphs straight from tracing) is accepted and kept.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from kiln.ir.ops.registry import register
from kiln.ir.types import TensorType


def attention_scores_to_output(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    q_pos: torch.Tensor,
    k_pos: torch.Tensor,
    *,
    scale: float,
    causal: bool,
    sliding_window: int,
    softcap: float,
    sinks: torch.Tensor | None,
) -> torch.Tensor:
    """One sequence, as transformers' eager attention computes it (scores in the input dtype,
    softmax in float32). q: [L, Hq, D], k/v: [M, Hkv, D]; positions give causality and window."""
    hq, hkv = q.shape[1], k.shape[1]
    qh = q.transpose(0, 1)  # [Hq, L, D]
    kh = k.transpose(0, 1).repeat_interleave(hq // hkv, dim=0)  # [Hq, M, D]
    vh = v.transpose(0, 1).repeat_interleave(hq // hkv, dim=0)  # [Hq, M, Dv]
    scores = torch.matmul(qh, kh.transpose(1, 2)) * scale  # [Hq, L, M]
    if softcap:
        scores = torch.tanh(scores / softcap) * softcap
    allowed = torch.ones(q_pos.shape[0], k_pos.shape[0], dtype=torch.bool, device=q.device)
    delta = q_pos[:, None] - k_pos[None, :]
    if causal:
        allowed &= delta >= 0
    if sliding_window:
        allowed &= delta < sliding_window
    scores = scores.masked_fill(~allowed, float("-inf"))
    if sinks is not None:
        sink = sinks.reshape(hq, 1, 1).expand(hq, scores.shape[1], 1).to(scores.dtype)
        probs = torch.softmax(torch.cat([scores, sink], dim=-1), dim=-1, dtype=torch.float32)[..., :-1]
    else:
        probs = torch.softmax(scores, dim=-1, dtype=torch.float32)
    probs = torch.nan_to_num(probs).to(q.dtype)  # a row with nothing allowed attends to nothing
    return torch.matmul(probs, vh).transpose(0, 1)  # [L, Hq, Dv]


def _infer(types: Sequence[TensorType], attrs: Mapping[str, Any]) -> TensorType:
    q, _, v = types[:3]
    return TensorType(q.dtype, (*q.shape[:-1], v.shape[-1]))


@register(
    "attention",
    arity=(4, 5),
    attrs=("scale", "causal", "sliding_window", "softcap"),
    infer=_infer,
    scalar_inputs=False,
)
def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor,
    sinks: torch.Tensor | None = None,
    *,
    scale: float,
    causal: bool,
    sliding_window: int,
    softcap: float,
) -> torch.Tensor:
    """Per-sequence attention of a flattened batch; inputs (q, k, v, cu_seqlens[, sinks]).
    sliding_window 0 and softcap 0.0 mean none; sinks [Hq] are per-head logits that take
    probability mass without contributing a value."""
    batched = q.dim() == 4
    if batched:
        q, k, v = q[0], k[0], v[0]
    out = q.new_empty(*q.shape[:-1], v.shape[-1])
    bounds = cu_seqlens.tolist()
    for start, end in zip(bounds[:-1], bounds[1:], strict=True):
        pos = torch.arange(end - start, device=q.device)
        out[start:end] = attention_scores_to_output(
            q[start:end], k[start:end], v[start:end], pos, pos,
            scale=scale, causal=causal, sliding_window=sliding_window, softcap=softcap, sinks=sinks,
        )
    return out[None] if batched else out
