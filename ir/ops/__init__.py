"""Every IR op, registered on import (see registry.py for what a registration holds)."""

from kiln.ir.ops import (  # noqa: F401  (registration)
    attention,
    elementwise,
    kernels,
    lora,
    nn,
    quant,
    quant_linear,
    quantize,
    reduce,
    shape,
)
from kiln.ir.ops.registry import OPS, OpDef, get_op, infer_type, register, resolve_attrs

__all__ = ["OPS", "OpDef", "get_op", "infer_type", "register", "resolve_attrs"]
