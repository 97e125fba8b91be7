"""What every format adapter shares: the plan of one quantized linear, the checkpoint tensors
it reads, and the unpacking of integers packed in int32 words."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from safetensors import safe_open

from kiln.errors import CheckpointError
from kiln.frontend.weights import SourceWeights
from kiln.ir.types import TensorType, dtype_name

SAFETENSORS_DTYPES = {
    "F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "I64": "int64",
    "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool",
    "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2", "F8_E8M0": "float8_e8m0fnu",
}
"""safetensors' dtype names -> IR dtype names."""


@dataclass(frozen=True)
class QuantizedLinear:
    """How one linear's weight [N, K] is read: `op` (dequant_int | dequant_fp8) with `attrs`
    over new params `<module>.<suffix>` of `params`' canonical types, in the op's input order,
    whose tensors `repack()` computes from the checkpoint; `act` is the quant_act format of the
    linear's input, or None (weights only)."""

    op: str
    """The canonical op of kiln.ir.ops.quant that dequantizes the weight."""
    attrs: dict[str, Any]
    """The op's attributes (bits, group_size, block sizes; dtype is added by the caller)."""
    params: dict[str, TensorType]
    """Param suffix -> canonical type, in the op's input order."""
    repack: Callable[[], dict[str, torch.Tensor]]
    """The canonical tensors of every param suffix, read from the checkpoint."""
    act: str | None = None
    """quant_act's format for the linear's input (int8 | float8_e4m3fn), or None."""


class Store:
    """The checkpoint's tensors by module path, as stored: names resolved like the traced
    params' (base-model prefix added or removed), shapes and dtypes read from the file headers."""

    def __init__(self, source: SourceWeights):
        self.source = source
        self.ckpt = source.ckpt
        self._meta: dict[str, tuple[tuple[int, ...], str]] = {}

    def key(self, name: str) -> str | None:
        """The checkpoint key holding `name`, or None."""
        return self.source.source_key(name)

    def has(self, name: str) -> bool:
        return self.key(name) is not None

    def meta(self, name: str) -> tuple[tuple[int, ...], str]:
        """(shape, IR dtype) of the stored tensor `name`, without reading it."""
        key = self._require(name)
        if key not in self._meta:
            path = self.ckpt.key_to_file[key]
            if path.suffix == ".safetensors":
                with safe_open(path, framework="pt") as f:
                    sl = f.get_slice(key)
                    shape, dtype = tuple(sl.get_shape()), SAFETENSORS_DTYPES.get(sl.get_dtype(), sl.get_dtype())
            else:  # not a safetensors file (a GGUF checkpoint, say): read the tensor
                t = self.ckpt.read(key)
                shape, dtype = tuple(t.shape), dtype_name(t.dtype)
            self._meta[key] = shape, dtype
        return self._meta[key]

    def read(self, name: str) -> torch.Tensor:
        """The stored tensor `name`, dtype untouched."""
        return self.ckpt.read(self._require(name))

    def _require(self, name: str) -> str:
        key = self.key(name)
        if key is None:
            raise CheckpointError(f"quantized checkpoint {self.ckpt.path} has no tensor '{name}'")
        return key

    def expect(self, name: str, shape: tuple[int, ...], dtypes: tuple[str, ...]) -> str:
        """The stored dtype of `name`, after checking its shape and dtype (CheckpointError)."""
        got_shape, got_dtype = self.meta(name)
        if got_shape != tuple(shape) or got_dtype not in dtypes:
            raise CheckpointError(
                f"tensor '{name}' in {self.ckpt.path} is {got_dtype} {list(got_shape)}; the quantization_config "
                f"and the model's shape imply {' or '.join(dtypes)} {list(shape)}"
            )
        return got_dtype


class QuantFormat(Protocol):
    """One quantization_config, read: which linears it quantizes and how each is stored."""

    method: str
    """quant_method, as config.json spells it."""

    def plan(self, module: str, weight: TensorType, store: Store) -> QuantizedLinear | None:
        """How `module`'s weight (traced type [N, K]) is stored, or None when it is dense."""
        ...


@dataclass
class Options:
    """A quantization_config's entries, read with the checks every adapter repeats: each
    accepted key is taken once, and an unsupported value is a CheckpointError naming it."""

    where: str
    """What the entries belong to, for messages (the config path and the method)."""
    entries: Mapping[str, Any]
    seen: set[str] = field(default_factory=set)

    def get(self, key: str, default: Any = None) -> Any:
        self.seen.add(key)
        value = self.entries.get(key)
        return default if value is None else value

    def one_of(self, key: str, accepted: tuple[Any, ...], default: Any = None) -> Any:
        """The value of `key`, which must be one of `accepted`."""
        value = self.get(key, default)
        norm = value.lower() if isinstance(value, str) else value
        if norm not in accepted:
            raise unsupported(self.where, f"{key} {value!r}", ", ".join(repr(a) for a in accepted))
        return norm


def unsupported(where: str, what: str, accepted: str) -> CheckpointError:
    """The error for a quantization option kiln cannot read."""
    return CheckpointError(f"{where}: quantization_config's {what} is not supported; kiln reads {accepted}")


def unpack_words(words: torch.Tensor, bits: int, dim: int, order: tuple[int, ...] | None = None) -> torch.Tensor:
    """Unsigned `bits`-bit integers packed into int32 words along `dim`, low bits first: the
    word's field i holds element `order[i]` of its run (the identity when `order` is None).
    Returns int32 values with `dim` grown 32 / bits times."""
    per = 32 // bits
    order = order or tuple(range(per))
    w = words.to(torch.int32).movedim(dim, -1)
    fields = [(w >> (bits * i)) & ((1 << bits) - 1) for i in range(per)]
    place = [0] * per
    for i, elem in enumerate(order):
        place[elem] = i
    out = torch.stack([fields[place[e]] for e in range(per)], dim=-1).flatten(-2)
    return out.movedim(-1, dim)
