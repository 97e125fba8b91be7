"""quantized_linear of the cuda target over canonical packed integer weights or float8_e4m3fn
weights (ir/ops/quant.py): a GEMV for a few rows and a tensor-core GEMM for more.

    x [M, K] (unit stride along K)   qweight uint8 [N, K * bits / 8] (contiguous rows)
    scales [N, G]   zeros uint8 [N, G] (optional)   g_idx int32 [K] (optional)   bias [N]
    w[n, k] = dtype(float32(q[n, k] - z[n, g(k)]) * scales[n, g(k)])   (the reference's)
    y [M, N] = x @ w^T (+ bias), accumulated in float32, rounded once to y's dtype

bits 4: byte j of a row holds k = 2j (low nibble) and 2j + 1 (high nibble).

GEMV (M <= MAX_M, decode steps): quant_gemv.py.

GEMM (more rows): BLOCK_M x BLOCK_N tiles of y looping over K in BLOCK_K steps; each step
dequantizes its [BLOCK_N, BLOCK_K] weight tile in registers (int4: the two nibble planes
interleaved back into channel order) and feeds tl.dot in x's dtype (ieee for float32).

A GEMM tile finds its scales and zeros (GMODE, as the GEMV's) as one group for all its
channels (per-channel scales, or groups at least as wide as the tile: one load per row), as
whole groups in channel order ([BLOCK_N, groups] loaded and repeated over each group's
channels), or per channel (act-order g_idx, uneven groups); it rounds the weights to the model's
dtype as the reference does, since its tensor-core product takes that dtype.

fp8 weights (fp8_linear) run the same kernels over their bytes: w[n, k] =
dtype(float32(q[n, k]) * scales[n // SN, k // GROUP]) (SN = block_n, GROUP = block_k).

Quantized activations (W8A8 int8, W4A8, fp8): for more than MAX_M rows where scaled_mm.py covers
the weights (int8 codes with one scale a row; fp8 weights with fp8 activations), the product runs
in the quantized domain on the tensor cores over quant_act.py's codes and row scales; the GEMV
(decode steps) computes its rows' scales itself (a pass over x, which the L2 holds) and rounds x
as it reads it, quant_act's values exactly; the GEMM over other weights reads the values that
quant_act.py writes. `covers` says which nodes these kernels compute; the cuda lowering
routes the others to `torch:` so `kiln inspect` lists them as fallbacks.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import triton
import triton.language as tl

from kiln.ir.ops.quant_linear import ACTS, split_operands
from kiln.kernels import Launcher
from kiln.kernels.torch_provider import launcher as torch_launcher
from kiln.kernels.triton_kernels import pdl, scaled_mm
from kiln.kernels.triton_kernels.linear import GemmConfig, tile_order
from kiln.kernels.triton_kernels.quant_act import quant_codes, quant_values
from kiln.kernels.triton_kernels.quant_gemv import MAX_M, QGemvConfig, gmode, qgemv, tuning_key

Tensor = torch.Tensor

GEMM = GemmConfig(block_m=32, block_n=64, block_k=64, num_stages=3)
"""The GEMM's default knobs up to 64 rows (linear.py's GemmConfig; block_k: input channels per
tile, at least 32)."""
GEMM_LARGE = GemmConfig(block_m=128, block_n=128, block_k=64, num_warps=8, num_stages=3)
"""The GEMM's default knobs for more rows."""


def covers(attrs: dict[str, Any]) -> bool:
    """Whether these kernels compute a quantized_linear of these attributes (packed integers of
    4 or 8 bits or float8_e4m3fn weights; activations quantized or not); the rest (float offsets,
    GGUF's Q4_1, among them) runs the torch reference."""
    fmt = attrs.get("format")
    return attrs.get("act") in ACTS and not attrs.get("has_offsets") and (fmt == "int" and attrs.get("bits") in (4, 8)
                                                                          or fmt == "fp8")


