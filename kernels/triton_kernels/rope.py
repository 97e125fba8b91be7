"""Rotary embedding, the KV-cache write, and both fused (rope_kv_cache_write), in Triton.

One program per token. A head row of width D splits into the rotary_dim rotated features and
the rest, which passes through; the rotated features pair up by style:

    neox:        (x[i], x[i + R/2])   i < R/2       out_a = x_a * cos_a - x_b * sin_a
    interleaved: (x[2i], x[2i + 1])   i < R/2       out_b = x_b * cos_b + x_a * sin_b

Products round to the rotation's dtype (torch's promotion of x and the tables) before the sum,
as the torch reference computes them. Cache slots (block * BS + offset, -1: padded row, not
written) address k_cache/v_cache [NB, BS, Hkv, D] seen as [NB * BS, Hkv, D]:

    slot s -> cache[s // BS, s % BS] = cache.view(NB * BS, Hkv, D)[s]
"""

from __future__ import annotations

from typing import Any

import torch
import triton
import triton.language as tl

from kiln.kernels import Launcher
from kiln.kernels.triton_kernels import pdl
from kiln.kernels.triton_kernels.elementwise import tl_dtype

Tensor = torch.Tensor

_TILE = 2048  # elements of one [heads, features] tile


@triton.jit
def _rotate_heads(x_row, x_sh, o_row, o_sh, n_heads, c_row, s_row, cl_row, sl_row, is_long, half, rest,
                  R: tl.constexpr, LONG: tl.constexpr, INTERLEAVED: tl.constexpr, ROT_TY: tl.constexpr,
                  BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr, BLOCK_REST: tl.constexpr):
    # x_row: heads [n_heads, D] of one token (head stride x_sh) -> o_row (n_heads 0: nothing).
    O_TY: tl.constexpr = o_row.dtype.element_ty
    i = tl.arange(0, BLOCK_HALF)
    im = i < half
    if INTERLEAVED:
        ia = 2 * i
        ib = 2 * i + 1
    else:
        ia = i
        ib = i + half
    ca = tl.load(c_row + ia, mask=im, other=0.0).to(tl.float32)
    cb = tl.load(c_row + ib, mask=im, other=0.0).to(tl.float32)
    sa = tl.load(s_row + ia, mask=im, other=0.0).to(tl.float32)
    sb = tl.load(s_row + ib, mask=im, other=0.0).to(tl.float32)
    if LONG:
        ca = tl.where(is_long, tl.load(cl_row + ia, mask=im, other=0.0).to(tl.float32), ca)
        cb = tl.where(is_long, tl.load(cl_row + ib, mask=im, other=0.0).to(tl.float32), cb)
        sa = tl.where(is_long, tl.load(sl_row + ia, mask=im, other=0.0).to(tl.float32), sa)
        sb = tl.where(is_long, tl.load(sl_row + ib, mask=im, other=0.0).to(tl.float32), sb)
    ca, cb, sa, sb = ca[None, :], cb[None, :], sa[None, :], sb[None, :]
    for h0 in range(0, n_heads, BLOCK_H):
        h = h0 + tl.arange(0, BLOCK_H)
        hm = h < n_heads
        m = hm[:, None] & im[None, :]
        xh = x_row + h[:, None] * x_sh
        oh = o_row + h[:, None] * o_sh
        xa = tl.load(xh + ia[None, :], mask=m, other=0.0).to(tl.float32)
        xb = tl.load(xh + ib[None, :], mask=m, other=0.0).to(tl.float32)
        oa = (xa * ca).to(ROT_TY).to(tl.float32) - (xb * sa).to(ROT_TY).to(tl.float32)
        ob = (xb * cb).to(ROT_TY).to(tl.float32) + (xa * sb).to(ROT_TY).to(tl.float32)
        tl.store(oh + ia[None, :], oa.to(ROT_TY).to(O_TY), mask=m)
        tl.store(oh + ib[None, :], ob.to(ROT_TY).to(O_TY), mask=m)
        if BLOCK_REST > 0:
            p = tl.arange(0, BLOCK_REST)
            mp = hm[:, None] & (p < rest)[None, :]
            v = tl.load(xh + R + p[None, :], mask=mp, other=0.0)
            tl.store(oh + R + p[None, :], v.to(ROT_TY).to(O_TY), mask=mp)


