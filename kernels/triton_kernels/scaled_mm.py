"""Products in the quantized domain on the cuda target: quantized_linear with quantized
activations (W8A8 int8, fp8 weights with fp8 activations) on the tensor cores, for the GEMM
path (more than quant_linear.MAX_M rows; the GEMV reads x's rounded values instead).

    q [M, K] int8 | float8_e4m3fn, sx [M] float32      (quant_act.quant_codes of x)
    w [N, K]: int8    canonical uint8 codes (ir/ops/quant.py), implicit zero 128, one scale per
                      row (scales [N, 1]: group size K, no zeros, no g_idx)
              fp8     float8_e4m3fn, scales [ceil(N / SN), ceil(K / SK)] (dequant_fp8's blocks)
    y [M, N] = sx[m] * sum over K blocks of sw[n // SN, k // SK] * (q @ w^T over the block) (+ bias)

int8: tl.dot of int8 tiles into int32 (the codes shifted by 128 in registers), scaled once at
the end. fp8: tl.dot of fp8 tiles into float32; with one scale per row of w (SK >= K) scaled once
at the end, else each BLOCK_K step (BLOCK_K dividing SK) is scaled by its block's scales.

Or cuBLAS through torch._scaled_mm (provider "cublas"): fp8 with per-output-channel scales only
(SN 1, SK >= K) and K, N multiples of 16; which is faster is `kiln tune`'s to say (DEFAULT_PROVIDER
otherwise). Both are the reference's products up to the order of accumulation and the rounding of
x and w to the model's dtype, which a product in the quantized domain skips.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import triton
import triton.language as tl

from kiln.kernels.triton_kernels import pdl
from kiln.kernels.triton_kernels.linear import tile_order

Tensor = torch.Tensor


@dataclass(frozen=True)
class ScaledConfig:
    """The tensor-core GEMM's knobs and the provider ("triton" | "cublas")."""

    provider: str = "triton"
    block_m: int = 128
    block_n: int = 128
    block_k: int = 128
    group_m: int = 8
    num_warps: int = 8
    num_stages: int = 3


SMALL = ScaledConfig(block_m=32, block_n=64, block_k=128, num_warps=4, num_stages=4)
"""The default for at most 64 rows."""
LARGE = ScaledConfig()
"""The default for more rows."""


def covers(attrs: dict[str, Any], k: int) -> bool:
    """Whether a quantized_linear of these attributes (inner size k) runs here: int8 activations
    over per-channel symmetric 8-bit codes, or fp8 activations over fp8 weights."""
    if attrs["act"] == "int8":
        return (attrs["format"] == "int" and attrs.get("bits") == 8 and attrs.get("group_size", 0) >= k
                and not attrs["has_zeros"] and not attrs["has_g_idx"])
    return (attrs["act"] == "float8_e4m3fn" and attrs["format"] == "fp8"
            and (attrs["block_k"] >= k or attrs["block_k"] % 16 == 0))


