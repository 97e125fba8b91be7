"""Gated activations (silu_and_mul, gelu_and_mul), soft-capping and the row gather, in Triton.

Row-wise ops see their input as rows of the last axis; `row_layout` maps a row index to its
offset for any leading dims that collapse into at most two strided axes, so a head view of a
merged projection ([T, H, D] with row stride != H * D) runs in place without a copy.
Each result rounds where the torch reference rounds (an activation in float32 cast to the
input's dtype, then the product), so half-precision results match it to the last bit but for
the transcendental functions' own error.
"""

from __future__ import annotations

from typing import Any

import torch
import triton
import triton.language as tl

from kiln.kernels import Launcher
from kiln.kernels.triton_kernels import pdl

Tensor = torch.Tensor

_MAX_BLOCK = 4096


def row_layout(x: Tensor) -> tuple[int, int, int, int]:
    """(n0, n1, s0, s1): row r of x (every axis but the last) starts at (r // n1) * s0 +
    (r % n1) * s1 elements from x's start. Axis 0 (the step's tokens) is always n0/s0, so a
    step of one token gets the layout, and the compiled kernel variant, of any other count;
    the axes between collapse into n1/s1 (ValueError when they cannot)."""
    if x.dim() < 2:
        return 1, 1, 0, 0
    merged: list[tuple[int, int]] = []
    for n, s in zip(x.shape[1:-1], x.stride()[1:-1], strict=True):
        if n == 1:
            continue
        if merged and merged[-1][1] == n * s:
            merged[-1] = (merged[-1][0] * n, s)
        else:
            merged.append((n, s))
    if len(merged) > 1:
        raise ValueError(f"rows of a tensor of shape {tuple(x.shape)} and strides {x.stride()} do not collapse "
                         "into two strided axes; make it contiguous first")
    n1, s1 = merged[0] if merged else (1, 0)
    return x.shape[0], n1, x.stride(0), s1


def tl_dtype(dtype: torch.dtype) -> tl.dtype:
    """The Triton dtype of a torch floating dtype (a constexpr argument)."""
    return {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32,
            torch.float64: tl.float64}[dtype]


