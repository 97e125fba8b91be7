"""RMSNorm, the fused residual add + RMSNorm, and LayerNorm in Triton: one program per row.

A row up to _ONE_BLOCK wide is held in registers (one load); a wider one is walked in blocks,
once for its statistics and again to normalize it (the second read comes from L2). Statistics
are float32; results round where the torch references round (kernels.rms_normalize: the
normalized value cast to x's dtype before a Llama-style weight, or kept in float32 before a
float32 (offset + weight) for Gemma / OLMo2).
"""

from __future__ import annotations

from typing import Any

import torch
import triton
import triton.language as tl

from kiln.kernels import Launcher
from kiln.kernels.triton_kernels import pdl
from kiln.kernels.triton_kernels.elementwise import row_layout, row_offset

Tensor = torch.Tensor

_ONE_BLOCK = 8192
_LOOP_BLOCK = 2048


def _rows(x: Tensor, normalized: int) -> Tensor:
    """x seen as rows of its trailing `normalized` axes (a view unless they are not one block)."""
    if normalized > 1:
        x = x.flatten(-normalized)
    if x.stride(-1) != 1 and x.shape[-1] > 1:
        raise ValueError(f"a norm needs a unit-stride last axis, got shape {tuple(x.shape)} strides {x.stride()}")
    return x


