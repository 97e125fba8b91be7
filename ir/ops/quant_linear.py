"""quantized_linear: a linear layer over a packed weight (the kernel op the quantized-linear
pass emits; the canonical layouts are quant.py's).

    quantized_linear(x [.., K], qweight, scales[, zeros][, offsets][, g_idx][, bias [N]]) -> [.., N]
        format "int":  qweight uint8 [N, K * bits / 8], scales [N, G], zeros uint8 [N, G],
                       g_idx int32 [K]  (attrs bits, group_size: dequant_int's); or in place of
                       zeros and g_idx, float offsets [N, G] (has_offsets: dequant_int_offset's
                       q * scale + offset, GGUF's Q4_1)
        format "fp8":  qweight float8_e4m3fn [N, K], scales float32 [ceil(N / block_n),
                       ceil(K / block_k)]  (attrs block_n, block_k: dequant_fp8's; no zeros,
                       offsets or g_idx)
        act "none" | "int8" | "float8_e4m3fn": the activations' per-row dynamic quantization
                       (quant_act) before the product, or none (weight-only)
        dtype          the dequantized weight's dtype (the model's)

The optional operands are present exactly when has_zeros, has_offsets, has_g_idx, has_bias say,
in that order (has_offsets is optional, False when absent: graphs from before it stay valid).
The result is, bit for bit as the reference computes it,

    linear(quant_act(x, act) if act != "none" else x, dequant_X(qweight, scales, ...), bias)

with dequant_X dequant_int, dequant_int_offset (has_offsets) or dequant_fp8; a kernel may
accumulate in another order (and never materializes the [N, K] weight).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F

from kiln.errors import VerifyError
from kiln.ir.ops.quant import dequant_fp8, dequant_int, dequant_int_offset, quant_act
from kiln.ir.ops.registry import OPS, infer_type, register
from kiln.ir.types import TensorType, ValueType

FORMATS = ("int", "fp8")
"""Weight formats: canonical packed integers (dequant_int) or float8_e4m3fn blocks (dequant_fp8)."""
ACTS = ("none", "int8", "float8_e4m3fn")
"""Activation quantizations: none (weight-only) or quant_act's formats."""
INT_ATTRS = ("bits", "group_size")
FP8_ATTRS = ("block_n", "block_k")


def split_operands(inputs: Sequence[Any], attrs: Mapping[str, Any]) -> tuple[Any, Any, Any, Any, Any, Any, Any]:
    """(x, qweight, scales, zeros, offsets, g_idx, bias) of a quantized_linear's operands, None
    for each one its has_* attributes say is absent (works on nodes, types and tensors alike)."""
    x, qweight, scales, *rest = inputs
    zeros = rest.pop(0) if attrs["has_zeros"] else None
    offsets = rest.pop(0) if attrs.get("has_offsets") else None
    g_idx = rest.pop(0) if attrs["has_g_idx"] else None
    bias = rest.pop(0) if attrs["has_bias"] else None
    return x, qweight, scales, zeros, offsets, g_idx, bias


