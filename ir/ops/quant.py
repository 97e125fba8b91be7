"""Quantized weights and activations: the ops every quantized checkpoint format and every
compile-time quantization lowers to (kiln's canonical layouts; adapters repack into them).

    dequant_int  qweight uint8 [N, K * bits / 8], scales [N, G] (+ zeros uint8 [N, G],
                 g_idx int32 [K]) -> [N, K] in `dtype`
    dequant_int_offset  qweight uint8 [N, K * bits / 8], scales [N, G], offsets [N, G] -> [N, K]
    dequant_fp8  qweight float8_e4m3fn [N, K], scales float32 [ceil(N / block_n), ceil(K / block_k)]
                 -> [N, K] in `dtype`
    quant_act    x [.., K] -> x rounded through a per-row dynamic quantization (int8 or fp8)

Integer weights, `bits` 4 or 8: q[n, k] is unsigned, in [0, 2^bits); with bits 4 byte j of row
n holds k = 2j in its low nibble and k = 2j + 1 in its high one. Input channel k belongs to
group g(k) = g_idx[k] when g_idx is given (GPTQ's act-order), else k // group_size (group_size
K: one scale per output channel); G groups per row. The zero point z is zeros[n, g(k)], or
2^(bits - 1) without zeros (symmetric). The weight is

    w[n, k] = ((q[n, k] - z) * scales[n, g(k)])   in float32, then cast to `dtype`

which is exact before the cast (an integer of at most 9 bits times a float16 / bfloat16 /
float32 scale fits float32's mantissa), so a checkpoint's known weights come back bit for bit.

Integer weights with a float offset per group (GGUF's Q4_1: w = d * q + m), same packing and
groups (no g_idx); a float zero point does not fit dequant_int's integer zeros (a linear over
it becomes quantized_linear with has_offsets):

    w[n, k] = q[n, k] * scales[n, g(k)] + offsets[n, g(k)]   in float32, then cast to `dtype`

FP8 weights: w = float32(q) * scales[n // block_n, k // block_k], then cast: per-tensor scale
(block_n = N, block_k = K), per output channel (1, K), or DeepSeek-V3's 128 x 128 blocks.

quant_act (W8A8 and fp8 activations): per row of x, s = max|x| / qmax (127 for int8, 448 for
float8_e4m3fn), x / s rounded to the format (int8: round half to even, clamped to [-128, 127];
fp8: cast), times s, in float32, then cast back to x's dtype; an all-zero row stays zero.
A kernel that multiplies in the quantized domain computes the same products up to the order
of its accumulation.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from kiln.errors import VerifyError
from kiln.ir.ops.registry import register
from kiln.ir.types import TensorType, ValueType, torch_dtype

QMAX = {"int8": 127.0, "float8_e4m3fn": 448.0}
"""The largest magnitude of each activation format of quant_act."""


def unpack_int(qweight: torch.Tensor, bits: int) -> torch.Tensor:
    """q [N, K] (int32) from the canonical packing of `bits`-bit unsigned weights."""
    q = qweight.to(torch.int32)
    if bits == 8:
        return q
    low, high = q & 0xF, q >> 4
    return torch.stack([low, high], dim=-1).flatten(-2)


def pack_int(q: torch.Tensor, bits: int) -> torch.Tensor:
    """The canonical packing (uint8 [N, K * bits / 8]) of unsigned `bits`-bit weights q [N, K]."""
    q = q.to(torch.int32)
    if q.min() < 0 or q.max() >= 1 << bits:
        raise ValueError(f"{bits}-bit weights must lie in [0, {1 << bits})")
    if bits == 8:
        return q.to(torch.uint8)
    if q.shape[-1] % 2:
        raise ValueError(f"4-bit weights need an even number of input channels, got {q.shape[-1]}")
    return (q[..., 0::2] | (q[..., 1::2] << 4)).to(torch.uint8)


def group_index(k: int, group_size: int, g_idx: torch.Tensor | None, device: torch.device) -> torch.Tensor:
    """g(k) for every input channel: g_idx, or k // group_size."""
    if g_idx is not None:
        return g_idx.to(torch.long)
    return torch.arange(k, device=device) // group_size


def _dequant_int_infer(types: Sequence[ValueType], attrs: Mapping[str, Any]) -> TensorType:
    qweight, scales = types[:2]
    bits, group = attrs["bits"], attrs["group_size"]
    if bits not in (4, 8) or qweight.dtype != "uint8" or qweight.rank != 2 or scales.rank != 2:
        raise VerifyError(f"dequant_int needs bits 4 or 8 and uint8 qweight [N, K*bits/8] with scales [N, G], "
                          f"got bits {bits}, {qweight} and {scales}")
    n, k = qweight.shape[0], qweight.shape[1] * 8 // bits
    if scales.shape[0] != n:
        raise VerifyError(f"dequant_int: scales {scales} do not have the {n} rows of {qweight}")
    for extra in types[2:]:
        if extra.rank not in (1, 2):
            raise VerifyError(f"dequant_int: zeros [N, G] or g_idx [K] expected, got {extra}")
    if isinstance(k, int) and isinstance(group, int) and not any(t.rank == 1 for t in types[2:]) \
            and k % group:
        raise VerifyError(f"dequant_int: {k} input channels are not a multiple of group_size {group}")
    return TensorType(attrs["dtype"], (n, k))


@register("dequant_int", arity=(2, 4), kind="opaque", attrs=("bits", "group_size", "dtype"),
          infer=_dequant_int_infer, scalar_inputs=False)
