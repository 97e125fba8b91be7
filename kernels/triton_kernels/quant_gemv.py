"""The GEMV of quantized_linear on the cuda target (quant_linear.py dispatches): a few rows of x
(decode steps) times a packed weight, which it reads once at the memory's speed.

    x [M, K] (unit stride along K)   qweight [N, K * bits / 8] bytes (contiguous rows)
    y [M, N] = quant_act(x) @ ((q - z) * s)^T (+ bias)   in float32, rounded once to y's dtype

A program owns BLOCK_N weight rows and BLOCK_M rows of x and streams its rows in tiles of
BLOCK_P bytes, seen as [BLOCK_N, NG, GB]: NG groups of GB bytes, so each (row, group) scale and
zero is loaded once and broadcast over its group's bytes, never gathered per channel:

    acc [BLOCK_M, BLOCK_N, NG, GB] = 0                        float32
    (the first tile loads before the PDL wait: weights are never written; see pdl.py)
    for p0 in 0, BLOCK_P, ... < K * bits / 8:
        b = qweight[n0 : n0 + BLOCK_N, p0 : p0 + BLOCK_P]     streamed once (evict first)
        bits 4: acc += x[2j] * w(b & 15) + x[2j + 1] * w(b >> 4)
        bits 8 / fp8: acc += x[j] * w(b)
    y = acc summed over its last two axes

GMODE 0: one scale a row for the whole tile (per-channel scales, or groups at least as wide as
the tile), NG = 1; 1: NG whole groups a tile (GB = the group's bytes); 2: a group per channel
(act-order g_idx, groups that do not tile), NG = 1 and scales gathered per byte.

A code becomes a float without a conversion instruction: (q | 0x4B000000) read as float32 is
2^23 + q, minus 2^23 + z gives q - z exactly. The weights (q - z) * s stay float32 (the
reference rounds them to the model's dtype first: results differ by that rounding, at most half
a unit in the last place of each weight). ACT (quantized activations): each program finds its
rows' quant_act scales in a pass over x (a few KB, in the L2) and rounds x as it reads it,
quant_act's values exactly.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from kiln.ir.ops.quant import QMAX
from kiln.kernels.triton_kernels import pdl
from kiln.kernels.triton_kernels.quant_act import round_codes, row_scale

Tensor = torch.Tensor

MAX_M = 4
"""The most rows the GEMV serves (more: quant_linear.py's GEMM)."""
ACT_CODES = {"none": 0, "int8": 1, "float8_e4m3fn": 2}
"""The ACT constexpr of each activation quantization."""
_MAGIC = tl.constexpr(0x4B000000)
"""The float32 bits of 2^23: OR-ed with a code below 2^23 they read as 2^23 + code."""


@dataclass(frozen=True)
class QGemvConfig:
    """The GEMV's knobs (block_n: weight rows a program at one row of x, divided among more;
    block_p: packed bytes of a row per tile)."""

    block_n: int = 8
    block_p: int = 512
    num_warps: int = 4


KNOBS: dict[str, tuple[int, ...]] = {"block_n": (1, 2, 4, 8), "block_p": (128, 256, 512, 1024), "num_warps": (2, 4, 8)}
"""The GEMV's search space for `kiln tune` (codegen/cuda/tune_quant.py)."""


def candidates() -> list[QGemvConfig]:
    """The configs of KNOBS whose tile gives each thread 4 to 16 bytes a step (more holds too many
    registers: x, weights and accumulators per byte), 8 to 16 bytes and 4 warps first (what
    register counts on sm_90 favour: ~64 registers a thread for 16 bytes of fp8, ~72 for 8
    bytes of int4), so a short search tries them."""
    out = [QGemvConfig(n, p, w) for n, p, w in itertools.product(*KNOBS.values()) if 4 <= n * p // (32 * w) <= 16]
    return sorted(out, key=lambda c: (c.block_n * c.block_p // (32 * c.num_warps) < 8, c.num_warps != 4))


def tuning_key(attrs: dict, k: int, n: int) -> str:
    """A quantized_linear's entry in tuning.json: its weight's shape, format and activations."""
    fmt = (f"int{attrs['bits']}g{attrs['group_size']}" + ("z" if attrs["has_zeros"] else "")
           + ("a" if attrs["has_g_idx"] else "") if attrs["format"] == "int"
           else f"fp8b{attrs['block_n']}x{attrs['block_k']}")
    return f"{k}x{n}:{fmt}:{attrs['act']}"


def gmode(g_idx: Tensor | None, group: int, tile_k: int) -> int:
    """How a tile of tile_k channels finds its scales (module docstring's GMODE)."""
    if g_idx is not None:
        return 2
    if group % tile_k == 0:
        return 0
    per_tile = tile_k // group
    return 1 if tile_k % group == 0 and per_tile & (per_tile - 1) == 0 else 2


@triton.jit
def _weights(q, k, k_first, offs_n, n_ok, s_ptr, z_ptr, g_ptr, stride_sn, stride_zn, K, BITS: tl.constexpr,
             GROUP: tl.constexpr, HAS_Z: tl.constexpr, HAS_G: tl.constexpr, GMODE: tl.constexpr, SN: tl.constexpr,
             FP8: tl.constexpr):
    """float32 weights [BLOCK_N, NG, GB] of the codes q (int32; FP8: uint8 float8_e4m3fn bits) at
    channels k [1, NG, GB] of rows offs_n (a scale serves SN rows and GROUP channels)."""
    NG: tl.constexpr = q.shape[1]
    s_rows = (offs_n // SN).to(tl.int64)[:, None, None] * stride_sn
    z_rows = offs_n.to(tl.int64)[:, None, None] * stride_zn
    if GMODE == 2:
        k_ok = k < K
        if HAS_G:
            g = tl.load(g_ptr + k, mask=k_ok, other=0)
        else:
            g = k // GROUP
        ok = n_ok[:, None, None] & k_ok
    else:
        g = (k_first // GROUP + tl.arange(0, NG))[None, :, None]
        ok = n_ok[:, None, None] & (g < tl.cdiv(K, GROUP))
    s = tl.load(s_ptr + s_rows + g, mask=ok, other=0.0).to(tl.float32)
    if FP8:
        v = q.to(tl.float8e4nv, bitcast=True).to(tl.float32)
    else:
        if HAS_Z:
            z = tl.load(z_ptr + z_rows + g, mask=ok, other=0).to(tl.float32)
        else:
            z = (1 << (BITS - 1)) * 1.0
        v = (q | _MAGIC).to(tl.float32, bitcast=True) - (8388608.0 + z)
    return v * s


@triton.jit
def _act(x, xs, ACT: tl.constexpr, W_DTYPE: tl.constexpr):
    """x (float32, rows on the first axis) as quant_act rounds it at row scales xs (ACT 1: int8,
    2: float8_e4m3fn; 0: x itself)."""
    if ACT == 0:
        r = x
    else:
        r = (round_codes(tl.math.div_rn(x, xs + tl.zeros_like(x)), ACT == 1) * xs).to(W_DTYPE).to(tl.float32)
    return r


@triton.jit
def _tile(acc, b, p0, offs_p, offs_m, m_ok, offs_n, n_ok, x_ptr, stride_xm, s_ptr, z_ptr, g_ptr, stride_sn,
          stride_zn, K, BITS: tl.constexpr, GROUP: tl.constexpr, HAS_Z: tl.constexpr, HAS_G: tl.constexpr,
          GMODE: tl.constexpr, SN: tl.constexpr, FP8: tl.constexpr, xs, ACT: tl.constexpr):
    """acc += this tile's x times its weights (b: the tile's bytes [BLOCK_N, NG, GB])."""
    w_dtype = x_ptr.dtype.element_ty
    if not FP8:
        b = b.to(tl.int32)
    x_row = x_ptr + offs_m.to(tl.int64)[:, None, None] * stride_xm
    if BITS == 4:
        k_lo = 2 * (p0 + offs_p)
        w_lo = _weights(b & 15, k_lo, 2 * p0, offs_n, n_ok, s_ptr, z_ptr, g_ptr, stride_sn, stride_zn, K,
                        BITS, GROUP, HAS_Z, HAS_G, GMODE, SN, FP8)
        w_hi = _weights(b >> 4, k_lo + 1, 2 * p0, offs_n, n_ok, s_ptr, z_ptr, g_ptr, stride_sn, stride_zn, K,
                        BITS, GROUP, HAS_Z, HAS_G, GMODE, SN, FP8)
        ok = m_ok[:, None, None] & (k_lo < K)
        x_lo = _act(tl.load(x_row + k_lo, mask=ok, other=0.0).to(tl.float32), xs, ACT, w_dtype)
        x_hi = _act(tl.load(x_row + k_lo + 1, mask=ok, other=0.0).to(tl.float32), xs, ACT, w_dtype)
        acc += x_lo[:, None] * w_lo[None] + x_hi[:, None] * w_hi[None]
    else:
        k = p0 + offs_p
        w = _weights(b, k, p0, offs_n, n_ok, s_ptr, z_ptr, g_ptr, stride_sn, stride_zn, K,
                     BITS, GROUP, HAS_Z, HAS_G, GMODE, SN, FP8)
        x = tl.load(x_row + k, mask=m_ok[:, None, None] & (k < K), other=0.0).to(tl.float32)
        acc += _act(x, xs, ACT, w_dtype)[:, None] * w[None]
    return acc


@triton.jit(do_not_specialize=["M"])
def _qgemv_kernel(
    x_ptr, q_ptr, s_ptr, z_ptr, g_ptr, b_ptr, y_ptr, M, N, K, KP,
    stride_xm, stride_qn, stride_sn, stride_zn, stride_ym,
    BITS: tl.constexpr, GROUP: tl.constexpr, HAS_Z: tl.constexpr, HAS_G: tl.constexpr, HAS_BIAS: tl.constexpr,
    GMODE: tl.constexpr, SN: tl.constexpr, FP8: tl.constexpr, ACT: tl.constexpr, QMAX_: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, NG: tl.constexpr, GB: tl.constexpr, X_BLOCK: tl.constexpr,
    PDL: tl.constexpr,
):
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_p = (tl.arange(0, NG) * GB)[None, :, None] + tl.arange(0, GB)[None, None, :]  # [1, NG, GB]
    m_ok = offs_m < M
    n_ok = offs_n < N
    q_ptrs = q_ptr + offs_n.to(tl.int64)[:, None, None] * stride_qn + offs_p
    b = tl.load(q_ptrs, mask=n_ok[:, None, None] & (offs_p < KP), other=0, eviction_policy="evict_first")
    pdl.wait(PDL)
    xs = 1.0
    if ACT != 0:  # the rows' quant_act scales
        offs_x = tl.arange(0, X_BLOCK)
        amax = tl.zeros([BLOCK_M, X_BLOCK], dtype=tl.float32)
        for k0 in range(0, K, X_BLOCK):
            x = tl.load(x_ptr + offs_m[:, None].to(tl.int64) * stride_xm + k0 + offs_x[None, :],
                        mask=m_ok[:, None] & (offs_x < K - k0)[None, :], other=0.0)
            amax = tl.maximum(amax, tl.abs(x.to(tl.float32)))
        xs = row_scale(tl.max(amax, axis=1), QMAX_)[:, None, None]
    acc = tl.zeros([BLOCK_M, BLOCK_N, NG, GB], dtype=tl.float32)
    acc = _tile(acc, b, 0, offs_p, offs_m, m_ok, offs_n, n_ok, x_ptr, stride_xm, s_ptr, z_ptr, g_ptr, stride_sn,
                stride_zn, K, BITS, GROUP, HAS_Z, HAS_G, GMODE, SN, FP8, xs, ACT)
    for p0 in range(NG * GB, KP, NG * GB):
        b = tl.load(q_ptrs + p0, mask=n_ok[:, None, None] & (offs_p < KP - p0), other=0,
                    eviction_policy="evict_first")
        acc = _tile(acc, b, p0, offs_p, offs_m, m_ok, offs_n, n_ok, x_ptr, stride_xm, s_ptr, z_ptr, g_ptr,
                    stride_sn, stride_zn, K, BITS, GROUP, HAS_Z, HAS_G, GMODE, SN, FP8, xs, ACT)
    y = tl.sum(tl.sum(acc, axis=3), axis=2)
    if HAS_BIAS:
        y += tl.load(b_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    y_ptrs = y_ptr + offs_m[:, None].to(tl.int64) * stride_ym + offs_n[None, :]
    tl.store(y_ptrs, y.to(y_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


def qgemv(y: Tensor, x: Tensor, qweight: Tensor, scales: Tensor, zeros: Tensor | None, g_idx: Tensor | None,
          bias: Tensor | None, bits: int, group: int, sn: int, fp8: bool, act: str,
          config: QGemvConfig | None = None) -> None:
    """y = x @ w^T (+ bias) for at most MAX_M rows (quant_linear.py checks the operands; fp8:
    qweight is the uint8 view of the float8_e4m3fn weight, sn its scales' rows)."""
    m, k = x.shape
    n, kp = qweight.shape
    c = config or QGemvConfig()
    # 1 or MAX_M rows a program: at 2 rows with act-order g_idx, sm_90 built a wrong kernel
    block_m = 1 if m == 1 else MAX_M
    mode = gmode(g_idx, group, c.block_p * 8 // bits)
    ng = c.block_p * 8 // (bits * group) if mode == 1 else 1
    _qgemv_kernel[(triton.cdiv(n, max(1, c.block_n // block_m)), triton.cdiv(m, block_m))](
        x, qweight, scales, zeros if zeros is not None else qweight, g_idx if g_idx is not None else qweight,
        bias if bias is not None else scales, y, m, n, k, kp,
        x.stride(0), qweight.stride(0), scales.stride(0), zeros.stride(0) if zeros is not None else 0, y.stride(0),
        BITS=bits, GROUP=group, HAS_Z=zeros is not None, HAS_G=g_idx is not None, HAS_BIAS=bias is not None,
        GMODE=mode, SN=sn, FP8=fp8, ACT=ACT_CODES[act], QMAX_=QMAX.get(act, 1.0), BLOCK_M=block_m,
        BLOCK_N=max(1, c.block_n // block_m), NG=ng, GB=c.block_p // ng, X_BLOCK=min(1024, triton.next_power_of_2(k)),
        num_warps=c.num_warps, **pdl.options(x),
    )


__all__ = ["ACT_CODES", "KNOBS", "MAX_M", "QGemvConfig", "candidates", "gmode", "qgemv", "tuning_key"]
