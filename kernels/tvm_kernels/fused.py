"""The fused elementwise kernel: one `fused_elementwise` node (a group of generic elementwise
ops that the fuse-elementwise pass merged) as one loop nest, rows in parallel and the inner axis
vectorized, every step of the group's expression computed in float32 in its order. A call that
moves at most `ser` KiB (config key, default tir.SER) runs its rows on the calling
thread; the row body is one `T.macro` that the serial and the parallel loop both call (see
kiln.kernels.tvm_kernels.elementwise).

Each step's value is rounded as its op's torch reference rounds it (to a 16-bit dtype after every
op; float32 as is) and then passes an `llvm.arithmetic.fence`: TVM lets LLVM contract a product
and a sum into one fused multiply-add, which rounds once where torch's two ops round twice; the
fence keeps each step's rounding, so a float32 group computes bitwise what its kernels computed
one op at a time."""

from __future__ import annotations

import hashlib

from tvm.script import tirx as T

from kiln.kernels.tvm_kernels import (
    FLOATS,
    ROWS,
    Kernel,
    OpInfo,
    keep_params,
    last_dim,
    name_of,
    short,
    vec_width,
)
from kiln.kernels.tvm_kernels.elementwise import (
    FULL,
    ONE,
    ROW,
    _binary,
    _operand,
    _unary,
)
from kiln.kernels.tvm_kernels.tir import F32, dtype_bytes, rounded_to, serial_bytes

MAX_INPUTS = 8
"""Tensor operands a fused kernel takes at most (the fuse-elementwise pass keeps groups within)."""


def _fence(v):
    """v, with no floating-point contraction or reassociation across it."""
    return T.call_llvm_pure_intrin(F32, "llvm.arithmetic.fence", v)


def _steps(expr: list, dt: str):
    """Per step (fn(*operand values), operand refs), or None when a step is not covered."""
    out = []
    for op, args, attrs in expr:
        if len(args) == 1:
            f1 = _unary(op, attrs)
            fn = None if f1 is None else (lambda a, f1=f1: f1(a))
        elif len(args) == 2 and not (op == "div" and attrs.get("rounding_mode") is not None):
            f2 = _binary(op, args[1] if not isinstance(args[1], str) else None, dt)
            fn = None if f2 is None or (op == "pow" and not isinstance(args[0], str)) else f2
        else:
            fn = None
        if fn is None:
            return None
        out.append((fn, args))
    return out