@triton.jit
def row_offset(r, n1, s0, s1):
    """Offset of row r under row_layout's (n1, s0, s1), in int64."""
    r = r.to(tl.int64)
    return (r // n1) * s0 + (r % n1) * s1


@triton.jit
def tanh(z):
    """tanh from exp (tl.math.tanh is missing in some Triton versions): a series near 0, where
    1 - exp(-2|z|) would cancel, else (1 - e) / (1 + e) with e = exp(-2|z|) <= 1."""
    a = tl.abs(z)
    e = tl.exp(-2.0 * a)
    big = (1.0 - e) / (1.0 + e)
    z2 = a * a
    small = a * (1.0 + z2 * (-1.0 / 3.0 + z2 * (2.0 / 15.0 + z2 * (-17.0 / 315.0))))
    t = tl.where(a < 0.0625, small, big)
    return tl.where(z < 0, -t, t)


@triton.jit
def gated_value(g, u, ACT: tl.constexpr, X_TY: tl.constexpr):
    """act(g) * u in float32 from float32 gate and up values, the activation's result rounded
    to X_TY first as the torch reference rounds it. ACT 0: silu, 1: gelu (erf), 2: gelu (tanh)."""
    if ACT == 0:
        a = g / (1.0 + tl.exp(-g))
    elif ACT == 1:
        a = 0.5 * g * (1.0 + tl.math.erf(g * 0.7071067811865476))
    else:
        a = 0.5 * g * (1.0 + tanh(0.7978845608028654 * (g + 0.044715 * g * g * g)))
    return a.to(X_TY).to(tl.float32) * u


@triton.jit
def _gated_kernel(x_ptr, out_ptr, inter, x_n1, x_s0, x_s1, o_n1, o_s0, o_s1,
                  ACT: tl.constexpr, BLOCK: tl.constexpr, PDL: tl.constexpr):
    # x: [rows, 2I] = [gate | up]; out: [rows, I].
    pdl.wait(PDL)
    r = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < inter
    xrow = x_ptr + row_offset(r, x_n1, x_s0, x_s1)
    g = tl.load(xrow + cols, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(xrow + inter + cols, mask=mask, other=0.0).to(tl.float32)
    out = gated_value(g, u, ACT, x_ptr.dtype.element_ty).to(out_ptr.dtype.element_ty)
    tl.store(out_ptr + row_offset(r, o_n1, o_s0, o_s1) + cols, out, mask=mask)


def launch_gated(outs: list[Tensor], args: list[Any], act: int) -> None:
    """out = act(x[.., :I]) * x[.., I:] (outs [out], args [x]); act as in `gated_value`."""
    (x,), (out,) = args, outs
    inter = x.shape[-1] // 2
    if x.stride(-1) != 1 or out.stride(-1) != 1 or out.shape[-1] != inter:
        raise ValueError(f"gated activation of {tuple(x.shape)} into {tuple(out.shape)}: last axes must be "
                         "unit-stride, the output half as wide")
    xn0, xn1, xs0, xs1 = row_layout(x)
    _, on1, os0, os1 = row_layout(out)
    if xn0 * xn1 == 0 or inter == 0:
        return
    block = min(triton.next_power_of_2(inter), _MAX_BLOCK)
    grid = (xn0 * xn1, triton.cdiv(inter, block))
    _gated_kernel[grid](x, out, inter, xn1, xs0, xs1, on1, os0, os1, ACT=act, BLOCK=block,
                        num_warps=4 if block >= 1024 else 1, **pdl.options(x))


def _silu_and_mul(outs: list[Tensor], args: list[Any], attrs: dict[str, Any]) -> None:
    launch_gated(outs, args, 0)


_GELU = {"none": 1, "tanh": 2}


def act_code(gate: str, approximate: str | None = None) -> int:
    """`gated_value`'s ACT for a gated activation op ("silu_and_mul", or "gelu_and_mul" with its
    approximate attribute)."""
    if gate == "silu_and_mul":
        return 0
    if gate != "gelu_and_mul" or approximate not in _GELU:
        raise ValueError(f"no gated kernel for {gate} (approximate {approximate!r}); gelu takes {', '.join(_GELU)}")
    return _GELU[approximate]


def _gelu_and_mul(outs: list[Tensor], args: list[Any], attrs: dict[str, Any]) -> None:
    launch_gated(outs, args, act_code("gelu_and_mul", attrs["approximate"]))


@triton.jit
def _softcap_kernel(x_ptr, out_ptr, width, x_n1, x_s0, x_s1, o_n1, o_s0, o_s1, cap,
                    BLOCK: tl.constexpr, PDL: tl.constexpr):
    # tanh(x / cap) * cap, rounded after the division and the tanh as torch rounds them.
    pdl.wait(PDL)
    r = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < width
    x = tl.load(x_ptr + row_offset(r, x_n1, x_s0, x_s1) + cols, mask=mask, other=0.0)
    ty = out_ptr.dtype.element_ty
    z = (x.to(tl.float32) / cap).to(ty).to(tl.float32)
    t = tanh(z).to(ty).to(tl.float32)
    tl.store(out_ptr + row_offset(r, o_n1, o_s0, o_s1) + cols, (t * cap).to(ty), mask=mask)


def _softcap(outs: list[Tensor], args: list[Any], attrs: dict[str, Any]) -> None:
    (x,), (out,) = args, outs
    if x.dim() == 0:
        x, out = x.reshape(1), out.reshape(1)
    if x.stride(-1) != 1 or out.stride(-1) != 1:
        raise ValueError("softcap needs unit-stride last axes")
    xn0, xn1, xs0, xs1 = row_layout(x)
    _, on1, os0, os1 = row_layout(out)
    width = x.shape[-1]
    if xn0 * xn1 == 0 or width == 0:
        return
    block = min(triton.next_power_of_2(width), _MAX_BLOCK)
    grid = (xn0 * xn1, triton.cdiv(width, block))
    _softcap_kernel[grid](x, out, width, xn1, xs0, xs1, on1, os0, os1, float(attrs["cap"]), BLOCK=block,
                          num_warps=4 if block >= 1024 else 1, **pdl.options(x))


@triton.jit
def _gather_rows_kernel(x_ptr, idx_ptr, out_ptr, width, x_n1, x_s0, x_s1, o_n1, o_s0, o_s1,
                        BLOCK: tl.constexpr, PDL: tl.constexpr):
    # out[r] = x[idx[r]] over the row's `width` elements.
    pdl.wait(PDL)
    r = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < width
    src = tl.load(idx_ptr + r)
    v = tl.load(x_ptr + row_offset(src, x_n1, x_s0, x_s1) + cols, mask=mask)
    tl.store(out_ptr + row_offset(r, o_n1, o_s0, o_s1) + cols, v, mask=mask)


def _gather_rows(outs: list[Tensor], args: list[Any], attrs: dict[str, Any]) -> None:
    # A row of x [T, ...] is everything past axis 0, which must be one contiguous block (a
    # [T, H, D] view of one projection is; a slice of its heads is not).
    (x, idx), (out,) = args, outs
    if x.dim() == 1:
        x, out = x.unsqueeze(1), out.unsqueeze(1)
    width = out.shape[1:].numel()
    for t in (x, out):
        if not _rows_contiguous(t):
            raise ValueError(f"gather_rows needs contiguous rows, got shape {tuple(t.shape)} strides {t.stride()}")
    rows = idx.shape[0]
    if rows == 0 or width == 0:
        return
    block = min(triton.next_power_of_2(width), _MAX_BLOCK)
    grid = (rows, triton.cdiv(width, block))
    _gather_rows_kernel[grid](x, idx, out, width, 1, x.stride(0), 0, 1, out.stride(0), 0, BLOCK=block,
                              num_warps=4 if block >= 1024 else 1, **pdl.options(x))


def _rows_contiguous(t: Tensor) -> bool:
    expected = 1
    for n, s in reversed(list(zip(t.shape[1:], t.stride()[1:], strict=True))):
        if n != 1 and s != expected:
            return False
        expected *= n
    return True


LAUNCHERS: dict[str, Launcher] = {
    "silu_and_mul": _silu_and_mul,
    "gelu_and_mul": _gelu_and_mul,
    "softcap": _softcap,
    "gather_rows": _gather_rows,
}
