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


def exp_f32(x):
    """exp(x) of a float32 expression as vector arithmetic: LLVM turns T.exp into one libm expf
    call per lane (silu_and_mul at hidden 2048: 30 us a decode row). Cephes' expf: x = n ln2 + r,
    |r| <= ln2 / 2 (ln2 in two parts), a degree-7 polynomial of r, times 2^n built in the
    exponent bits; within 2 ulp of expf. x is clamped to [-87.3, 88], where 2^n is a normal
    float: what would be 0 comes out as 1.2e-38, what would pass exp(88) = 1.65e38 as that."""
    x = T.max(T.min(x, T.float32(88.0)), T.float32(-87.3365447504019))
    n = T.floor(x * T.float32(1.44269504088896341) + T.float32(0.5))
    r = x - n * T.float32(0.693359375) - n * T.float32(-2.12194440e-4)
    p = T.float32(1.9875691500e-4)
    for c in (1.3981999507e-3, 8.3334519073e-3, 4.1665795894e-2, 1.6666665459e-1, 5.0000001201e-1):
        p = p * r + T.float32(c)
    scale = T.reinterpret(F32, T.shift_left(T.Cast("int32", n) + T.int32(127), T.int32(23)))
    return (p * r * r + r + T.float32(1)) * scale
