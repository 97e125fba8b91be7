"""The opaque attention op that every traced architecture routes its attention through.

transformers calls the function registered under ATTN_IMPLEMENTATION with the module and the
projected, rotated q/k/v ([B, H, T, D]). We read what the mask would have meant (causal,
sliding window, soft-cap, sinks, scale) off the call and the module, and emit one
`kiln::attention` node that carries them; the converter turns it into the IR's `attention`.
"""

from __future__ import annotations

import math

import torch
from transformers import AttentionInterface

from kiln.errors import UnsupportedOpError
from kiln.ir.ops.attention import attention as reference_attention

ATTN_IMPLEMENTATION = "kiln"

_lib = torch.library.Library("kiln", "FRAGMENT")
_lib.define(
    "attention(Tensor q, Tensor k, Tensor v, Tensor? sinks, float scale, bool causal, "
    "int sliding_window, float softcap) -> Tensor"
)


def _whole_batch_attention(q, k, v, sinks, scale, causal, sliding_window, softcap):
    # q: [B, H, T, D] -> [B, T, H, Dv]; each batch row is one sequence.
    outs = []
    for b in range(q.shape[0]):
        t = q.shape[2]
        cu = torch.tensor([0, t], dtype=torch.int32)
        outs.append(
            reference_attention(
                q[b].transpose(0, 1), k[b].transpose(0, 1), v[b].transpose(0, 1), cu, sinks,
                scale=scale, causal=causal, sliding_window=sliding_window, softcap=softcap,
            )
        )
    return torch.stack(outs)


torch.library.impl(_lib, "attention", "CompositeExplicitAutograd")(_whole_batch_attention)


@torch.library.register_fake("kiln::attention", lib=_lib)
def _fake(q, k, v, sinks, scale, causal, sliding_window, softcap):
    return q.new_empty(q.shape[0], q.shape[2], q.shape[1], v.shape[3])


def kiln_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0,
                   sliding_window=None, softcap=None, s_aux=None, **kwargs):
    """transformers attention interface: returns ([B, T, H, Dv], None)."""
    if attention_mask is not None:
        raise UnsupportedOpError(
            f"attention with an explicit mask ({type(module).__name__})",
            hint="the model builds its own attention mask; kiln applies causal and sliding-window "
            "masking itself and cannot honour an arbitrary mask tensor",
        )
    if getattr(module, "is_causal", True) is False:
        raise UnsupportedOpError(
            f"bidirectional attention ({type(module).__name__})",
            hint="kiln serves decoder-only models; this attention layer is not causal",
        )
    scale = float(scaling) if scaling is not None else 1.0 / math.sqrt(query.shape[-1])
    out = torch.ops.kiln.attention(
        query, key, value, s_aux, scale, True, int(sliding_window or 0), float(softcap or 0.0)
    )
    return out, None


AttentionInterface.register(ATTN_IMPLEMENTATION, kiln_attention)
