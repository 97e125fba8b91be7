"""The converter table: aten op (schema name) -> function emitting kiln IR.

Each converter receives the Converter, the call's arguments bound by schema name, and torch's
fake value of the result (used only for dtypes of factory ops). Arguments that are tensors
arrive as IR nodes, sizes as ints or symbolic dims.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from kiln.frontend.convert import Converter
from kiln.ir.dims import Dim
from kiln.ir.graph import Node

Conv = Callable[[Converter, dict[str, Any], Any], Any]
TABLE: dict[str, Conv] = {}

# Slice bounds at or past this mean "to the end" (torch writes sys.maxsize).
BIG = 1 << 62


def conv(*names: str) -> Callable[[Conv], Conv]:
    """Register a converter under one or more aten schema names."""

    def deco(fn: Conv) -> Conv:
        for n in names:
            TABLE[n] = fn
        return fn

    return deco


def reshape(cv: Converter, x: Node, shape: list[Dim]) -> Node:
    return cv.emit("reshape", [x], shape=list(shape))


__all__ = ["BIG", "TABLE", "Conv", "Converter", "conv", "reshape"]