def dequant_int(qweight: torch.Tensor, scales: torch.Tensor, *rest: torch.Tensor, bits: int, group_size: int,
                dtype: str) -> torch.Tensor:
    """The [N, K] weight of canonical packed integers (module docstring): inputs qweight,
    scales, then optionally zeros (uint8 [N, G]) and g_idx (int32 [K]), told apart by rank."""
    zeros = next((t for t in rest if t.dim() == 2), None)
    g_idx = next((t for t in rest if t.dim() == 1), None)
    q = unpack_int(qweight, bits)
    g = group_index(q.shape[1], group_size, g_idx, q.device)
    z = zeros.to(torch.int32)[:, g] if zeros is not None else 1 << (bits - 1)
    return ((q - z).to(torch.float32) * scales.to(torch.float32)[:, g]).to(torch_dtype(dtype))


def _dequant_int_offset_infer(types: Sequence[ValueType], attrs: Mapping[str, Any]) -> TensorType:
    qweight, scales, offsets = types
    bits, group = attrs["bits"], attrs["group_size"]
    if bits not in (4, 8) or qweight.dtype != "uint8" or qweight.rank != 2:
        raise VerifyError(f"dequant_int_offset needs bits 4 or 8 and uint8 qweight [N, K*bits/8], got bits {bits} "
                          f"and {qweight}")
    floats = ("float16", "bfloat16", "float32")
    if scales.rank != 2 or scales.dtype not in floats or offsets.shape != scales.shape or offsets.dtype not in floats:
        raise VerifyError(f"dequant_int_offset needs float scales and offsets of one shape [N, G], got {scales} and "
                          f"{offsets}")
    n, k = qweight.shape[0], qweight.shape[1] * 8 // bits
    if scales.shape[0] != n:
        raise VerifyError(f"dequant_int_offset: scales {scales} do not have the {n} rows of {qweight}")
    if all(isinstance(d, int) for d in (k, group, scales.shape[1])) and (k % group or k // group != scales.shape[1]):
        raise VerifyError(f"dequant_int_offset: {k} input channels in groups of {group} do not give the "
                          f"{scales.shape[1]} groups of {scales}")
    return TensorType(attrs["dtype"], (n, k))


@register("dequant_int_offset", arity=3, kind="opaque", attrs=("bits", "group_size", "dtype"),
          infer=_dequant_int_offset_infer, scalar_inputs=False)
def dequant_int_offset(qweight: torch.Tensor, scales: torch.Tensor, offsets: torch.Tensor, *, bits: int,
                       group_size: int, dtype: str) -> torch.Tensor:
    """The [N, K] weight q * scale + offset of canonical packed unsigned integers (module docstring).
    It unpacks in uint8 and scales whole groups in place (the reference of quantized_linear's
    offsets, and what a linear the quantized-linear pass did not fuse runs every call)."""
    n = qweight.shape[0]
    q = qweight if bits == 8 else torch.stack([qweight & 0xF, qweight >> 4], dim=-1)
    w = q.reshape(n, -1, group_size).to(torch.float32)  # [N, G, group_size]
    w.mul_(scales.to(torch.float32)[..., None]).add_(offsets.to(torch.float32)[..., None])
    return w.reshape(n, -1).to(torch_dtype(dtype))


def _dequant_fp8_infer(types: Sequence[ValueType], attrs: Mapping[str, Any]) -> TensorType:
    qweight, scales = types
    if qweight.dtype != "float8_e4m3fn" or qweight.rank != 2 or scales.rank != 2 or scales.dtype != "float32":
        raise VerifyError(f"dequant_fp8 needs float8_e4m3fn qweight [N, K] and float32 scales, got {qweight} "
                          f"and {scales}")
    return TensorType(attrs["dtype"], qweight.shape)


@register("dequant_fp8", arity=2, kind="opaque", attrs=("block_n", "block_k", "dtype"), infer=_dequant_fp8_infer,
          scalar_inputs=False)
def dequant_fp8(qweight: torch.Tensor, scales: torch.Tensor, *, block_n: int, block_k: int, dtype: str) -> torch.Tensor:
    """The [N, K] weight of float8_e4m3fn values times their block's scale (module docstring)."""
    n, k = qweight.shape
    s = scales.repeat_interleave(block_n, 0)[:n].repeat_interleave(block_k, 1)[:, :k]
    return (qweight.to(torch.float32) * s).to(torch_dtype(dtype))


@register("quant_act", arity=1, kind="opaque", attrs=("format",), scalar_inputs=False)
def quant_act(x: torch.Tensor, *, format: str) -> torch.Tensor:
    """x through a per-row dynamic quantization to `format` (int8 | float8_e4m3fn) and back."""
    if format not in QMAX:
        raise ValueError(f"quant_act format {format!r}: accepted {', '.join(QMAX)}")
    x32 = x.to(torch.float32)
    s = x32.abs().amax(dim=-1, keepdim=True) / QMAX[format]
    s = torch.where(s == 0, torch.ones_like(s), s)
    if format == "int8":
        q = torch.round(x32 / s).clamp_(-128, 127)
    else:
        q = (x32 / s).to(torch.float8_e4m3fn).to(torch.float32)
    return (q * s).to(x.dtype)


__all__ = ["QMAX", "dequant_fp8", "dequant_int", "dequant_int_offset", "group_index", "pack_int", "quant_act", "unpack_int"]
