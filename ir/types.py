"""Tensor types of IR values: a dtype name and a shape of (symbolic) dims."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch

from kiln.ir.dims import Dim, dims_equal, evaluate

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float64": torch.float64,
    "int64": torch.int64,
    "int32": torch.int32,
    "int16": torch.int16,
    "int8": torch.int8,
    "uint8": torch.uint8,
    "bool": torch.bool,
    "float8_e4m3fn": torch.float8_e4m3fn,
    "float8_e5m2": torch.float8_e5m2,
    # Two 4-bit integers per byte along the last axis (quantized weights); shapes are logical.
    "int4": torch.uint8,
}
PACKED = {"int4": 2}
"""Dtypes stored several elements per byte: dtype -> elements per byte (along the last axis)."""
SHORT = {
    "float32": "f32",
    "float16": "f16",
    "bfloat16": "bf16",
    "float64": "f64",
    "int64": "i64",
    "int32": "i32",
    "int16": "i16",
    "int8": "i8",
    "uint8": "u8",
    "bool": "bool",
    "float8_e4m3fn": "f8e4m3",
    "float8_e5m2": "f8e5m2",
    "int4": "i4",
}
LONG = {v: k for k, v in SHORT.items()}
FLOAT_DTYPES = frozenset({"float32", "float16", "bfloat16", "float64"})


def dtype_name(dtype: torch.dtype) -> str:
    """The IR name of a torch dtype; ValueError for dtypes the IR does not carry."""
    for name, d in DTYPES.items():
        if d == dtype and name not in PACKED:
            return name
    raise ValueError(f"dtype {dtype} is not supported; accepted: {', '.join(DTYPES)}")


def torch_dtype(name: str) -> torch.dtype:
    """The torch dtype of an IR dtype name."""
    try:
        return DTYPES[name]
    except KeyError:
        raise ValueError(f"unknown dtype '{name}'; accepted: {', '.join(DTYPES)}") from None


@dataclass(frozen=True, slots=True)
class TensorType:
    """The type of one IR value."""

    dtype: str
    """IR dtype name (a key of DTYPES)."""
    shape: tuple[Dim, ...]
    """Sizes; an int, or a string naming a symbolic expression such as "T"."""

    @property
    def rank(self) -> int:
        return len(self.shape)

    def numel(self, bindings: Mapping[str, int] | None = None) -> int:
        """Number of elements, with symbolic dims bound by `bindings`."""
        size = 1
        for d in self.shape:
            size *= evaluate(d, bindings or {})
        return size

    @property
    def itemsize(self) -> float:
        """Bytes per element (a fraction for packed dtypes)."""
        return torch_dtype(self.dtype).itemsize / PACKED.get(self.dtype, 1)

    def nbytes(self, bindings: Mapping[str, int] | None = None) -> int:
        """Storage bytes with symbolic dims bound by `bindings`."""
        return int(self.numel(bindings) * self.itemsize)

    @property
    def types(self) -> tuple[TensorType, ...]:
        """The result types of a value: this one (see TupleType)."""
        return (self,)

    def same_as(self, other: TensorType | TupleType) -> bool:
        """Equal dtype and dims that are the same expressions."""
        return (
            isinstance(other, TensorType)
            and self.dtype == other.dtype
            and len(self.shape) == len(other.shape)
            and all(dims_equal(a, b) for a, b in zip(self.shape, other.shape, strict=True))
        )

    def __str__(self) -> str:
        return f"{SHORT[self.dtype]}[{','.join(str(d).replace(' ', '') for d in self.shape)}]"


@dataclass(frozen=True, slots=True)
class TupleType:
    """The type of a node with several results (a multi-result op); only `get_result`
    projections read such a node, each taking one element."""

    types: tuple[TensorType, ...]
    """The result types, in order."""

    def same_as(self, other: TensorType | TupleType) -> bool:
        return isinstance(other, TupleType) and len(self.types) == len(other.types) and all(
            a.same_as(b) for a, b in zip(self.types, other.types, strict=True)
        )

    def nbytes(self, bindings: Mapping[str, int] | None = None) -> int:
        return sum(t.nbytes(bindings) for t in self.types)

    def __str__(self) -> str:
        return "(" + ", ".join(str(t) for t in self.types) + ")"


ValueType = TensorType | TupleType
