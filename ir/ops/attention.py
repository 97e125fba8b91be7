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
        # As transformers computes sinks: max-subtracted softmax in the scores' own dtype.
        sink = sinks.reshape(hq, 1, 1).expand(hq, scores.shape[1], 1).to(scores.dtype)
        combined = torch.cat([scores, sink], dim=-1)
        combined = combined - combined.amax(dim=-1, keepdim=True)
        probs = torch.softmax(combined, dim=-1, dtype=combined.dtype)[..., :-1]
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


# -- paged attention ------------------------------------------------------------------------
#
# The KV cache of one layer is a tensor of fixed-size blocks; a sequence's block table lists
# the physical blocks holding its tokens in order, and the slot of token j of a sequence is
# block_tables[s, j // BS] * BS + j % BS:
#
#   k_cache: [NB, BS, Hkv, D]        block_tables[s] = [7, 2, 9]   (BS = 4)
#   tokens 0..3 -> block 7, 4..7 -> block 2, 8..9 -> block 9 (slots 36, 37)
#
# Per step: kv_cache_write stores the new tokens' k/v at their slots, then paged_attention
# reads them back with the cached context. q holds the new tokens of S sequences (cu_seqlens:
# query start offsets);
# seq_lens[s] is sequence s's length including them, so its queries sit at positions
# seq_lens[s] - q_len .. seq_lens[s] - 1 and attend to keys 0 .. seq_lens[s] - 1.
#
# With a sliding window W, only the blocks from the one holding position first_query - W + 1
# on are read: the runtime may have freed the earlier ones (their table entries then point at
# a placeholder or at a block another sequence now owns).
#
#   W = 6, BS = 4, queries at 10..11:   table [ -  b2 b9 ]   keys 5..11 needed: read b2, b9


def _paged_infer(types: Sequence[TensorType], attrs: Mapping[str, Any]) -> TensorType:
    q, _, v_cache = types[:3]
    return TensorType(q.dtype, (*q.shape[:-1], v_cache.shape[-1]))


@register(
    "paged_attention",
    arity=(6, 7),
    attrs=("scale", "causal", "sliding_window", "softcap"),
    infer=_paged_infer,
    scalar_inputs=False,
    kernel=True,
)
def paged_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    cu_seqlens: torch.Tensor,
    sinks: torch.Tensor | None = None,
    *,
    scale: float,
    causal: bool,
    sliding_window: int,
    softcap: float,
) -> torch.Tensor:
    """Attend each sequence's new queries over its cached keys through its block table;
    inputs (q [T,Hq,D], k_cache/v_cache [NB,BS,Hkv,D] already holding this step's K/V (the
    kv_cache_write results), block_tables [S,MB], seq_lens [S], cu_seqlens [S+1][, sinks
    [Hq]]). Sequences without queries (seq_len 0 padding) are skipped; padded rows are 0."""
    bs, hkv = k_cache.shape[1:3]
    out = q.new_zeros(*q.shape[:-1], v_cache.shape[-1])
    bounds = cu_seqlens.tolist()
    for s, ctx in enumerate(seq_lens.tolist()):
        start, end = bounds[s], bounds[s + 1]
        if end == start or ctx == 0:
            continue
        first_q = ctx - (end - start)
        # Only blocks that can hold a key in the first query's window: the runtime frees (and
        # reuses) the blocks before it, whose garbage must not reach probs @ V (NaN * 0 = NaN).
        lo = max(first_q - sliding_window + 1, 0) // bs if sliding_window else 0
        blocks = block_tables[s, lo : (ctx + bs - 1) // bs].long()
        keys = k_cache[blocks].reshape(-1, hkv, k_cache.shape[-1])[: ctx - lo * bs]  # [ctx - lo*BS, Hkv, D]
        vals = v_cache[blocks].reshape(-1, hkv, v_cache.shape[-1])[: ctx - lo * bs]
        q_pos = torch.arange(first_q, ctx, device=q.device)
        out[start:end] = attention_scores_to_output(
            q[start:end], keys, vals, q_pos, torch.arange(lo * bs, ctx, device=q.device),
            scale=scale, causal=causal, sliding_window=sliding_window, softcap=softcap, sinks=sinks,
        )
    return out
