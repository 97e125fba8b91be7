"""The cuda target's `lora`: each token's low-rank update from its own adapter slot, BGMV-style
(Punica): a decode step's tokens mostly use different adapters, so every program serves one
token and reads only its slot's rows.

    x [T, K]   a [NL, R, K]   b [NL, N, R]   index [T] int32 (-1: no adapter)   base [T, N] (optional)
    y [T, N] = base[t] + b[index[t]] @ (a[index[t]] @ x[t]), base[t] where index[t] == -1

Two kernels, the rank vector kept in float32 between them:

    shrink  grid T x S, S = cdiv(K, K_SPLIT):
        part[t, s, :R] = a[slot, :, s*K_SPLIT : (s+1)*K_SPLIT] @ x[t, same range]
        (a K_SPLIT slice of a's R rows, [BLOCK_R, BLOCK_K] tiles, summed along K at the end)
    expand  grid T x cdiv(N, BLOCK_N):
        v = sum over s of part[t, s, :]                     [BLOCK_R] float32
        y[t, n0 : n0 + BLOCK_N] = base[t, same range] + b[slot, n0 : n0 + BLOCK_N, :R] @ v

Splitting K spreads a batch-1 step's shrink over S programs (a's slot is R x K: 128 KiB at
rank 16, K 4096, bfloat16) without atomics or a zeroed buffer. A token of slot -1 loads
nothing of a, b or x (every load is masked by its liveness) and stores its base row (zeros
without base); so does one whose index is out of range (never a read past the slots; the
reference would raise). Without base (the op's 4-operand form) nothing is added: HAS_BASE is a
constexpr, so that form's expand loads no base tile. R is padded to
a power of two by masks (the lora pass makes R = max_rank x merged members, 48 for a QKV).
Sums are float32, base is added in float32 and y rounds once; the torch reference rounds the
rank vector and the update to x's dtype too, so 16-bit results differ from it by about a
rounding of v and one of y.
"""

from __future__ import annotations

from typing import Any

import torch
import triton
import triton.language as tl

from kiln.kernels import Launcher
from kiln.kernels.triton_kernels import pdl

Tensor = torch.Tensor

K_SPLIT = 512
"""Elements of K per shrink program (a multiple of BLOCK_K)."""

TILE = 4096
"""Elements of a shrink tile ([BLOCK_R, BLOCK_K]) and of an expand tile ([BLOCK_N, BLOCK_R])."""


@triton.jit(do_not_specialize=["NL"])  # the engine's slot count: one binary serves any
def _shrink_kernel(
    x_ptr, a_ptr, i_ptr, p_ptr, NL, K, R, S, stride_xt, stride_xk, stride_al, stride_ar, stride_ak,
    BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr, K_SPLIT: tl.constexpr, PDL: tl.constexpr,
):
    t = tl.program_id(0).to(tl.int64)
    s = tl.program_id(1)
    pdl.wait(PDL)
    slot = tl.load(i_ptr + t)
    live = (slot >= 0) & (slot < NL)
    k_end = tl.where(live, K, 0)  # a token without an adapter loads nothing
    offs_r = tl.arange(0, BLOCK_R)
    offs_k = tl.arange(0, BLOCK_K)
    r_ok = offs_r < tl.where(live, R, 0)
    a_row = a_ptr + tl.maximum(slot, 0).to(tl.int64) * stride_al + offs_r[:, None] * stride_ar
    x_row = x_ptr + t * stride_xt
    acc = tl.zeros([BLOCK_R, BLOCK_K], dtype=tl.float32)
    for k0 in range(0, K_SPLIT, BLOCK_K):
        k = s * K_SPLIT + k0 + offs_k
        k_ok = k < k_end
        xk = tl.load(x_row + k * stride_xk, mask=k_ok, other=0.0).to(tl.float32)
        ak = tl.load(a_row + k[None, :] * stride_ak, mask=r_ok[:, None] & k_ok[None, :], other=0.0,
                     eviction_policy="evict_last")
        acc += ak.to(tl.float32) * xk[None, :]
    tl.store(p_ptr + (t * S + s) * BLOCK_R + offs_r, tl.sum(acc, axis=1))


