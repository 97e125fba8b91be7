"""Per-row dynamic activation quantization on the cuda target (quant_act, ir/ops/quant.py).

    x [M, K] (unit stride along K) -> per row m:  s = max_k |x[m, k]| / QMAX  (1 where it is 0)
                                                  q = round(x / s)  (int8: half to even, clamped to
                                                      [-128, 127]; float8_e4m3fn: the cast)
    codes:   q [M, K] (int8 | float8_e4m3fn) and s [M] float32, the operands of a product in the
             quantized domain (scaled_mm.py)
    values:  x' [M, K] = x.dtype(float32(q) * s), quant_act's result bit for bit

One program per row, two passes over it (the row is read twice; rows are a few KB and the second
read hits the L2). The division is IEEE (div_rn), as torch divides; int8 rounds half to even by
the float32 magic-number trick (|x / s| <= 127 < 2^22), float8_e4m3fn by rounding the float32
bits, whose float8 bit patterns are then assembled by hand (no float8 conversion: Triton's
interpreter drops the carry into the exponent when a cast rounds up to the next power of two).
PDL protocol as pdl.py.
"""

from __future__ import annotations

from typing import Any

import torch
import triton
import triton.language as tl

from kiln.ir.ops.quant import QMAX
from kiln.kernels import Launcher
from kiln.kernels.triton_kernels import pdl

Tensor = torch.Tensor

FORMATS = {"int8": torch.int8, "float8_e4m3fn": torch.float8_e4m3fn}
"""quant_act's formats and the dtype of their codes."""
_ROUND = tl.constexpr(12582912.0)
"""1.5 * 2^23: (v + _ROUND) - _ROUND is v rounded half to even for |v| < 2^22."""
_SUBNORMAL = tl.constexpr(24576.0)
"""1.5 * 2^14: (v + _SUBNORMAL) - _SUBNORMAL rounds v half to even to a multiple of 2^-9."""


@triton.jit
def _round_e4m3(v):
    """float32 v (|v| <= 448) rounded half to even to float8_e4m3fn's values, in float32: 3
    mantissa bits from 2^-6 up, multiples of 2^-9 below (the cast after it is exact)."""
    u = v.to(tl.uint32, bitcast=True)
    normal = (((u + 0x7FFFF + ((u >> 20) & 1)) >> 20) << 20).to(tl.float32, bitcast=True)
    return tl.where(tl.abs(v) < 0.015625, (v + _SUBNORMAL) - _SUBNORMAL, normal)


@triton.jit
def _e4m3_bits(v):
    """The float8_e4m3fn bit patterns (uint8) of float32 values v that the format holds exactly
    (_round_e4m3's results): sign, 4 exponent bits biased by 7 and 3 mantissa bits from 2^-6 up,
    v * 2^9 below. Built from v's bits, without a float8 conversion (Triton's differ by version)."""
    u = v.to(tl.uint32, bitcast=True)
    a = u & 0x7FFFFFFF
    normal = (((a >> 23) - 120) << 3) | ((a >> 20) & 7)
    sub = (tl.abs(v) * 512.0).to(tl.uint32)
    return (((u >> 24) & 0x80) | tl.where(tl.abs(v) < 0.015625, sub, normal)).to(tl.uint8)


@triton.jit
def row_scale(amax, QMAX_: tl.constexpr):
    """quant_act's scale of rows whose largest magnitude is amax (1 for an all-zero row)."""
    s = tl.math.div_rn(amax, tl.zeros_like(amax) + QMAX_)
    return tl.where(s == 0.0, 1.0, s)


@triton.jit
def round_codes(v, INT8: tl.constexpr):
    """v = x / s rounded to the format's codes, in float32."""
    if INT8:
        r = tl.minimum(tl.maximum((v + _ROUND) - _ROUND, -128.0), 127.0)
    else:
        r = _round_e4m3(v)
    return r


@triton.jit(do_not_specialize=["M"])
def _quant_act_kernel(x_ptr, q_ptr, s_ptr, M, K, stride_xm, stride_qm, QMAX_: tl.constexpr, INT8: tl.constexpr,
                      VALUES: tl.constexpr, BLOCK_K: tl.constexpr, PDL: tl.constexpr):
    pdl.wait(PDL)
    row = tl.program_id(0).to(tl.int64)
    x_row = x_ptr + row * stride_xm
    offs = tl.arange(0, BLOCK_K)
    amax = tl.zeros([BLOCK_K], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        x = tl.load(x_row + k0 + offs, mask=offs < K - k0, other=0.0).to(tl.float32)
        amax = tl.maximum(amax, tl.abs(x))
    s = row_scale(tl.max(amax, axis=0), QMAX_)
    q_row = q_ptr + row * stride_qm
    for k0 in range(0, K, BLOCK_K):
        ok = offs < K - k0
        x = tl.load(x_row + k0 + offs, mask=ok, other=0.0).to(tl.float32)
        v = round_codes(tl.math.div_rn(x, s + tl.zeros_like(x)), INT8)
        if INT8:
            code = v.to(tl.int8)
        else:
            code = _e4m3_bits(v)
        if VALUES:
            tl.store(q_row + k0 + offs, (v * s).to(q_ptr.dtype.element_ty), mask=ok)
        else:
            tl.store(q_row + k0 + offs, code, mask=ok)
    if not VALUES:
        tl.store(s_ptr + row, s)


def _launch_rows(x: Tensor, out: Tensor, s: Tensor | None, fmt: str) -> None:
    m, k = x.shape
    if m == 0:
        return
    _quant_act_kernel[(m,)](
        x, out, s if s is not None else out, m, k, x.stride(0), out.stride(0), QMAX_=QMAX[fmt], INT8=fmt == "int8",
        VALUES=s is None, BLOCK_K=min(1024, triton.next_power_of_2(k)), num_warps=4, **pdl.options(x),
    )


def _rows(x: Tensor) -> Tensor:
    k = x.shape[-1]
    return x.reshape(-1, k) if x.stride(-1) == 1 else x.contiguous().view(-1, k)


def quant_codes(x: Tensor, fmt: str) -> tuple[Tensor, Tensor]:
    """(q [M, K] codes, s [M] float32 scales) of x [.., K] flattened to rows."""
    x2 = _rows(x)
    q = torch.empty(x2.shape, dtype=FORMATS[fmt], device=x.device)
    s = torch.empty(x2.shape[0], dtype=torch.float32, device=x.device)
    _launch_rows(x2, q.view(torch.uint8) if fmt == "float8_e4m3fn" else q, s, fmt)
    return q, s


def quant_values(x: Tensor, fmt: str, out: Tensor | None = None) -> Tensor:
    """quant_act(x, format=fmt): x's rows rounded through the format, in x's dtype (into `out`,
    a contiguous tensor of x's shape, when given)."""
    if fmt not in FORMATS:
        raise ValueError(f"quant_act format {fmt!r}: accepted {', '.join(FORMATS)}")
    x2 = _rows(x)
    y = out if out is not None else torch.empty(x.shape, dtype=x.dtype, device=x.device)
    _launch_rows(x2, y.view(x2.shape), None, fmt)
    return y


def _launch(outs: list[Tensor], args: list[Any], attrs: dict[str, Any]) -> None:
    y = outs[0]
    if y.is_contiguous():
        quant_values(args[0], attrs["format"], out=y)
    else:
        y.copy_(quant_values(args[0], attrs["format"]))


LAUNCHERS: dict[str, Launcher] = {"quant_act": _launch}

__all__ = ["FORMATS", "LAUNCHERS", "quant_codes", "quant_values", "round_codes", "row_scale"]
