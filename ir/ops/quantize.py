"""Weight-only quantization at compile time: ops over a float weight [N, K] that give the parts of
its canonical quantized form (kiln.ir.ops.quant), so a graph reads

    dequant_int(quantize_int(W){part=qweight}, quantize_int(W){part=scales}, quantize_int(W){part=zeros})

and weight folding (kiln.codegen.fold_weights) computes each part once, into a packed param;
the runtime only ever sees dequant_int over params. Each part is no larger than W, so it folds.

    quantize_int  bits 8, symmetric (no zeros part):  s[n] = max_k |w[n, k]| / 127,
                  q = round(w / s) + 128, clamped to [1, 255]   (group_size K, one scale a row)
                  bits 4, asymmetric (zeros part):    per group of `group_size` input channels,
                  lo = min(w, 0), hi = max(w, 0), s = (hi - lo) / 15, z = round(-lo / s),
                  q = clamp(round(w / s) + z, 0, 15)
    quantize_fp8  s[n] = max_k |w[n, k]| / 448, q = float8_e4m3fn(w / s)   (block_n 1, block_k K)

Round to nearest: dequant_int of the parts is within s / 2 of w in every element (lo and hi
are representable up to the rounding of z, so nothing is clipped). Scales are float32; an
all-zero row or group gets scale 1 (its weights are exactly 0 either way).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from kiln.errors import VerifyError
from kiln.ir.ops.quant import pack_int
from kiln.ir.ops.registry import register
from kiln.ir.types import TensorType, ValueType

INT_PARTS = ("qweight", "scales", "zeros")
"""The parts quantize_int gives (zeros only for bits 4)."""
FP8_PARTS = ("qweight", "scales")
"""The parts quantize_fp8 gives."""
FP8_MAX = 448.0
"""The largest float8_e4m3fn magnitude."""


def int_quantize(w: torch.Tensor, bits: int, group_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(q int32 [N, K], scales float32 [N, G], zeros uint8 [N, G] or None) of w [N, K] (module
    docstring); the search of AWQ scales calls this too."""
    n, k = w.shape
    if k % group_size:
        raise ValueError(f"{k} input channels are not a multiple of group_size {group_size}")
    w32 = w.to(torch.float32).reshape(n, k // group_size, group_size)
    if bits == 8:
        s = w32.abs().amax(dim=-1) / 127.0
        s = torch.where(s == 0, torch.ones_like(s), s)
        q = torch.round(w32 / s[..., None]).clamp_(-127, 127) + 128
        return q.reshape(n, k).to(torch.int32), s, None
    if bits != 4:
        raise ValueError(f"quantize_int: bits 4 or 8, got {bits}")
    lo = w32.amin(dim=-1).clamp(max=0)
    hi = w32.amax(dim=-1).clamp(min=0)
    s = (hi - lo) / 15.0
    s = torch.where(s == 0, torch.ones_like(s), s)
    z = torch.round(-lo / s).clamp_(0, 15)
    q = (torch.round(w32 / s[..., None]) + z[..., None]).clamp_(0, 15)
    return q.reshape(n, k).to(torch.int32), s, z.to(torch.uint8)


def int_dequantize(q: torch.Tensor, s: torch.Tensor, z: torch.Tensor | None, bits: int) -> torch.Tensor:
    """float32 [N, K] of int_quantize's parts (dequant_int's formula, unpacked)."""
    n, k = q.shape
    g = s.shape[1]
    zz = z.to(torch.float32)[..., None] if z is not None else float(1 << (bits - 1))
    return ((q.to(torch.float32).reshape(n, g, k // g) - zz) * s[..., None]).reshape(n, k)


def _int_infer(types: Sequence[ValueType], attrs: Mapping[str, Any]) -> TensorType:
    (w,) = types
    bits, group, part = attrs["bits"], attrs["group_size"], attrs["part"]
    if w.rank != 2 or bits not in (4, 8) or part not in INT_PARTS or (part == "zeros" and bits == 8):
        raise VerifyError(f"quantize_int needs a weight [N, K], bits 4 or 8 and part in {INT_PARTS} (zeros for "
                          f"bits 4 only), got {w}, bits {bits}, part {part!r}")
    n, k = w.shape
    if isinstance(k, int) and (k % group or (bits == 4 and k % 2)):
        raise VerifyError(f"quantize_int: {k} input channels do not split into groups of {group}"
                          f"{' of an even size' if bits == 4 else ''}")
    if part == "qweight":
        return TensorType("uint8", (n, k * bits // 8))
    return TensorType("float32" if part == "scales" else "uint8", (n, k // group))


@register("quantize_int", arity=1, kind="opaque", attrs=("bits", "group_size", "part"), infer=_int_infer,
          scalar_inputs=False)
def quantize_int(w: torch.Tensor, *, bits: int, group_size: int, part: str) -> torch.Tensor:
    """One part (qweight | scales | zeros) of w's round-to-nearest integer quantization."""
    q, s, z = int_quantize(w, bits, group_size)
    if part == "qweight":
        return pack_int(q, bits)
    return s if part == "scales" else z


def _fp8_infer(types: Sequence[ValueType], attrs: Mapping[str, Any]) -> TensorType:
    (w,) = types
    if w.rank != 2 or attrs["part"] not in FP8_PARTS:
        raise VerifyError(f"quantize_fp8 needs a weight [N, K] and part in {FP8_PARTS}, got {w}, {attrs['part']!r}")
    if attrs["part"] == "qweight":
        return TensorType("float8_e4m3fn", w.shape)
    return TensorType("float32", (w.shape[0], 1))


def fp8_quantize(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(q float8_e4m3fn [N, K], scales float32 [N, 1]) of w, one scale per output channel."""
    w32 = w.to(torch.float32)
    s = w32.abs().amax(dim=1, keepdim=True) / FP8_MAX
    s = torch.where(s == 0, torch.ones_like(s), s)
    return (w32 / s).clamp_(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn), s


@register("quantize_fp8", arity=1, kind="opaque", attrs=("part",), infer=_fp8_infer, scalar_inputs=False)
def quantize_fp8(w: torch.Tensor, *, part: str) -> torch.Tensor:
    """One part (qweight | scales) of w's float8_e4m3fn quantization, per output channel."""
    q, s = fp8_quantize(w)
    return q if part == "qweight" else s


__all__ = ["FP8_PARTS", "INT_PARTS", "fp8_quantize", "int_dequantize", "int_quantize", "quantize_fp8",
           "quantize_int"]
