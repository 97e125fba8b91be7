"""One adapter per pre-quantized checkpoint format: each reads its quantization_config (an
option it cannot read is a CheckpointError naming it) and says, per linear, which tensors hold
the weight and how they repack into kiln.ir.ops.quant's canonical layouts."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from kiln.models.quant_formats.awq import AWQ
from kiln.models.quant_formats.common import (
    Options,
    QuantFormat,
    QuantizedLinear,
    Store,
    unsupported,
)
from kiln.models.quant_formats.compressed_tensors import CompressedTensors
from kiln.models.quant_formats.fp8 import FP8
from kiln.models.quant_formats.gptq import GPTQ

READERS: dict[str, Callable[[Options], QuantFormat]] = {
    "gptq": GPTQ.read,
    "awq": AWQ.read,
    "fp8": FP8.read,
    "compressed-tensors": CompressedTensors.read,
}
"""quant_method -> the reader of its quantization_config."""


def read_format(qc: Mapping[str, Any], where: str) -> QuantFormat:
    """The adapter of quantization_config `qc` (`where` names the checkpoint in messages)."""
    method = qc.get("quant_method")
    method = method.lower() if isinstance(method, str) else method
    if method not in READERS:
        raise unsupported(where, f"quant_method {method!r}", ", ".join(map(repr, READERS)))
    return READERS[method](Options(f"{where} ({method})", qc))


__all__ = ["READERS", "QuantFormat", "QuantizedLinear", "Store", "read_format"]