@triton.jit
def _dequant(q, k, k_first, offs_n, n_ok, s_ptr, z_ptr, g_ptr, stride_sn, stride_zn, K, BITS: tl.constexpr,
             GROUP: tl.constexpr, HAS_Z: tl.constexpr, HAS_G: tl.constexpr, GMODE: tl.constexpr, SN: tl.constexpr,
             FP8: tl.constexpr):
    """float32 [BLOCK_N, C] weights (q - z) * s of the codes q [BLOCK_N, C] (int32; FP8: uint8
    float8_e4m3fn bit patterns) at input channels k [C] of rows offs_n; a scale serves SN rows and
    GROUP channels. GMODE (module docstring): 0 one group for the tile, 1 whole groups in
    channel order, 2 a group per channel."""
    s_rows = (offs_n // SN).to(tl.int64) * stride_sn
    z_rows = offs_n.to(tl.int64) * stride_zn
    if GMODE == 0:
        g1 = k_first // GROUP
        s = tl.load(s_ptr + s_rows + g1, mask=n_ok, other=0.0).to(tl.float32)[:, None]
        if HAS_Z:
            z = tl.load(z_ptr + z_rows + g1, mask=n_ok, other=0).to(tl.int32)[:, None]
    elif GMODE == 1:  # [BLOCK_N, NG] scales, each repeated over its group's channels of the tile
        BN: tl.constexpr = q.shape[0]
        C: tl.constexpr = q.shape[1]
        NG: tl.constexpr = C * 8 // (BITS * GROUP)
        g = k_first // GROUP + tl.arange(0, NG)
        ok = n_ok[:, None] & (g < tl.cdiv(K, GROUP))[None, :]
        s2 = tl.load(s_ptr + s_rows[:, None] + g[None, :], mask=ok, other=0.0).to(tl.float32)
        s = tl.reshape(tl.broadcast_to(s2[:, :, None], (BN, NG, C // NG)), (BN, C))
        if HAS_Z:
            z2 = tl.load(z_ptr + z_rows[:, None] + g[None, :], mask=ok, other=0).to(tl.int32)
            z = tl.reshape(tl.broadcast_to(z2[:, :, None], (BN, NG, C // NG)), (BN, C))
    else:
        k_ok = k < K
        if HAS_G:
            g = tl.load(g_ptr + k, mask=k_ok, other=0)
        else:
            g = k // GROUP
        ok = n_ok[:, None] & k_ok[None, :]
        s = tl.load(s_ptr + s_rows[:, None] + g[None, :], mask=ok, other=0.0).to(tl.float32)
        if HAS_Z:
            z = tl.load(z_ptr + z_rows[:, None] + g[None, :], mask=ok, other=0).to(tl.int32)
    if not HAS_Z:
        z = 1 << (BITS - 1)
    if FP8:
        v = q.to(tl.float8e4nv, bitcast=True).to(tl.float32)
    else:
        v = (q - z).to(tl.float32)
    return v * s


@triton.jit(do_not_specialize=["M"])
def _qgemm_kernel(
    x_ptr, q_ptr, s_ptr, z_ptr, g_ptr, b_ptr, y_ptr, M, N, K, KP,
    stride_xm, stride_qn, stride_sn, stride_zn, stride_ym,
    BITS: tl.constexpr, GROUP: tl.constexpr, HAS_Z: tl.constexpr, HAS_G: tl.constexpr, HAS_BIAS: tl.constexpr,
    GMODE: tl.constexpr, SN: tl.constexpr, FP8: tl.constexpr, IEEE: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr, PDL: tl.constexpr,
):
    pdl.wait(PDL)
    pm, pn = tile_order(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)

    BLOCK_P: tl.constexpr = BLOCK_K * BITS // 8
    offs_m = pm * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pn * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_p = tl.arange(0, BLOCK_P)
    offs_k = tl.arange(0, BLOCK_K)
    m_ok = offs_m < M
    n_ok = offs_n < N
    x_ptrs = x_ptr + offs_m[:, None].to(tl.int64) * stride_xm + offs_k[None, :]
    q_ptrs = q_ptr + offs_n[:, None].to(tl.int64) * stride_qn + offs_p[None, :]
    w_dtype = x_ptr.dtype.element_ty
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        p0 = k0 * BITS // 8
        b = tl.load(q_ptrs + p0, mask=n_ok[:, None] & (offs_p < KP - p0)[None, :], other=0)
        if BITS == 4:
            b = b.to(tl.int32)
            k_lo = k0 + 2 * offs_p
            w_lo = _dequant(b & 15, k_lo, k0, offs_n, n_ok, s_ptr, z_ptr, g_ptr, stride_sn, stride_zn, K,
                            BITS, GROUP, HAS_Z, HAS_G, GMODE, SN, FP8)
            w_hi = _dequant(b >> 4, k_lo + 1, k0, offs_n, n_ok, s_ptr, z_ptr, g_ptr, stride_sn, stride_zn, K,
                            BITS, GROUP, HAS_Z, HAS_G, GMODE, SN, FP8)
            w = tl.interleave(w_lo, w_hi)  # [BLOCK_N, BLOCK_K] in channel order
        else:
            if not FP8:
                b = b.to(tl.int32)
            w = _dequant(b, k0 + offs_k, k0, offs_n, n_ok, s_ptr, z_ptr, g_ptr, stride_sn, stride_zn, K,
                         BITS, GROUP, HAS_Z, HAS_G, GMODE, SN, FP8)
        a = tl.load(x_ptrs + k0, mask=m_ok[:, None] & (offs_k < K - k0)[None, :], other=0.0)
        wt = tl.trans(w.to(w_dtype))
        if IEEE:  # float32: no TF32, for parity with the reference
            acc = tl.dot(a, wt, acc, input_precision="ieee")
        else:
            acc = tl.dot(a, wt, acc)
    if HAS_BIAS:
        acc += tl.load(b_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    y_ptrs = y_ptr + offs_m[:, None].to(tl.int64) * stride_ym + offs_n[None, :]
    tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


def quant_linear(y: Tensor, x: Tensor, qweight: Tensor, scales: Tensor, zeros: Tensor | None, g_idx: Tensor | None,
                 bias: Tensor | None, bits: int, group_size: int, gemv: QGemvConfig | None = None,
                 gemm: GemmConfig | None = None, act: str = "none") -> None:
    """y [M, N] = quant_act(x [M, K], act) @ dequant_int(qweight, scales, zeros, g_idx)^T (+ bias):
    the GEMV for at most MAX_M rows, else the GEMM. x and y 2-D with unit stride along their last
    axis; qweight, scales and zeros with unit stride along their rows."""
    m, k = x.shape
    n, kp = qweight.shape
    if bits not in (4, 8) or kp * 8 // bits != k or y.shape != (m, n) or scales.shape[0] != n:
        raise ValueError(f"quant_linear: x {tuple(x.shape)}, {bits}-bit qweight {tuple(qweight.shape)}, scales "
                         f"{tuple(scales.shape)} and y {tuple(y.shape)} do not fit")
    _run(y, x, qweight, scales, zeros, g_idx, bias, bits, group_size, 1, False, gemv, gemm, act)


def fp8_linear(y: Tensor, x: Tensor, qweight: Tensor, scales: Tensor, bias: Tensor | None, block_n: int,
               block_k: int, gemv: QGemvConfig | None = None, gemm: GemmConfig | None = None,
               act: str = "none") -> None:
    """y [M, N] = quant_act(x [M, K], act) @ dequant_fp8(qweight, scales)^T (+ bias): the same
    GEMV and GEMM over float8_e4m3fn bytes, a scale per block_n rows and block_k channels."""
    m, k = x.shape
    n = qweight.shape[0]
    if qweight.dtype != torch.float8_e4m3fn or qweight.shape[1] != k or y.shape != (m, n) \
            or tuple(scales.shape) != (-(-n // block_n), -(-k // block_k)):
        raise ValueError(f"fp8_linear: x {tuple(x.shape)}, qweight {tuple(qweight.shape)} {qweight.dtype}, scales "
                         f"{tuple(scales.shape)} (blocks {block_n} x {block_k}) and y {tuple(y.shape)} do not fit")
    _run(y, x, qweight.view(torch.uint8), scales, None, None, bias, 8, block_k, block_n, True, gemv, gemm, act)


def _run(y: Tensor, x: Tensor, qweight: Tensor, scales: Tensor, zeros: Tensor | None, g_idx: Tensor | None,
         bias: Tensor | None, bits: int, group: int, sn: int, fp8: bool, gemv: QGemvConfig | None,
         gemm: GemmConfig | None, act: str) -> None:
    m, k = x.shape
    n, kp = qweight.shape
    if x.stride(1) != 1 or y.stride(1) != 1 or qweight.stride(1) != 1 or scales.stride(1) != 1 \
            or zeros is not None and zeros.stride(1) != 1:
        raise ValueError("quant_linear: x, y, qweight, scales and zeros need a unit stride along their last axis")
    if m == 0:
        return
    if m <= MAX_M:
        qgemv(y, x, qweight, scales, zeros, g_idx, bias, bits, group, sn, fp8, act, gemv)
        return
    if act != "none":  # the GEMM reads x's rounded values (the GEMV rounds them itself)
        x = quant_values(x, act)
    common = dict(
        BITS=bits, GROUP=group, HAS_Z=zeros is not None, HAS_G=g_idx is not None, HAS_BIAS=bias is not None, SN=sn,
        FP8=fp8,
    )
    ptrs = (x, qweight, scales, zeros if zeros is not None else qweight, g_idx if g_idx is not None else qweight,
            bias if bias is not None else scales, y, m, n, k, kp,
            x.stride(0), qweight.stride(0), scales.stride(0), zeros.stride(0) if zeros is not None else 0, y.stride(0))
    c = gemm or (GEMM if m <= 64 else GEMM_LARGE)
    grid = (triton.cdiv(m, c.block_m) * triton.cdiv(n, c.block_n),)
    _qgemm_kernel[grid](
        *ptrs, **common, GMODE=gmode(g_idx, group, c.block_k), IEEE=x.dtype == torch.float32,
        BLOCK_M=c.block_m, BLOCK_N=c.block_n, BLOCK_K=c.block_k, GROUP_M=c.group_m,
        num_warps=c.num_warps, num_stages=c.num_stages, **pdl.options(x),
    )


def make_launchers(table: Mapping[str, Any] | None = None) -> dict[str, Launcher]:
    """The quantized_linear launcher, its GEMV configured per weight by `table` (tuning.json's
    "quantized_linear": {tuning_key: {"config": QGemvConfig fields, ...}}; others the default).
    Quantized activations: in the quantized domain on the tensor cores (scaled_mm.py) for more
    than MAX_M rows where it covers the weights, else x's rounded values into these kernels."""
    try:
        configs = {key: QGemvConfig(**(row.get("config") or {})) for key, row in (table or {}).items()}
    except (AttributeError, TypeError) as e:
        raise ValueError(f"tuning.json: a quantized_linear entry is malformed ({e})") from e

    def launch(outs: list[Tensor], args: list[Any], attrs: dict[str, Any]) -> None:
        if not covers(attrs):
            _reference(outs, args, attrs)
            return
        x, qweight, scales, zeros, _, g_idx, bias = split_operands(args, attrs)
        k, n = x.shape[-1], outs[0].shape[-1]
        x2 = x.reshape(-1, k) if x.stride(-1) == 1 else x.contiguous().view(-1, k)
        y = outs[0]
        y2 = y.view(-1, n) if y.is_contiguous() else torch.empty(y.shape, dtype=y.dtype, device=y.device).view(-1, n)
        act = attrs["act"]
        gemv = configs.get(tuning_key(attrs, k, n)) if configs else None
        if act != "none" and x2.shape[0] > MAX_M and scaled_mm.covers(attrs, k):
            codes, sx = quant_codes(x2, act)
            fp8 = attrs["format"] == "fp8"
            scaled_mm.scaled_linear(y2, codes, sx, qweight.contiguous(), scales.contiguous(), bias,
                                    attrs["block_n"] if fp8 else 1, attrs["block_k"] if fp8 else k)
        elif attrs["format"] == "fp8":
            fp8_linear(y2, x2, qweight.contiguous(), scales.contiguous(), bias, attrs["block_n"], attrs["block_k"],
                       gemv=gemv, act=act)
        else:
            quant_linear(y2, x2, qweight.contiguous(), scales.contiguous(),
                         zeros.contiguous() if zeros is not None else None, g_idx, bias, attrs["bits"],
                         attrs["group_size"], gemv=gemv, act=act)
        if y2.data_ptr() != y.data_ptr():
            y.copy_(y2.view(y.shape))

    return {"quantized_linear": launch}


def from_tuning(entry: Mapping[str, Any]) -> dict[str, Launcher]:
    """The launchers that tuning.json's quantized_linear entry configures (`make_launchers`)."""
    return make_launchers(entry)


_reference = torch_launcher("quantized_linear")

LAUNCHERS: dict[str, Launcher] = make_launchers()

__all__ = ["GEMM", "GEMM_LARGE", "LAUNCHERS", "MAX_M", "QGemvConfig", "covers", "fp8_linear", "from_tuning",
           "make_launchers", "quant_linear"]