@triton.jit
def _copy_heads(x_row, x_sh, o_row, o_sh, n_heads, width, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr):
    # [n_heads, width] of one token, cast to the destination's dtype (n_heads 0: nothing).
    d = tl.arange(0, BLOCK_D)
    dm = d < width
    for h0 in range(0, n_heads, BLOCK_H):
        h = h0 + tl.arange(0, BLOCK_H)
        m = (h < n_heads)[:, None] & dm[None, :]
        v = tl.load(x_row + h[:, None] * x_sh + d[None, :], mask=m, other=0.0)
        tl.store(o_row + h[:, None] * o_sh + d[None, :], v.to(o_row.dtype.element_ty), mask=m)


@triton.jit
def _long_rows(t, total_lens_ptr, cu_ptr, n_seqs, long_after, BLOCK_S: tl.constexpr):
    # Whether token t's sequence (the last one whose start is <= t; padded rows: the last) has a
    # whole length past long_after.
    ended = tl.zeros([BLOCK_S], dtype=tl.int32)
    for j0 in range(0, n_seqs, BLOCK_S):
        j = j0 + tl.arange(0, BLOCK_S)
        ends = tl.load(cu_ptr + 1 + j, mask=j < n_seqs, other=0)
        ended += ((ends <= t) & (j < n_seqs)).to(tl.int32)
    seq = tl.minimum(tl.sum(ended, axis=0), n_seqs - 1)
    return tl.load(total_lens_ptr + seq) > long_after


@triton.jit(do_not_specialize=["n_seqs"])
def _rope_kernel(x_ptr, x_st, x_sh, o_ptr, o_st, o_sh, pos_ptr, cos_ptr, sin_ptr, c_sp, s_sp,
                 cl_ptr, sl_ptr, cl_sp, sl_sp, total_lens_ptr, cu_ptr, n_seqs, long_after, n_heads, half, rest,
                 R: tl.constexpr, LONG: tl.constexpr, INTERLEAVED: tl.constexpr,
                 BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr, BLOCK_REST: tl.constexpr, PDL: tl.constexpr):
    pdl.wait(PDL)
    t = tl.program_id(0).to(tl.int64)
    pos = tl.load(pos_ptr + t).to(tl.int64)
    is_long = False
    if LONG:
        is_long = _long_rows(t, total_lens_ptr, cu_ptr, n_seqs, long_after, 64)
    _rotate_heads(x_ptr + t * x_st, x_sh, o_ptr + t * o_st, o_sh, n_heads,
                  cos_ptr + pos * c_sp, sin_ptr + pos * s_sp, cl_ptr + pos * cl_sp, sl_ptr + pos * sl_sp, is_long,
                  half, rest, R, LONG, INTERLEAVED, o_ptr.dtype.element_ty, BLOCK_H, BLOCK_HALF, BLOCK_REST)


def _tables(cos: Tensor, sin: Tensor, rotary_dim: int) -> None:
    for tab in (cos, sin):
        if tab.dim() != 2 or tab.shape[1] != rotary_dim or tab.stride(1) != 1:
            raise ValueError(f"rope tables must be [P, rotary_dim={rotary_dim}] with unit-stride rows, "
                             f"got shape {tuple(tab.shape)} strides {tab.stride()}")


def _heads(x: Tensor, what: str) -> None:
    if x.dim() != 3 or (x.stride(2) != 1 and x.shape[2] > 1):
        raise ValueError(f"{what} must be [T, H, D] with a unit-stride last axis, got shape {tuple(x.shape)} "
                         f"strides {x.stride()}")


