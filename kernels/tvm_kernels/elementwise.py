"""Elementwise and gather kernels: silu_and_mul, gelu_and_mul (erf and tanh), softcap,
gather_rows and embedding. Rows run in parallel, the inner axis vectorized."""

from __future__ import annotations

import math

from tvm.script import tirx as T

from kiln.kernels.tvm_kernels import AS_IS, FLOATS, ROWS, Kernel, OpInfo, last_dim, name_of, short
from kiln.kernels.tvm_kernels.tir import F32, rounded_to


def _gate(kind: str):
    """act(g) on float32 as torch computes it: silu, gelu (erf) or gelu (tanh)."""
    if kind == "silu":
        return lambda g: g / (T.float32(1) + T.exp(-g))
    if kind == "none":
        return lambda g: T.float32(0.5) * g * (T.float32(1) + T.erf(g * T.float32(1 / math.sqrt(2))))
    k = math.sqrt(2 / math.pi)
    return lambda g: T.float32(0.5) * g * (T.float32(1) + T.tanh(T.float32(k) * (g + T.float32(0.044715) * g * g * g)))


def _gated_func(i_dim: int, dt: str, kind: str):
    act = _gate(kind)
    rnd = rounded_to(dt)

    @T.prim_func(private=True)
    def func(x_h: T.handle, y_h: T.handle):
        A = T.int64()
        B = T.int64()
        sx0, sx1, sy0, sy1 = T.int64(), T.int64(), T.int64(), T.int64()
        X = T.match_buffer(x_h, (A, B, 2 * i_dim), dt, strides=(sx0, sx1, 1), offset_factor=1)
        Y = T.match_buffer(y_h, (A, B, i_dim), dt, strides=(sy0, sy1, 1), offset_factor=1)
        for row in T.parallel(A * B):
            for k in T.vectorized(i_dim):
                # act rounds to the dtype, then the product rounds again (two torch ops)
                Y[row // B, row % B, k] = T.Cast(
                    dt, rnd(act(T.Cast(F32, X[row // B, row % B, k]))) * T.Cast(F32, X[row // B, row % B, i_dim + k]))

    return func


def _gated(kind_of):
    def build(info: OpInfo) -> Kernel | None:
        x = info.inputs[0]
        n = last_dim(x)
        if n is None or n % 2 or x.dtype not in FLOATS:
            return None
        kind = kind_of(info.attrs)
        if kind not in ("silu", "none", "tanh"):
            return None
        name = name_of(info.op, f"i{n // 2}", short(x.dtype), "" if kind == "silu" else kind)
        return Kernel(name, _gated_func(n // 2, x.dtype, kind), (0,), (0,), (ROWS, ROWS))

    return build


def _softcap_func(n: int, dt: str, cap: float):
    rnd = rounded_to(dt)

    @T.prim_func(private=True)
    def func(x_h: T.handle, y_h: T.handle):
        A = T.int64()
        B = T.int64()
        sx0, sx1, sy0, sy1 = T.int64(), T.int64(), T.int64(), T.int64()
        X = T.match_buffer(x_h, (A, B, n), dt, strides=(sx0, sx1, 1), offset_factor=1)
        Y = T.match_buffer(y_h, (A, B, n), dt, strides=(sy0, sy1, 1), offset_factor=1)
        for row in T.parallel(A * B):
            for k in T.vectorized(n):
                Y[row // B, row % B, k] = T.Cast(
                    dt, rnd(T.tanh(rnd(T.Cast(F32, X[row // B, row % B, k]) / T.float32(cap)))) * T.float32(cap))

    return func


def softcap(info: OpInfo) -> Kernel | None:
    x = info.inputs[0]
    n = last_dim(x)
    if n is None or x.dtype not in FLOATS or info.outputs[0].dtype != x.dtype:
        return None
    cap = float(info.attrs["cap"])
    return Kernel(name_of("softcap", f"n{n}", short(x.dtype), f"c{cap:g}"), _softcap_func(n, x.dtype, cap),
                  (0,), (0,), (ROWS, ROWS))


def _rows_func(n: int, dt: str, idt: str):
    """out[r, :] = x[idx[r], :] (gather_rows, and embedding with x the table)."""

    @T.prim_func(private=True)
    def func(x_h: T.handle, i_h: T.handle, y_h: T.handle):
        M = T.int64()
        R = T.int64()
        sx0, sy0 = T.int64(), T.int64()
        X = T.match_buffer(x_h, (M, n), dt, strides=(sx0, 1), offset_factor=1)
        Idx = T.match_buffer(i_h, (R,), idt, offset_factor=1)
        Y = T.match_buffer(y_h, (R, n), dt, strides=(sy0, 1), offset_factor=1)
        for r in T.parallel(R):
            for k in T.vectorized(n):
                Y[r, k] = X[T.Cast("int64", Idx[r]), k]

    return func


def gather_rows(info: OpInfo) -> Kernel | None:
    x, idx = info.inputs
    n = last_dim(x)
    if n is None or x.rank != 2 or idx is None or idx.rank != 1 or not idx.dtype.startswith("int"):
        return None
    name = name_of("gather_rows", f"n{n}", short(x.dtype), short(idx.dtype))
    return Kernel(name, _rows_func(n, x.dtype, idx.dtype), (0, 1), (0,), (AS_IS, AS_IS, AS_IS))


def embedding(info: OpInfo) -> Kernel | None:
    w, ids = info.inputs
    n = last_dim(w)
    if n is None or w.rank != 2 or ids is None or ids.rank != 1 or not ids.dtype.startswith("int"):
        return None
    name = name_of("embedding", f"n{n}", short(w.dtype), short(ids.dtype))
    return Kernel(name, _rows_func(n, w.dtype, ids.dtype), (0, 1), (0,), (AS_IS, AS_IS, AS_IS))


BUILDERS = {
    "silu_and_mul": _gated(lambda attrs: "silu"),
    "gelu_and_mul": _gated(lambda attrs: attrs.get("approximate", "none")),
    "softcap": softcap,
    "gather_rows": gather_rows,
    "embedding": embedding,
}
