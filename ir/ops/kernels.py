"""The kernel op set: the high-level ops passes produce and every target implements as a kernel.

Layouts (T tokens of a step, H heads, D head size, E experts):

    rope            x [T, H, D], positions [T], cos/sin tables [P, R] -> [T, H, D]
    kv_cache_write  k [T, Hkv, D], v [T, Hkv, Dv], caches [NB, BS, Hkv, D|Dv], slots [T]
                    -> (k_cache, v_cache), written in place (slot -1: no write)
    fused_add_rms_norm  x, residual [T, H], weight [H] -> (rms_norm(x + residual), x + residual)
    silu_and_mul / gelu_and_mul  x [.., 2I] -> act(x[.., :I]) * x[.., I:]
    gated_linear    x [T, 2I], weight [N, I] (bias [N]) -> (h @ weight^T + bias, h) for
                    h = the gated activation of x (the cuda pipeline fuses the down projection's
                    input activation; h is where a kernel that does not fuse it writes it)
    expert_linear   x [N, K], weight [E, M, K], expert ids [N] -> [N, M]

`linear`, `embedding`, `layer_norm`, `rms_norm` and `paged_attention` are registered with the
ops they generalize (nn.py, attention.py) and flagged `kernel=True` there.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F

from kiln.errors import VerifyError
from kiln.ir.ops.registry import register
from kiln.ir.types import TensorType, TupleType, ValueType

# -- results of multi-result ops -------------------------------------------------------------


def _result_infer(types: Sequence[ValueType], attrs: Mapping[str, Any]) -> TensorType:
    (t,) = types
    if not isinstance(t, TupleType):
        raise VerifyError(f"get_result reads a single-result value of type {t}")
    if not 0 <= attrs["index"] < len(t.types):
        raise VerifyError(f"get_result index {attrs['index']} out of range for {t}")
    return t.types[attrs["index"]]


@register("get_result", arity=1, kind="opaque", attrs=("index",), infer=_result_infer)
def get_result(x: tuple[torch.Tensor, ...], index: int) -> torch.Tensor:
    """Result `index` of a multi-result op (no computation: names that result's buffer)."""
    return x[index]


# -- norms ------------------------------------------------------------------------------------


def rms_normalize(x: torch.Tensor, weight: torch.Tensor | None, eps: float, offset: float,
                  weight_fp32: bool) -> torch.Tensor:
    """RMSNorm over the last axis as transformers' modules compute it: statistics in float32;
    then either cast to x's dtype and multiply by the weight (Llama), or multiply by
    (offset + weight) in float32 and cast (Gemma: offset 1; OLMo2: offset 0)."""
    x32 = x.float()
    y = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    if weight is None:
        return y.to(x.dtype)
    if weight_fp32:
        return (y * (weight.float() + offset)).to(x.dtype)
    w = weight + offset if offset else weight
    return w * y.to(x.dtype)


def _fused_norm_infer(types: Sequence[ValueType], attrs: Mapping[str, Any]) -> TupleType:
    x, res = types[:2]
    if not isinstance(x, TensorType) or not x.same_as(res):
        raise VerifyError(f"fused_add_rms_norm needs x and residual of one type, got {x} and {res}")
    return TupleType((x, x))


@register("fused_add_rms_norm", arity=(2, 3), kind="opaque", attrs=("eps", "offset", "weight_fp32"),
          infer=_fused_norm_infer, scalar_inputs=False, kernel=True)
def fused_add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor | None = None, *,
                       eps: float, offset: float, weight_fp32: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(rms_norm(x + residual), x + residual): the residual add in x's dtype, then the norm
    (see rms_normalize for offset and weight_fp32)."""
    h = x + residual
    return rms_normalize(h, weight, eps, offset, weight_fp32), h


# -- rotary embedding -------------------------------------------------------------------------


LONG_ROPE_META = "long_rope"
"""graph.meta key the frontend writes for longrope models (kiln.frontend.rope): a list of
{"param": inv_freq param name, "long_inv_freq": [...], "long_after": original max length}."""


@register("rope", arity=(4, 8), kind="opaque", attrs=("style", "rotary_dim"), optional_attrs=("long_after",),
          scalar_inputs=False, kernel=True)
def rope(x: torch.Tensor, positions: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
         cos_long: torch.Tensor | None = None, sin_long: torch.Tensor | None = None,
         total_lens: torch.Tensor | None = None, cu_seqlens: torch.Tensor | None = None, *,
         style: str, rotary_dim: int, long_after: int | None = None) -> torch.Tensor:
    """Rotary embedding of the first rotary_dim features of each head: x [T, H, D], positions
    [T], cos/sin [P, rotary_dim] tables (row p: the values at position p, as the model computes
    them, scaling included). style "neox" rotates halves (x1, x2) -> (-x2, x1); "interleaved"
    rotates pairs (x0, x1) -> (-x1, x0). Computed as x * cos + rotate(x) * sin in torch's
    promotion of x and the tables, exactly as transformers does. Longrope models pass a second
    pair of tables with total_lens [S] and cu_seqlens [S+1]: a token whose sequence is longer
    than long_after (its whole length so far) reads the long pair, as transformers does for a
    sequence run in one forward pass (the engine recomputes a sequence that grows past it)."""
    r = rotary_dim
    c = cos[positions]  # [T, R]
    s = sin[positions]  # [T, R]
    if cos_long is not None:
        tokens = torch.arange(x.shape[0], device=x.device, dtype=cu_seqlens.dtype)  # [T]
        seq = torch.searchsorted(cu_seqlens[1:], tokens, right=True).clamp_(max=total_lens.shape[0] - 1)  # [T]
        long_rows = (total_lens[seq] > long_after).unsqueeze(1)  # [T, 1]; padded rows: either pair
        c = torch.where(long_rows, cos_long[positions], c)
        s = torch.where(long_rows, sin_long[positions], s)
    c, s = c.unsqueeze(-2), s.unsqueeze(-2)  # [T, 1, R]
    xr = x[..., :r]  # [T, H, R]
    if style == "neox":
        rot = torch.cat([-xr[..., r // 2 :], xr[..., : r // 2]], dim=-1)
    elif style == "interleaved":
        rot = torch.stack([-xr[..., 1::2], xr[..., 0::2]], dim=-1).flatten(-2)
    else:
        raise ValueError(f"rope style '{style}' is not 'neox' or 'interleaved'")
    out = xr * c + rot * s
    if r == x.shape[-1]:
        return out
    return torch.cat([out, x[..., r:].to(out.dtype)], dim=-1)


# -- KV cache ---------------------------------------------------------------------------------


def _cache_write_infer(types: Sequence[ValueType], attrs: Mapping[str, Any]) -> TupleType:
    return TupleType((types[2], types[3]))


@register("kv_cache_write", arity=5, kind="opaque", infer=_cache_write_infer, scalar_inputs=False,
          writes=(2, 3), kernel=True)
def kv_cache_write(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                   slot_mapping: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Store this step's k [T, Hkv, D] and v [T, Hkv, Dv] at their cache slots (block *
    BS + offset; -1 writes nothing: a padded row) in k_cache/v_cache [NB, BS, Hkv, D|Dv], in
    place; the results are the written caches."""
    nb, bs, hkv = k_cache.shape[:3]
    keep = slot_mapping >= 0
    slots = slot_mapping[keep]
    k_cache.view(nb * bs, hkv, -1).index_copy_(0, slots, k[keep].to(k_cache.dtype))
    v_cache.view(nb * bs, hkv, -1).index_copy_(0, slots, v[keep].to(v_cache.dtype))
    return k_cache, v_cache


# -- activations ------------------------------------------------------------------------------


def _gated_infer(types: Sequence[ValueType], attrs: Mapping[str, Any]) -> TensorType:
    (x,) = types
    last = x.shape[-1]
    if not isinstance(last, int) or last % 2:
        raise VerifyError(f"a gated activation needs an even last dim, got {x}")
    return TensorType(x.dtype, (*x.shape[:-1], last // 2))


@register("silu_and_mul", arity=1, kind="opaque", infer=_gated_infer, kernel=True)
def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up for x = [gate | up] along the last axis (the merged gate/up GEMM)."""
    i = x.shape[-1] // 2
    return F.silu(x[..., :i]) * x[..., i:]


@register("gelu_and_mul", arity=1, kind="opaque", attrs=("approximate",), infer=_gated_infer, kernel=True)
def gelu_and_mul(x: torch.Tensor, approximate: str) -> torch.Tensor:
    """gelu(gate) * up for x = [gate | up] along the last axis."""
    i = x.shape[-1] // 2
    return F.gelu(x[..., :i], approximate=approximate) * x[..., i:]


GATES = ("silu_and_mul", "gelu_and_mul")
"""The gated activations `gated_linear` fuses."""


def _gated_linear_infer(types: Sequence[ValueType], attrs: Mapping[str, Any]) -> TupleType:
    x, w = types[:2]
    h = _gated_infer([x], attrs)
    if attrs["gate"] not in GATES or w.rank != 2 or w.shape[1] != h.shape[-1]:
        raise VerifyError(f"gated_linear ({attrs['gate']}) of {x} by a weight {w}: expected a gate of "
                          f"{', '.join(GATES)} and a weight [N, {h.shape[-1]}]")
    return TupleType((TensorType(x.dtype, (*x.shape[:-1], w.shape[0])), h))


@register("gated_linear", arity=(2, 3), kind="opaque", attrs=("gate",), optional_attrs=("approximate",),
          infer=_gated_linear_infer, scalar_inputs=False, kernel=True)
def gated_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, *, gate: str,
                 approximate: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(linear(h, weight, bias), h) for h = gate(x): silu_and_mul, or gelu_and_mul with approximate."""
    h = silu_and_mul(x) if gate == "silu_and_mul" else gelu_and_mul(x, approximate)
    return F.linear(h, weight, bias), h


@register("softcap", arity=1, kind="elementwise", attrs=("cap",), kernel=True)
def softcap(x: torch.Tensor, cap: float) -> torch.Tensor:
    """tanh(x / cap) * cap (attention and final-logit soft-capping)."""
    return torch.tanh(x / cap) * cap


# -- gathers ----------------------------------------------------------------------------------


@register("gather_rows", arity=2, kind="opaque", scalar_inputs=False, kernel=True)
def gather_rows(x: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """Rows indices [R] of x [T, ...] (the last-token gather before the LM head)."""
    return x.index_select(0, indices)


# -- mixture of experts -----------------------------------------------------------------------


def _expert_infer(types: Sequence[ValueType], attrs: Mapping[str, Any]) -> TensorType:
    x, w, ids = types
    if x.rank != 2 or w.rank != 3 or ids.rank != 1:
        raise VerifyError(f"expert_linear takes x [N, K], weight [E, M, K], ids [N]; got {x}, {w}, {ids}")
    return TensorType(x.dtype, (x.shape[0], w.shape[1]))


@register("expert_linear", arity=3, kind="opaque", infer=_expert_infer, scalar_inputs=False, kernel=True)
def expert_linear(x: torch.Tensor, weight: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Row n of x times expert ids[n]'s weight: out[n] = weight[ids[n]] @ x[n] (a grouped GEMM
    over the rows routed to each expert)."""
    out = x.new_empty(x.shape[0], weight.shape[1])
    for e in ids.unique().tolist():
        rows = (ids == e).nonzero().squeeze(1)
        out[rows] = x[rows] @ weight[e].T
    return out


# -- fused rotary embedding + KV cache write --------------------------------------------------


def _rope_cache_write_infer(types: Sequence[ValueType], attrs: Mapping[str, Any]) -> TupleType:
    from kiln.ir.ops.registry import OPS, infer_type

    q, k, _v, positions, cos, sin, k_cache, v_cache, _slots = types
    if not isinstance(q, TensorType) or not isinstance(k, TensorType) or q.rank != 3 or k.rank != 3:
        raise VerifyError(f"rope_kv_cache_write takes q [T, Hq, D] and k [T, Hkv, D]; got {q} and {k}")
    q_rot = infer_type(OPS["rope"], [q, positions, cos, sin], attrs)
    return TupleType((k_cache, v_cache, q_rot))


@register("rope_kv_cache_write", arity=9, kind="opaque", attrs=("style", "rotary_dim"),
          infer=_rope_cache_write_infer, scalar_inputs=False, writes=(6, 7), kernel=True)
def rope_kv_cache_write(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor,
                        cos: torch.Tensor, sin: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                        slot_mapping: torch.Tensor, *, style: str,
                        rotary_dim: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """rope(q), rope(k) with one position table (see rope), then kv_cache_write(rope(k), v, ...)
    in place: one pass over a layer's new q/k/v. Results (k_cache, v_cache, q_rot): the
    written caches first (result i is written operand i), then the rotated q [T, Hq, D]."""
    q_rot = rope(q, positions, cos, sin, style=style, rotary_dim=rotary_dim)
    k_rot = rope(k, positions, cos, sin, style=style, rotary_dim=rotary_dim)
    k_cache, v_cache = kv_cache_write(k_rot, v, k_cache, v_cache, slot_mapping)
    return k_cache, v_cache, q_rot