def _infer(types: Sequence[ValueType], attrs: Mapping[str, Any]) -> TensorType:
    fmt, act = attrs["format"], attrs["act"]
    if fmt not in FORMATS or act not in ACTS:
        raise VerifyError(f"quantized_linear format {fmt!r} / act {act!r}: accepted formats {', '.join(FORMATS)}, "
                          f"acts {', '.join(ACTS)}")
    flags = ("has_zeros", "has_offsets", "has_g_idx", "has_bias")
    want = 3 + sum(bool(attrs.get(f)) for f in flags)
    if len(types) != want:
        raise VerifyError(f"quantized_linear has {len(types)} operands; its {' / '.join(flags)} attributes say {want}")
    x, qweight, scales, zeros, offsets, g_idx, bias = split_operands(types, attrs)
    if fmt == "int" and offsets is not None:
        if any(attrs.get(a) is None for a in INT_ATTRS) or zeros is not None or g_idx is not None:
            raise VerifyError(f"quantized_linear with offsets needs attributes {', '.join(INT_ATTRS)} and takes no "
                              "zeros or g_idx")
        w = infer_type(OPS["dequant_int_offset"], [qweight, scales, offsets], attrs)
    elif fmt == "int":
        if any(attrs.get(a) is None for a in INT_ATTRS):
            raise VerifyError(f"quantized_linear format 'int' needs attributes {', '.join(INT_ATTRS)}")
        if zeros is not None and zeros.rank != 2 or g_idx is not None and g_idx.rank != 1:
            raise VerifyError(f"quantized_linear: zeros [N, G] and g_idx [K] expected, got {zeros} and {g_idx}")
        w = infer_type(OPS["dequant_int"], [qweight, scales, *(t for t in (zeros, g_idx) if t is not None)], attrs)
    else:
        if any(attrs.get(a) is None for a in FP8_ATTRS) or zeros is not None or offsets is not None \
                or g_idx is not None:
            raise VerifyError(f"quantized_linear format 'fp8' needs attributes {', '.join(FP8_ATTRS)} and takes "
                              "no zeros, offsets or g_idx")
        w = infer_type(OPS["dequant_fp8"], [qweight, scales], attrs)
    if not isinstance(x, TensorType) or x.rank < 1 or x.dtype != attrs["dtype"]:
        raise VerifyError(f"quantized_linear: x {x} must be a tensor of the weight's dtype {attrs['dtype']}")
    n, k = w.shape
    if x.shape[-1] != k or bias is not None and (bias.rank != 1 or bias.shape[0] != n):
        raise VerifyError(f"quantized_linear of x {x} by a weight [{n}, {k}] with bias {bias}: shapes disagree")
    return TensorType(x.dtype, (*x.shape[:-1], n))


@register("quantized_linear", arity=(3, 6), kind="opaque", attrs=("format", "act", "dtype", "has_zeros",
          "has_g_idx", "has_bias"), optional_attrs=(*INT_ATTRS, *FP8_ATTRS, "has_offsets"), infer=_infer,
          scalar_inputs=False, kernel=True)
def quantized_linear(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, *rest: torch.Tensor, format: str,
                     act: str, dtype: str, has_zeros: bool, has_g_idx: bool, has_bias: bool,
                     bits: int | None = None, group_size: int | None = None, block_n: int | None = None,
                     block_k: int | None = None, has_offsets: bool = False) -> torch.Tensor:
    """linear(quant_act(x) if act != "none" else x, dequant_int | dequant_int_offset |
    dequant_fp8 of the packed weight, bias): operands x, qweight, scales, then zeros, offsets,
    g_idx and bias where has_* say."""
    attrs = {"has_zeros": has_zeros, "has_offsets": has_offsets, "has_g_idx": has_g_idx, "has_bias": has_bias}
    x, qweight, scales, zeros, offsets, g_idx, bias = split_operands([x, qweight, scales, *rest], attrs)
    if offsets is not None:
        w = dequant_int_offset(qweight, scales, offsets, bits=bits, group_size=group_size, dtype=dtype)
    elif format == "int":
        extra = [t for t in (zeros, g_idx) if t is not None]
        w = dequant_int(qweight, scales, *extra, bits=bits, group_size=group_size, dtype=dtype)
    else:
        w = dequant_fp8(qweight, scales, block_n=block_n, block_k=block_k, dtype=dtype)
    if act != "none":
        x = quant_act(x, format=act)
    return F.linear(x, w, bias)


def packed_bytes(types: Sequence[TensorType], attrs: Mapping[str, Any]) -> int:
    """Bytes of a quantized_linear's weight operands (qweight, scales, zeros, offsets, g_idx; not
    bias)."""
    _, qweight, scales, zeros, offsets, g_idx, _ = split_operands(types, attrs)
    return sum(t.nbytes({}) for t in (qweight, scales, zeros, offsets, g_idx) if t is not None)


__all__ = ["ACTS", "FORMATS", "packed_bytes", "quantized_linear", "split_operands"]