def _config(n: int) -> tuple[int, int]:
    """(BLOCK, num_warps) for rows of n elements."""
    block = triton.next_power_of_2(n) if n <= _ONE_BLOCK else _LOOP_BLOCK
    return block, min(max(block // 512, 1), 8)


@triton.jit
def _rms_scale(w_ptr, cols, mask, y, offset, HAS_W: tl.constexpr, W_FP32: tl.constexpr,
               HAS_OFFSET: tl.constexpr, X_TY: tl.constexpr):
    # y: x * rstd in float32 -> the value before the final cast to the output's dtype.
    out = y
    if HAS_W:
        w = tl.load(w_ptr + cols, mask=mask, other=0.0)
        if W_FP32:  # Gemma / OLMo2: y * (offset + w) in float32
            out = y * (w.to(tl.float32) + offset)
        else:  # Llama: y cast to x's dtype, times (w + offset) in w's dtype
            if HAS_OFFSET:
                w = (w.to(tl.float32) + offset).to(w_ptr.dtype.element_ty)
            out = y.to(X_TY).to(tl.float32) * w.to(tl.float32)
    return out


@triton.jit
def _rms_norm_kernel(x_ptr, w_ptr, out_ptr, n, x_n1, x_s0, x_s1, o_n1, o_s0, o_s1, eps, offset,
                     HAS_W: tl.constexpr, W_FP32: tl.constexpr, HAS_OFFSET: tl.constexpr,
                     ONE_BLOCK: tl.constexpr, BLOCK: tl.constexpr, PDL: tl.constexpr):
    pdl.wait(PDL)
    r = tl.program_id(0)
    xrow = x_ptr + row_offset(r, x_n1, x_s0, x_s1)
    orow = out_ptr + row_offset(r, o_n1, o_s0, o_s1)
    X_TY: tl.constexpr = x_ptr.dtype.element_ty
    O_TY: tl.constexpr = out_ptr.dtype.element_ty
    cols = tl.arange(0, BLOCK)
    if ONE_BLOCK:
        mask = cols < n
        x = tl.load(xrow + cols, mask=mask, other=0.0).to(tl.float32)
        rstd = tl.rsqrt(tl.sum(x * x, axis=0) / n + eps)
        y = _rms_scale(w_ptr, cols, mask, x * rstd, offset, HAS_W, W_FP32, HAS_OFFSET, X_TY)
        tl.store(orow + cols, y.to(O_TY), mask=mask)
    else:
        acc = tl.zeros([BLOCK], dtype=tl.float32)
        for start in range(0, n, BLOCK):
            c = start + cols
            x = tl.load(xrow + c, mask=c < n, other=0.0).to(tl.float32)
            acc += x * x
        rstd = tl.rsqrt(tl.sum(acc, axis=0) / n + eps)
        for start in range(0, n, BLOCK):
            c = start + cols
            mask = c < n
            x = tl.load(xrow + c, mask=mask, other=0.0).to(tl.float32)
            y = _rms_scale(w_ptr, c, mask, x * rstd, offset, HAS_W, W_FP32, HAS_OFFSET, X_TY)
            tl.store(orow + c, y.to(O_TY), mask=mask)


@triton.jit
def _fused_add_rms_norm_kernel(x_ptr, res_ptr, w_ptr, out_ptr, sum_ptr, n,
                               x_n1, x_s0, x_s1, r_n1, r_s0, r_s1, o_n1, o_s0, o_s1, h_n1, h_s0, h_s1,
                               eps, offset, HAS_W: tl.constexpr, W_FP32: tl.constexpr,
                               HAS_OFFSET: tl.constexpr, ONE_BLOCK: tl.constexpr, BLOCK: tl.constexpr,
                               PDL: tl.constexpr):
    # h = x + residual (in x's dtype) -> sum_ptr; rms_norm(h) -> out_ptr.
    pdl.wait(PDL)
    r = tl.program_id(0)
    xrow = x_ptr + row_offset(r, x_n1, x_s0, x_s1)
    rrow = res_ptr + row_offset(r, r_n1, r_s0, r_s1)
    orow = out_ptr + row_offset(r, o_n1, o_s0, o_s1)
    hrow = sum_ptr + row_offset(r, h_n1, h_s0, h_s1)
    X_TY: tl.constexpr = x_ptr.dtype.element_ty
    O_TY: tl.constexpr = out_ptr.dtype.element_ty
    cols = tl.arange(0, BLOCK)
    if ONE_BLOCK:
        mask = cols < n
        a = tl.load(xrow + cols, mask=mask, other=0.0).to(tl.float32)
        b = tl.load(rrow + cols, mask=mask, other=0.0).to(tl.float32)
        h = (a + b).to(X_TY)
        tl.store(hrow + cols, h, mask=mask)
        h = h.to(tl.float32)
        rstd = tl.rsqrt(tl.sum(h * h, axis=0) / n + eps)
        y = _rms_scale(w_ptr, cols, mask, h * rstd, offset, HAS_W, W_FP32, HAS_OFFSET, X_TY)
        tl.store(orow + cols, y.to(O_TY), mask=mask)
    else:
        acc = tl.zeros([BLOCK], dtype=tl.float32)
        for start in range(0, n, BLOCK):
            c = start + cols
            mask = c < n
            a = tl.load(xrow + c, mask=mask, other=0.0).to(tl.float32)
            b = tl.load(rrow + c, mask=mask, other=0.0).to(tl.float32)
            h = (a + b).to(X_TY)
            tl.store(hrow + c, h, mask=mask)
            h = h.to(tl.float32)
            acc += h * h
        rstd = tl.rsqrt(tl.sum(acc, axis=0) / n + eps)
        for start in range(0, n, BLOCK):
            c = start + cols
            mask = c < n
            # the sum this program just stored: its own writes are visible to it
            h = tl.load(hrow + c, mask=mask, other=0.0).to(tl.float32)
            y = _rms_scale(w_ptr, c, mask, h * rstd, offset, HAS_W, W_FP32, HAS_OFFSET, X_TY)
            tl.store(orow + c, y.to(O_TY), mask=mask)


def _rms_flags(weight: Tensor | None, offset: float | None, weight_fp32: bool | None) -> dict[str, Any]:
    return {"HAS_W": weight is not None, "W_FP32": bool(weight_fp32), "HAS_OFFSET": bool(offset)}


def _rms_norm(outs: list[Tensor], args: list[Any], attrs: dict[str, Any]) -> None:
    # Without offset/weight_fp32 the reference is torch's F.rms_norm: x * rstd * weight in
    # float32, one cast (the weight_fp32 form with offset 0).
    x, weight = (args[0], args[1] if len(args) > 1 else None)
    x, out = _rows(x, len(attrs["normalized_shape"])), _rows(outs[0], len(attrs["normalized_shape"]))
    n = x.shape[-1]
    xn0, xn1, xs0, xs1 = row_layout(x)
    _, on1, os0, os1 = row_layout(out)
    if xn0 * xn1 == 0 or n == 0:
        return
    block, warps = _config(n)
    offset = float(attrs.get("offset") or 0.0)
    as_torch = attrs.get("offset") is None and attrs.get("weight_fp32") is None
    _rms_norm_kernel[(xn0 * xn1,)](
        x, weight if weight is not None else x, out, n, xn1, xs0, xs1, on1, os0, os1, float(attrs["eps"]), offset,
        **_rms_flags(weight, offset, as_torch or attrs["weight_fp32"]), ONE_BLOCK=n <= block, BLOCK=block,
        num_warps=warps, **pdl.options(x))


def _fused_add_rms_norm(outs: list[Tensor], args: list[Any], attrs: dict[str, Any]) -> None:
    x, res, weight = (*args[:2], args[2] if len(args) > 2 else None)
    out, h = outs
    n = x.shape[-1]
    if any(t.stride(-1) != 1 for t in (x, res, out, h)) and n > 1:
        raise ValueError("fused_add_rms_norm needs unit-stride last axes")
    xn0, xn1, xs0, xs1 = row_layout(x)
    if xn0 * xn1 == 0 or n == 0:
        return
    layouts = [row_layout(t)[1:] for t in (res, out, h)]
    block, warps = _config(n)
    offset = float(attrs["offset"])
    _fused_add_rms_norm_kernel[(xn0 * xn1,)](
        x, res, weight if weight is not None else x, out, h, n, xn1, xs0, xs1, *layouts[0], *layouts[1],
        *layouts[2], float(attrs["eps"]), offset, **_rms_flags(weight, offset, attrs["weight_fp32"]),
        ONE_BLOCK=n <= block, BLOCK=block, num_warps=warps, **pdl.options(x))


@triton.jit
def _layer_norm_kernel(x_ptr, w_ptr, b_ptr, out_ptr, n, x_n1, x_s0, x_s1, o_n1, o_s0, o_s1, eps,
                       HAS_W: tl.constexpr, HAS_B: tl.constexpr, ONE_BLOCK: tl.constexpr, BLOCK: tl.constexpr,
                       PDL: tl.constexpr):
    # (x - mean) * rstd (* w) (+ b) in float32, one cast to the output's dtype (F.layer_norm).
    pdl.wait(PDL)
    r = tl.program_id(0)
    xrow = x_ptr + row_offset(r, x_n1, x_s0, x_s1)
    orow = out_ptr + row_offset(r, o_n1, o_s0, o_s1)
    O_TY: tl.constexpr = out_ptr.dtype.element_ty
    cols = tl.arange(0, BLOCK)
    if ONE_BLOCK:
        mask = cols < n
        x = tl.load(xrow + cols, mask=mask, other=0.0).to(tl.float32)
        mean = tl.sum(x, axis=0) / n
        d = tl.where(mask, x - mean, 0.0)
        rstd = tl.rsqrt(tl.sum(d * d, axis=0) / n + eps)
        y = d * rstd
        if HAS_W:
            y = y * tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
        if HAS_B:
            y = y + tl.load(b_ptr + cols, mask=mask, other=0.0).to(tl.float32)
        tl.store(orow + cols, y.to(O_TY), mask=mask)
    else:
        acc = tl.zeros([BLOCK], dtype=tl.float32)
        for start in range(0, n, BLOCK):
            c = start + cols
            acc += tl.load(xrow + c, mask=c < n, other=0.0).to(tl.float32)
        mean = tl.sum(acc, axis=0) / n
        acc = tl.zeros([BLOCK], dtype=tl.float32)
        for start in range(0, n, BLOCK):
            c = start + cols
            mask = c < n
            d = tl.where(mask, tl.load(xrow + c, mask=mask, other=0.0).to(tl.float32) - mean, 0.0)
            acc += d * d
        rstd = tl.rsqrt(tl.sum(acc, axis=0) / n + eps)
        for start in range(0, n, BLOCK):
            c = start + cols
            mask = c < n
            y = (tl.load(xrow + c, mask=mask, other=0.0).to(tl.float32) - mean) * rstd
            if HAS_W:
                y = y * tl.load(w_ptr + c, mask=mask, other=0.0).to(tl.float32)
            if HAS_B:
                y = y + tl.load(b_ptr + c, mask=mask, other=0.0).to(tl.float32)
            tl.store(orow + c, y.to(O_TY), mask=mask)


def _layer_norm(outs: list[Tensor], args: list[Any], attrs: dict[str, Any]) -> None:
    it = iter(args[1:])
    weight = next(it) if attrs.get("has_weight", True) else None
    bias = next(it) if attrs.get("has_bias", True) else None
    k = len(attrs["normalized_shape"])
    x, out = _rows(args[0], k), _rows(outs[0], k)
    if weight is not None:
        weight = weight.reshape(-1)
    if bias is not None:
        bias = bias.reshape(-1)
    n = x.shape[-1]
    xn0, xn1, xs0, xs1 = row_layout(x)
    _, on1, os0, os1 = row_layout(out)
    if xn0 * xn1 == 0 or n == 0:
        return
    block, warps = _config(n)
    _layer_norm_kernel[(xn0 * xn1,)](
        x, weight if weight is not None else x, bias if bias is not None else x, out, n,
        xn1, xs0, xs1, on1, os0, os1, float(attrs["eps"]), HAS_W=weight is not None, HAS_B=bias is not None,
        ONE_BLOCK=n <= block, BLOCK=block, num_warps=warps, **pdl.options(x))


LAUNCHERS: dict[str, Launcher] = {
    "rms_norm": _rms_norm,
    "fused_add_rms_norm": _fused_add_rms_norm,
    "layer_norm": _layer_norm,
}