def _blocks(n_heads: int, width: int) -> tuple[int, int]:
    """(BLOCK_H, BLOCK_W): a tile of whole feature rows, up to _TILE elements."""
    bw = triton.next_power_of_2(max(width, 1))
    return max(1, min(triton.next_power_of_2(n_heads), _TILE // bw)), bw


def _style(attrs: dict[str, Any]) -> bool:
    if attrs["style"] not in ("neox", "interleaved"):
        raise ValueError(f"rope style '{attrs['style']}' is not 'neox' or 'interleaved'")
    return attrs["style"] == "interleaved"


def _rope(outs: list[Tensor], args: list[Any], attrs: dict[str, Any]) -> None:
    x, positions, cos, sin, *long = args
    (out,) = outs
    r = attrs["rotary_dim"]
    interleaved = _style(attrs)
    _heads(x, "rope's x")
    _heads(out, "rope's output")
    _tables(cos, sin, r)
    t, h, d = x.shape
    if t == 0 or h == 0:
        return
    if long:
        cos_long, sin_long, total_lens, cu_seqlens = long
        _tables(cos_long, sin_long, r)
        extra = (cos_long, sin_long, cos_long.stride(0), sin_long.stride(0), total_lens, cu_seqlens,
                 total_lens.shape[0], int(attrs["long_after"]))
    else:
        extra = (cos, sin, cos.stride(0), sin.stride(0), positions, positions, 1, 0)
    bh, bhalf = _blocks(h, r // 2)
    rest = d - r
    _rope_kernel[(t,)](x, x.stride(0), x.stride(1), out, out.stride(0), out.stride(1), positions, cos, sin,
                       cos.stride(0), sin.stride(0), *extra, h, r // 2, rest, R=r, LONG=bool(long),
                       INTERLEAVED=interleaved, BLOCK_H=bh, BLOCK_HALF=bhalf,
                       BLOCK_REST=triton.next_power_of_2(rest) if rest else 0, num_warps=4,
                       **pdl.options(x))


@triton.jit
def _kv_cache_write_kernel(k_ptr, k_st, k_sh, v_ptr, v_st, v_sh, kc_ptr, kc_ss, kc_sh, vc_ptr, vc_ss, vc_sh,
                           slot_ptr, n_heads, dk, dv, BLOCK_HK: tl.constexpr, BLOCK_DK: tl.constexpr,
                           BLOCK_HV: tl.constexpr, BLOCK_DV: tl.constexpr, PDL: tl.constexpr):
    pdl.wait(PDL)
    t = tl.program_id(0).to(tl.int64)
    slot = tl.load(slot_ptr + t).to(tl.int64)
    n_written = tl.where(slot >= 0, n_heads, 0)  # a padded row (slot -1) writes nothing
    _copy_heads(k_ptr + t * k_st, k_sh, kc_ptr + slot * kc_ss, kc_sh, n_written, dk, BLOCK_HK, BLOCK_DK)
    _copy_heads(v_ptr + t * v_st, v_sh, vc_ptr + slot * vc_ss, vc_sh, n_written, dv, BLOCK_HV, BLOCK_DV)


def _cache(cache: Tensor, what: str) -> None:
    # The reference addresses slots through cache.view(NB * BS, Hkv, D).
    if cache.dim() != 4 or cache.stride(0) != cache.shape[1] * cache.stride(1) or cache.stride(3) != 1:
        raise ValueError(f"{what} must be [NB, BS, Hkv, D] with blocks of contiguous slots, got shape "
                         f"{tuple(cache.shape)} strides {cache.stride()}")


def _kv_cache_write(outs: list[Tensor], args: list[Any], attrs: dict[str, Any]) -> None:
    k, v, k_cache, v_cache, slots = args
    _heads(k, "kv_cache_write's k")
    _heads(v, "kv_cache_write's v")
    _cache(k_cache, "k_cache")
    _cache(v_cache, "v_cache")
    t, h, dk = k.shape
    dv = v.shape[2]
    if t == 0 or h == 0:
        return
    bhk, bdk = _blocks(h, dk)
    bhv, bdv = _blocks(h, dv)
    _kv_cache_write_kernel[(t,)](k, k.stride(0), k.stride(1), v, v.stride(0), v.stride(1), k_cache,
                                 k_cache.stride(1), k_cache.stride(2), v_cache, v_cache.stride(1), v_cache.stride(2),
                                 slots, h, dk, dv, BLOCK_HK=bhk, BLOCK_DK=bdk, BLOCK_HV=bhv, BLOCK_DV=bdv,
                                 num_warps=4, **pdl.options(k))


@triton.jit
def _rope_kv_cache_write_kernel(q_ptr, q_st, q_sh, qo_ptr, qo_st, qo_sh, k_ptr, k_st, k_sh, v_ptr, v_st, v_sh,
                                kc_ptr, kc_ss, kc_sh, vc_ptr, vc_ss, vc_sh, slot_ptr, pos_ptr, cos_ptr, sin_ptr,
                                c_sp, s_sp, n_q_heads, n_kv_heads, half, rest, dv, R: tl.constexpr,
                                INTERLEAVED: tl.constexpr, K_ROT_TY: tl.constexpr, BLOCK_HQ: tl.constexpr,
                                BLOCK_HK: tl.constexpr, BLOCK_HALF: tl.constexpr, BLOCK_REST: tl.constexpr,
                                BLOCK_HV: tl.constexpr, BLOCK_DV: tl.constexpr, PDL: tl.constexpr):
    # q_rot = rope(q) for every row; rope(k) and v into their cache slots (slot -1: not written).
    pdl.wait(PDL)
    t = tl.program_id(0).to(tl.int64)
    pos = tl.load(pos_ptr + t).to(tl.int64)
    slot = tl.load(slot_ptr + t).to(tl.int64)
    n_written = tl.where(slot >= 0, n_kv_heads, 0)  # a padded row (slot -1) writes nothing
    c_row = cos_ptr + pos * c_sp
    s_row = sin_ptr + pos * s_sp
    _rotate_heads(q_ptr + t * q_st, q_sh, qo_ptr + t * qo_st, qo_sh, n_q_heads, c_row, s_row, c_row, s_row,
                  False, half, rest, R, False, INTERLEAVED, qo_ptr.dtype.element_ty, BLOCK_HQ, BLOCK_HALF,
                  BLOCK_REST)
    _rotate_heads(k_ptr + t * k_st, k_sh, kc_ptr + slot * kc_ss, kc_sh, n_written, c_row, s_row, c_row, s_row,
                  False, half, rest, R, False, INTERLEAVED, K_ROT_TY, BLOCK_HK, BLOCK_HALF, BLOCK_REST)
    _copy_heads(v_ptr + t * v_st, v_sh, vc_ptr + slot * vc_ss, vc_sh, n_written, dv, BLOCK_HV, BLOCK_DV)


def _rope_kv_cache_write(outs: list[Tensor], args: list[Any], attrs: dict[str, Any]) -> None:
    # outs: (k_cache, v_cache, q_rot): the written caches (the same tensors as the operands) first.
    q, k, v, positions, cos, sin, k_cache, v_cache, slots = args
    q_rot = outs[2]
    r = attrs["rotary_dim"]
    interleaved = _style(attrs)
    for x, what in ((q, "q"), (q_rot, "q_rot"), (k, "k"), (v, "v")):
        _heads(x, f"rope_kv_cache_write's {what}")
    _cache(k_cache, "k_cache")
    _cache(v_cache, "v_cache")
    _tables(cos, sin, r)
    t, hq, d = q.shape
    hk, dv = k.shape[1], v.shape[2]
    if t == 0:
        return
    bhq, bhalf = _blocks(hq, r // 2)
    bhk, _ = _blocks(hk, r // 2)
    bhv, bdv = _blocks(hk, dv)
    rest = d - r
    _rope_kv_cache_write_kernel[(t,)](
        q, q.stride(0), q.stride(1), q_rot, q_rot.stride(0), q_rot.stride(1), k, k.stride(0), k.stride(1),
        v, v.stride(0), v.stride(1), k_cache, k_cache.stride(1), k_cache.stride(2), v_cache, v_cache.stride(1),
        v_cache.stride(2), slots, positions, cos, sin, cos.stride(0), sin.stride(0), hq, hk, r // 2, rest, dv,
        R=r, INTERLEAVED=interleaved, K_ROT_TY=tl_dtype(torch.promote_types(k.dtype, cos.dtype)),
        BLOCK_HQ=bhq, BLOCK_HK=bhk, BLOCK_HALF=bhalf, BLOCK_REST=triton.next_power_of_2(rest) if rest else 0,
        BLOCK_HV=bhv, BLOCK_DV=bdv, num_warps=4, **pdl.options(q))


LAUNCHERS: dict[str, Launcher] = {
    "rope": _rope,
    "kv_cache_write": _kv_cache_write,
    "rope_kv_cache_write": _rope_kv_cache_write,
}