@triton.jit(do_not_specialize=["NL"])
def _expand_kernel(
    p_ptr, b_ptr, i_ptr, z_ptr, y_ptr, NL, N, R, S, stride_bl, stride_bn, stride_br, stride_zt, stride_zn,
    stride_yt, stride_yn, BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr, HAS_BASE: tl.constexpr, PDL: tl.constexpr,
):
    t = tl.program_id(0).to(tl.int64)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_r = tl.arange(0, BLOCK_R)
    pdl.wait(PDL)
    slot = tl.load(i_ptr + t)
    n_ok = offs_n < N
    r_ok = offs_r < tl.where((slot >= 0) & (slot < NL), R, 0)  # no adapter: nothing loaded, base stored
    v = tl.zeros([BLOCK_R], dtype=tl.float32)
    for s in range(S):
        v += tl.load(p_ptr + (t * S + s) * BLOCK_R + offs_r, mask=r_ok, other=0.0)
    b_ptrs = (b_ptr + tl.maximum(slot, 0).to(tl.int64) * stride_bl + offs_n[:, None].to(tl.int64) * stride_bn
              + offs_r[None, :] * stride_br)
    bt = tl.load(b_ptrs, mask=n_ok[:, None] & r_ok[None, :], other=0.0, eviction_policy="evict_last")
    y = tl.sum(bt.to(tl.float32) * v[None, :], axis=1)
    if HAS_BASE:
        y += tl.load(z_ptr + t * stride_zt + offs_n * stride_zn, mask=n_ok, other=0.0).to(tl.float32)
    tl.store(y_ptr + t * stride_yt + offs_n * stride_yn, y.to(y_ptr.dtype.element_ty), mask=n_ok)


def _blocks(r: int) -> tuple[int, int, int]:
    """(BLOCK_R, BLOCK_K, BLOCK_N) for rank r."""
    block_r = max(triton.next_power_of_2(r), 1)
    return block_r, min(max(TILE // block_r, 16), K_SPLIT), min(max(TILE // block_r, 16), 256)


def lora(y: Tensor, x: Tensor, a: Tensor, b: Tensor, index: Tensor, base: Tensor | None = None) -> None:
    """y = the lora op of (x, a, b, index[, base]) by the shrink and expand kernels (any strides;
    index of int32 with a unit stride; base [T, N] of y's dtype)."""
    t, k = x.shape
    nl, r, _ = a.shape
    n = b.shape[1]
    if a.shape[2] != k or b.shape[0] != nl or b.shape[2] != r or tuple(index.shape) != (t,) or \
            tuple(y.shape) != (t, n):
        raise ValueError(f"lora of x {tuple(x.shape)}, a {tuple(a.shape)}, b {tuple(b.shape)}, index "
                         f"{tuple(index.shape)} into y {tuple(y.shape)}: want x [T, K], a [NL, R, K], b [NL, N, R], "
                         "index [T], y [T, N]")
    if base is not None and (tuple(base.shape) != (t, n) or base.dtype != y.dtype):
        raise ValueError(f"lora: base {tuple(base.shape)} {base.dtype} must be y's shape {(t, n)} and dtype {y.dtype}")
    if index.dtype != torch.int32 or (t > 1 and index.stride(0) != 1):
        raise ValueError(f"lora: index must be a unit-stride int32 vector, got {index.dtype} strides {index.stride()}")
    if t == 0 or n == 0:
        return
    block_r, block_k, block_n = _blocks(r)
    s = triton.cdiv(k, K_SPLIT)
    part = torch.empty((t, s, block_r), dtype=torch.float32, device=x.device)  # [T, S, BLOCK_R]
    z = y if base is None else base  # base's pointer and strides (y's, unread, without base)
    opts = pdl.options(x)
    _shrink_kernel[(t, s)](
        x, a, index, part, nl, k, r, s, *x.stride(), *a.stride(),
        BLOCK_R=block_r, BLOCK_K=block_k, K_SPLIT=K_SPLIT, num_warps=4, **opts,
    )
    _expand_kernel[(t, triton.cdiv(n, block_n))](
        part, b, index, z, y, nl, n, r, s, *b.stride(), *z.stride(), *y.stride(),
        BLOCK_R=block_r, BLOCK_N=block_n, HAS_BASE=base is not None, num_warps=4, **opts,
    )


def _launch(outs: list[Tensor], args: list[Any], attrs: dict[str, Any]) -> None:
    lora(outs[0], *args)


LAUNCHERS: dict[str, Launcher] = {"lora": _launch}

__all__ = ["K_SPLIT", "LAUNCHERS", "lora"]