@triton.jit(do_not_specialize=["M"])
def _scaled_gemm_kernel(
    q_ptr, sx_ptr, w_ptr, sw_ptr, b_ptr, y_ptr, M, N, K,
    stride_qm, stride_wn, stride_sn, stride_ym,
    INT8: tl.constexpr, SN: tl.constexpr, SK: tl.constexpr, PER_ROW: tl.constexpr, HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr, PDL: tl.constexpr,
):
    pdl.wait(PDL)
    pm, pn = tile_order(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)

    offs_m = pm * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pn * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    m_ok = offs_m < M
    n_ok = offs_n < N
    q_ptrs = q_ptr + offs_m[:, None].to(tl.int64) * stride_qm + offs_k[None, :]
    w_ptrs = w_ptr + offs_n[:, None].to(tl.int64) * stride_wn + offs_k[None, :]
    s_rows = sw_ptr + (offs_n // SN).to(tl.int64) * stride_sn
    if INT8:
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.int32)
    else:
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k_ok = offs_k < K - k0
        a = tl.load(q_ptrs + k0, mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        b = tl.load(w_ptrs + k0, mask=n_ok[:, None] & k_ok[None, :], other=0.0)
        if INT8:
            b = (b.to(tl.int32) - 128).to(tl.int8)
            acc = tl.dot(a, tl.trans(b), acc, out_dtype=tl.int32)
        elif PER_ROW:
            acc = tl.dot(a, tl.trans(b), acc)
        else:
            sw = tl.load(s_rows + k0 // SK, mask=n_ok, other=0.0)
            acc += tl.dot(a, tl.trans(b)) * sw[None, :]
    y = acc.to(tl.float32) * tl.load(sx_ptr + offs_m, mask=m_ok, other=0.0)[:, None]
    if PER_ROW:
        y = y * tl.load(s_rows, mask=n_ok, other=0.0)[None, :]
    if HAS_BIAS:
        y += tl.load(b_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    y_ptrs = y_ptr + offs_m[:, None].to(tl.int64) * stride_ym + offs_n[None, :]
    tl.store(y_ptrs, y.to(y_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


def cublas_fits(w: Tensor, sw: Tensor, block_n: int, block_k: int) -> bool:
    """Whether torch._scaled_mm computes this fp8 product (per-channel scales, 16-aligned sizes)."""
    n, k = w.shape
    return (w.dtype == torch.float8_e4m3fn and block_n == 1 and block_k >= k and n % 16 == 0 and k % 16 == 0
            and w.is_cuda and torch.cuda.get_device_capability(w.device)[0] >= 9)


def scaled_linear(y: Tensor, q: Tensor, sx: Tensor, w: Tensor, sw: Tensor, bias: Tensor | None, block_n: int,
                  block_k: int, config: ScaledConfig | None = None) -> None:
    """y [M, N] = the product of q [M, K] (codes, row scales sx) and w [N, K] (codes, block scales
    sw of block_n x block_k; int8 codes: block_n 1, block_k >= K), plus bias. y, q and w with unit
    stride along their last axis."""
    m, k = q.shape
    n = w.shape[0]
    int8 = q.dtype == torch.int8
    if w.shape[1] != k or y.shape != (m, n) or int8 != (w.dtype == torch.uint8) or int8 and block_k < k:
        raise ValueError(f"scaled_linear: codes {tuple(q.shape)} {q.dtype}, weight {tuple(w.shape)} {w.dtype} "
                         f"(blocks {block_n} x {block_k}) and y {tuple(y.shape)} do not fit")
    if m == 0:
        return
    c = config or (SMALL if m <= 64 else LARGE)
    if c.provider == "cublas" and cublas_fits(w, sw, block_n, block_k):
        out = torch._scaled_mm(q, w.t(), scale_a=sx.view(m, 1), scale_b=sw.view(1, n), out_dtype=y.dtype)
        if bias is not None:
            out += bias
        y.copy_(out)
        return
    per_row = block_k >= k
    block = c.block_k if per_row or block_k % c.block_k == 0 else _largest_divisor(block_k)
    grid = (triton.cdiv(m, c.block_m) * triton.cdiv(n, c.block_n),)
    _scaled_gemm_kernel[grid](
        q, sx, w, sw, bias if bias is not None else sw, y, m, n, k, q.stride(0), w.stride(0), sw.stride(0),
        y.stride(0), INT8=int8, SN=block_n, SK=block_k, PER_ROW=per_row, HAS_BIAS=bias is not None,
        BLOCK_M=c.block_m, BLOCK_N=c.block_n, BLOCK_K=block, GROUP_M=c.group_m, num_warps=c.num_warps,
        num_stages=c.num_stages, **pdl.options(q),
    )


def _largest_divisor(block_k: int) -> int:
    """The largest power of two, 16 to 128, dividing block_k (a weight's K blocks)."""
    for b in (128, 64, 32, 16):
        if block_k % b == 0:
            return b
    raise ValueError(f"scaled_linear: fp8 weight blocks of {block_k} input channels are not a multiple of 16")


__all__ = ["LARGE", "SMALL", "ScaledConfig", "covers", "cublas_fits", "scaled_linear"]