def _fused_func(n: int | None, dt: str, kinds: tuple[str, ...], steps, ser_bytes: int):
    """y = the expression over [A, B, n] rows (n None: a symbolic inner dim, not vectorized);
    kinds: per tensor operand FULL, ONE or ROW (the unused handles up to MAX_INPUTS are dropped)."""
    rnd = rounded_to(dt)
    v = vec_width(n) if n is not None else 1
    moved = (1 + kinds.count(FULL)) * dtype_bytes(dt)  # bytes per element: y and the FULL operands
    kinds = kinds + (ONE,) * (MAX_INPUTS - len(kinds))
    one = (T.int64(1), T.int64(1), T.int64(1))
    unit = 1 if n is not None else T.int64(1)

    def value(bufs, a, b, k):
        def load(ref):
            if not isinstance(ref, str):
                return T.float32(ref)
            if ref[0] == "v":
                return vals[int(ref[1:])]
            i = int(ref[1:])
            X = bufs[i]
            idx = (a, b, k) if kinds[i] == FULL else (a, b, 0) if kinds[i] == ROW else (0, 0, 0)
            return T.Cast(F32, X[idx])

        vals = []
        for fn, args in steps:
            vals.append(_fence(rnd(fn(*(load(r) for r in args)))))
        return T.Cast(dt, vals[-1])

    def shape(i, A, B, W):
        return (A, B, W if n is None else n) if kinds[i] == FULL else (A, B, T.int64(1)) if kinds[i] == ROW else one

    def strides(i, s0, s1, s2):
        return (s0, s1, unit) if kinds[i] == FULL else (s0, s1, s2) if kinds[i] == ROW else None

    @T.macro
    def row_body(row, X0, X1, X2, X3, X4, X5, X6, X7, Y, B, W):
        a = T.meta_var(row // B)
        b = T.meta_var(row % B)
        if n is None:
            for k in range(W):
                Y[a, b, k] = value((X0, X1, X2, X3, X4, X5, X6, X7), a, b, k)
        else:
            for j in range(n // v):
                for i in T.vectorized(v):
                    Y[a, b, j * v + i] = value((X0, X1, X2, X3, X4, X5, X6, X7), a, b, j * v + i)

    @T.prim_func(private=True)
    def func(h0: T.handle, h1: T.handle, h2: T.handle, h3: T.handle, h4: T.handle, h5: T.handle, h6: T.handle,
             h7: T.handle, y_h: T.handle):
        A = T.int64()
        B = T.int64()
        W = T.int64()
        s00, s01, s02, s10, s11, s12 = T.int64(), T.int64(), T.int64(), T.int64(), T.int64(), T.int64()
        s20, s21, s22, s30, s31, s32 = T.int64(), T.int64(), T.int64(), T.int64(), T.int64(), T.int64()
        s40, s41, s42, s50, s51, s52 = T.int64(), T.int64(), T.int64(), T.int64(), T.int64(), T.int64()
        s60, s61, s62, s70, s71, s72 = T.int64(), T.int64(), T.int64(), T.int64(), T.int64(), T.int64()
        sy0, sy1 = T.int64(), T.int64()
        X0 = T.match_buffer(h0, shape(0, A, B, W), dt, strides=strides(0, s00, s01, s02), offset_factor=1)
        X1 = T.match_buffer(h1, shape(1, A, B, W), dt, strides=strides(1, s10, s11, s12), offset_factor=1)
        X2 = T.match_buffer(h2, shape(2, A, B, W), dt, strides=strides(2, s20, s21, s22), offset_factor=1)
        X3 = T.match_buffer(h3, shape(3, A, B, W), dt, strides=strides(3, s30, s31, s32), offset_factor=1)
        X4 = T.match_buffer(h4, shape(4, A, B, W), dt, strides=strides(4, s40, s41, s42), offset_factor=1)
        X5 = T.match_buffer(h5, shape(5, A, B, W), dt, strides=strides(5, s50, s51, s52), offset_factor=1)
        X6 = T.match_buffer(h6, shape(6, A, B, W), dt, strides=strides(6, s60, s61, s62), offset_factor=1)
        X7 = T.match_buffer(h7, shape(7, A, B, W), dt, strides=strides(7, s70, s71, s72), offset_factor=1)
        Y = T.match_buffer(y_h, (A, B, W if n is None else n), dt, strides=(sy0, sy1, unit), offset_factor=1)
        if A * B * (W if n is None else n) * moved <= ser_bytes:
            for row in range(A * B):
                row_body(row, X0, X1, X2, X3, X4, X5, X6, X7, Y, B, W)
        else:
            for row in T.parallel(A * B):
                row_body(row, X0, X1, X2, X3, X4, X5, X6, X7, Y, B, W)

    return func


def fused_elementwise(info: OpInfo, config=None) -> Kernel | None:
    """The kernel of a fused_elementwise node: every operand a tensor of the result's dtype, of
    its shape, one value per row or one element; every step an op the elementwise kernels cover."""
    out = info.outputs[0]
    if out.dtype not in FLOATS or not out.shape or not 0 < len(info.inputs) <= MAX_INPUTS:
        return None
    kinds = tuple(_operand(t, None, out) for t in info.inputs)
    if any(k not in (FULL, ONE, ROW) for k in kinds):
        return None
    expr = info.attrs["expr"]
    steps = _steps(expr, out.dtype)
    if steps is None:
        return None
    n = last_dim(out)
    digest = hashlib.sha1(repr((expr, kinds)).encode()).hexdigest()[:10]
    ops = "_".join(dict.fromkeys(op for op, _, _ in expr))
    name = name_of("fused", ops, f"n{n}" if n is not None else "nT", short(out.dtype), f"{len(expr)}ops", digest)
    func = _fused_func(n, out.dtype, kinds, steps, serial_bytes(config))
    keep = (*range(len(kinds)), MAX_INPUTS)
    return Kernel(name, keep_params(func, keep), tuple(range(len(kinds))), (0,), (ROWS,) * (len(kinds) + 1))


BUILDERS = {"fused_elementwise": fused_elementwise}
