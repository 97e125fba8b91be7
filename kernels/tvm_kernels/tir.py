"""TIR pieces the cpu kernels share (this module imports TVM's script frontend; the package's
__init__ stays import-light)."""

from __future__ import annotations

from collections.abc import Callable

from tvm.script import tirx as T

F32 = "float32"


def rounded_to(dt: str) -> Callable:
    """v -> v rounded to dtype dt and back to float32, as torch rounds a 16-bit op's result
    (identity for float32)."""
    if dt == F32:
        return lambda v: v
    return lambda v: T.Cast(F32, T.Cast(dt, v))
