"""TIR pieces the cpu kernels share (this module imports TVM's script frontend; the package's
__init__ stays import-light)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import tvm
from tvm.script import tirx as T

F32 = "float32"

SER = 256
"""Default `ser` KiB of the row kernels (norms, rope, elementwise, fused): a call that moves at
most this much runs its rows on the calling thread, no fork and join of TVM's pool. The fork and
join costs ~3 us here (2 cores, loaded by others), a serial row of hidden 768 ~0.1 us; rms_norm
at hidden 768 ran serial 1.0 vs 7.4 us (8 rows, 48 KiB), 3.4 vs 6.1 (32 rows, 192 KiB), 7.3 vs
9.4 (64 rows, 384 KiB), even at 512 rows (3 MiB) as a loaded machine's parallel loop; 256 KiB
keeps prefill parallel for when the cores are free."""


def serial_bytes(config: dict[str, Any] | None) -> int:
    """The serial bound in bytes of a kernel config's `ser` KiB (default SER; 0: always parallel)."""
    ser = int((config or {}).get("ser", SER))
    if ser < 0:
        raise ValueError(f"ser={ser}: the serial bound is a size in KiB, 0 or more")
    return ser * 1024


def dtype_bytes(dtype: str) -> int:
    """Bytes per element of a TVM dtype."""
    return tvm.DataType(dtype).bits // 8


def rounded_to(dt: str) -> Callable:
    """v -> v rounded to dtype dt and back to float32, as torch rounds a 16-bit op's result
    (identity for float32)."""
    if dt == F32:
        return lambda v: v
    return lambda v: T.Cast(F32, T.Cast(dt, v))
