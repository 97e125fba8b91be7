"""Elementwise and gather kernels: silu_and_mul, gelu_and_mul (erf and tanh), softcap,
gather_rows and embedding; the elementwise glue a pass left generic: unary activations (gelu,
relu, tanh, sigmoid, silu, neg, exp, clamp) and binary add, sub, mul, div, pow whose operands
are each a tensor of the result's shape, a one-element tensor or one value per row (broadcast),
or a scalar constant (built in).

Rows run in parallel, the inner axis vectorized. A call that moves at most `ser` KiB (config
key, default tir.SER; a decode step) runs its rows on the calling thread, no fork and join of TVM's
pool; the row body is one `T.macro` that the serial and the parallel loop both call, so both
compute the same bits. Row indices are `T.meta_var` (an assigned name is a heap scalar in TVM
0.27: a TVMBackendAllocWorkspace per row); the kernels allocate nothing per row."""

from __future__ import annotations

import math

from tvm.script import tirx as T

from kiln.kernels.tvm_kernels import (
    AS_IS,
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
from kiln.kernels.tvm_kernels.tir import F32, dtype_bytes, exp_f32, rounded_to, serial_bytes

KNOBS = {op: {"ser": (0, 16, 64, 256, 1024)} for op in ("silu_and_mul", "gelu_and_mul", "softcap")}
"""The most KiB of row data that a call runs on the calling thread (0: always parallel). The
generic and gather kernels take `ser` as config too but list no knob (one entry per op and
shape would make `kiln tune` time every glue op; gather's random inputs are no indices)."""




def _gate(kind: str):
    """act(g) on float32 as torch computes it: silu, gelu (erf) or gelu (tanh)."""
    if kind == "silu":
        return lambda g: g / (T.float32(1) + exp_f32(-g))
    if kind == "none":
        return lambda g: T.float32(0.5) * g * (T.float32(1) + T.erf(g * T.float32(1 / math.sqrt(2))))
    k = math.sqrt(2 / math.pi)
    return lambda g: T.float32(0.5) * g * (T.float32(1) + T.tanh(T.float32(k) * (g + T.float32(0.044715) * g * g * g)))


def _gated_func(i_dim: int, dt: str, kind: str, ser_bytes: int):
    act = _gate(kind)
    rnd = rounded_to(dt)
    row_bytes = 3 * i_dim * dtype_bytes(dt)  # x (both halves) read, y written

    @T.macro
    def row_body(row, X, Y, B):
        a = T.meta_var(row // B)
        b = T.meta_var(row % B)
        for k in T.vectorized(i_dim):
            # act rounds to the dtype, then the product rounds again (two torch ops)
            Y[a, b, k] = T.Cast(dt, rnd(act(T.Cast(F32, X[a, b, k]))) * T.Cast(F32, X[a, b, i_dim + k]))

    @T.prim_func(private=True)
    def func(x_h: T.handle, y_h: T.handle):
        A = T.int64()
        B = T.int64()
        sx0, sx1, sy0, sy1 = T.int64(), T.int64(), T.int64(), T.int64()
        X = T.match_buffer(x_h, (A, B, 2 * i_dim), dt, strides=(sx0, sx1, 1), offset_factor=1)
        Y = T.match_buffer(y_h, (A, B, i_dim), dt, strides=(sy0, sy1, 1), offset_factor=1)
        if A * B * row_bytes <= ser_bytes:
            for row in range(A * B):
                row_body(row, X, Y, B)
        else:
            for row in T.parallel(A * B):
                row_body(row, X, Y, B)

    return func


def _gated(kind_of):
    def build(info: OpInfo, config=None) -> Kernel | None:
        x = info.inputs[0]
        n = last_dim(x)
        if n is None or n % 2 or x.dtype not in FLOATS:
            return None
        kind = kind_of(info.attrs)
        if kind not in ("silu", "none", "tanh"):
            return None
        name = name_of(info.op, f"i{n // 2}", short(x.dtype), "" if kind == "silu" else kind)
        return Kernel(name, _gated_func(n // 2, x.dtype, kind, serial_bytes(config)), (0,), (0,), (ROWS, ROWS))

    return build


def _softcap_func(n: int, dt: str, cap: float, ser_bytes: int):
    rnd = rounded_to(dt)
    row_bytes = 2 * n * dtype_bytes(dt)  # x read, y written

    @T.macro
    def row_body(row, X, Y, B):
        a = T.meta_var(row // B)
        b = T.meta_var(row % B)
        for k in T.vectorized(n):
            Y[a, b, k] = T.Cast(dt, rnd(T.tanh(rnd(T.Cast(F32, X[a, b, k]) / T.float32(cap)))) * T.float32(cap))

    @T.prim_func(private=True)
    def func(x_h: T.handle, y_h: T.handle):
        A = T.int64()
        B = T.int64()
        sx0, sx1, sy0, sy1 = T.int64(), T.int64(), T.int64(), T.int64()
        X = T.match_buffer(x_h, (A, B, n), dt, strides=(sx0, sx1, 1), offset_factor=1)
        Y = T.match_buffer(y_h, (A, B, n), dt, strides=(sy0, sy1, 1), offset_factor=1)
        if A * B * row_bytes <= ser_bytes:
            for row in range(A * B):
                row_body(row, X, Y, B)
        else:
            for row in T.parallel(A * B):
                row_body(row, X, Y, B)

    return func


def softcap(info: OpInfo, config=None) -> Kernel | None:
    x = info.inputs[0]
    n = last_dim(x)
    if n is None or x.dtype not in FLOATS or info.outputs[0].dtype != x.dtype:
        return None
    cap = float(info.attrs["cap"])
    return Kernel(name_of("softcap", f"n{n}", short(x.dtype), f"c{cap:g}"), _softcap_func(n, x.dtype, cap, serial_bytes(config)),
                  (0,), (0,), (ROWS, ROWS))


def _rows_func(n: int, dt: str, idt: str, ser_bytes: int):
    """out[r, :] = x[idx[r], :] (gather_rows, and embedding with x the table)."""
    row_bytes = 2 * n * dtype_bytes(dt)  # a row of x read, of y written

    @T.macro
    def row_body(r, X, Idx, Y):
        src = T.meta_var(T.Cast("int64", Idx[r]))
        for k in T.vectorized(n):
            Y[r, k] = X[src, k]

    @T.prim_func(private=True)
    def func(x_h: T.handle, i_h: T.handle, y_h: T.handle):
        M = T.int64()
        R = T.int64()
        sx0, sy0 = T.int64(), T.int64()
        X = T.match_buffer(x_h, (M, n), dt, strides=(sx0, 1), offset_factor=1)
        Idx = T.match_buffer(i_h, (R,), idt, offset_factor=1)
        Y = T.match_buffer(y_h, (R, n), dt, strides=(sy0, 1), offset_factor=1)
        if R * row_bytes <= ser_bytes:
            for r in range(R):
                row_body(r, X, Idx, Y)
        else:
            for r in T.parallel(R):
                row_body(r, X, Idx, Y)

    return func


def gather_rows(info: OpInfo, config=None) -> Kernel | None:
    x, idx = info.inputs
    n = last_dim(x)
    if n is None or x.rank != 2 or idx is None or idx.rank != 1 or not idx.dtype.startswith("int"):
        return None
    name = name_of("gather_rows", f"n{n}", short(x.dtype), short(idx.dtype))
    return Kernel(name, _rows_func(n, x.dtype, idx.dtype, serial_bytes(config)), (0, 1), (0,), (AS_IS, AS_IS, AS_IS))


def embedding(info: OpInfo, config=None) -> Kernel | None:
    w, ids = info.inputs
    n = last_dim(w)
    if n is None or w.rank != 2 or ids is None or ids.rank != 1 or not ids.dtype.startswith("int"):
        return None
    name = name_of("embedding", f"n{n}", short(w.dtype), short(ids.dtype))
    return Kernel(name, _rows_func(n, w.dtype, ids.dtype, serial_bytes(config)), (0, 1), (0,), (AS_IS, AS_IS, AS_IS))


# -- generic elementwise glue -----------------------------------------------------------------

INTS = ("int64", "int32")
FULL, ONE, ROW = "t", "s", "r"
"""Operand kinds besides a constant: a tensor of the result's shape; a one-element tensor; one
value per row (the result's shape with a last dim of 1: MoE routing weights, x / x.sum(-1))."""
TENSOR = (FULL, ONE, ROW)


def _unary(op: str, attrs):
    """op(x) on float32 as torch computes it, or None for an op not covered."""
    if op == "gelu":
        return _gate(attrs.get("approximate", "none")) if attrs.get("approximate", "none") in ("none", "tanh") else None
    if op == "clamp":
        lo, hi = attrs.get("min"), attrs.get("max")
        if not all(b is None or isinstance(b, int | float) for b in (lo, hi)):
            return None
        up = (lambda x: x) if lo is None else (lambda x: T.max(x, T.float32(lo)))
        return up if hi is None else (lambda x: T.min(up(x), T.float32(hi)))
    return {
        "silu": _gate("silu"),
        "relu": lambda x: T.max(x, T.float32(0)),
        "tanh": T.tanh,
        "sigmoid": lambda x: T.float32(1) / (T.float32(1) + T.exp(-x)),
        "neg": lambda x: -x,
        "exp": T.exp,
    }.get(op)


def _binary(op: str, b_const, dt: str):
    """op(a, b) as torch computes it in the compute dtype, or None for an op not covered; pow
    only with a constant exponent (torch's x*x, x*x*x and sqrt for 2, 3 and 0.5; a 16-bit x*x*x
    rounds after each product)."""
    if op == "pow":
        if b_const is None:
            return None
        e = float(b_const)
        if e == 2:
            return lambda a, b: a * a
        if e == 3:
            rnd = rounded_to(dt) if dt in FLOATS else (lambda v: v)
            return lambda a, b: rnd(a * a) * a
        if e == 0.5:
            return lambda a, b: T.sqrt(a)
        return lambda a, b: T.pow(a, b)
    return {
        "add": lambda a, b: a + b,
        "sub": lambda a, b: a - b,
        "mul": lambda a, b: a * b,
        "div": lambda a, b: a / b,
    }.get(op)


def _ewise_func(n: int | None, dt: str, kinds: tuple, fn, ser_bytes: int):
    """y = fn(*operands) over [A, B, n] rows (n None: a symbolic inner dim, not vectorized);
    kinds per operand: FULL, ONE, ROW, or a constant's value."""
    cdt = dt if dt in INTS else F32
    v = vec_width(n) if n is not None else 1
    k0, k1 = (kinds + (0, 0))[:2]
    one = (T.int64(1), T.int64(1), T.int64(1))
    unit = 1 if n is not None else T.int64(1)  # (the inner stride's type follows the inner dim's)

    def load(kind, X, a, b, k):
        if kind == FULL:
            return T.Cast(cdt, X[a, b, k])
        if kind == ONE:
            return T.Cast(cdt, X[0, 0, 0])
        if kind == ROW:
            return T.Cast(cdt, X[a, b, 0])
        return T.int64(kind) if cdt == "int64" else T.int32(kind) if cdt == "int32" else T.float32(kind)

    moved = (1 + sum(k == FULL for k in (k0, k1))) * dtype_bytes(dt)  # bytes per element: y and FULL operands

    @T.macro
    def row_body(row, X, Z, Y, B, W):
        a = T.meta_var(row // B)
        b = T.meta_var(row % B)
        if n is None:
            for k in range(W):
                Y[a, b, k] = T.Cast(dt, fn(load(k0, X, a, b, k), load(k1, Z, a, b, k)))
        else:
            for j in range(n // v):
                for i in T.vectorized(v):
                    Y[a, b, j * v + i] = T.Cast(dt, fn(load(k0, X, a, b, j * v + i), load(k1, Z, a, b, j * v + i)))

    @T.prim_func(private=True)
    def func(x_h: T.handle, z_h: T.handle, y_h: T.handle):
        A = T.int64()
        B = T.int64()
        W = T.int64()
        sx0, sx1, sx2, sz0, sz1, sz2, sy0, sy1 = (T.int64(), T.int64(), T.int64(), T.int64(), T.int64(), T.int64(),
                                                  T.int64(), T.int64())
        # a ROW operand's inner stride is free (its one column is all that is read)
        X = T.match_buffer(x_h, (A, B, W if n is None else n) if k0 == FULL else (A, B, T.int64(1)) if k0 == ROW
                           else one, dt, strides=(sx0, sx1, unit) if k0 == FULL else (sx0, sx1, sx2) if k0 == ROW
                           else None, offset_factor=1)
        Z = T.match_buffer(z_h, (A, B, W if n is None else n) if k1 == FULL else (A, B, T.int64(1)) if k1 == ROW
                           else one, dt, strides=(sz0, sz1, unit) if k1 == FULL else (sz0, sz1, sz2) if k1 == ROW
                           else None, offset_factor=1)
        Y = T.match_buffer(y_h, (A, B, W if n is None else n), dt, strides=(sy0, sy1, unit), offset_factor=1)
        if A * B * (W if n is None else n) * moved <= ser_bytes:
            for row in range(A * B):
                row_body(row, X, Z, Y, B, W)
        else:
            for row in T.parallel(A * B):
                row_body(row, X, Z, Y, B, W)

    return func


def _operand(t, const, out) -> object | None:
    """An operand's kind: FULL, ONE, ROW, the constant's value, or None when not covered."""
    if t is None:
        return const if isinstance(const, int | float) else None
    if t.dtype != out.dtype:
        return None
    if tuple(t.shape) == tuple(out.shape):
        return FULL
    if all(d == 1 for d in t.shape):
        return ONE
    return ROW if t.rank == out.rank and t.shape[:-1] == out.shape[:-1] and t.shape[-1] == 1 else None


def elementwise(info: OpInfo, config=None) -> Kernel | None:
    out = info.outputs[0]
    if out.dtype not in FLOATS + INTS or not out.shape or len(info.inputs) not in (1, 2):
        return None
    consts = info.consts or (None,) * len(info.inputs)
    kinds = tuple(_operand(t, c, out) for t, c in zip(info.inputs, consts, strict=True))
    if any(k is None for k in kinds) or FULL not in kinds:
        return None
    if len(kinds) == 1:
        f1 = _unary(info.op, info.attrs) if out.dtype in FLOATS else ({"neg": lambda x: -x}.get(info.op))
        fn = None if f1 is None else (lambda a, b: f1(a))
    elif info.op == "div" and (out.dtype in INTS or info.attrs.get("rounding_mode") is not None):
        fn = None
    else:
        fn = _binary(info.op, kinds[1] if kinds[1] not in TENSOR else None, out.dtype)
        if info.op == "pow" and kinds[0] != FULL:
            fn = None
    if fn is None:
        return None
    n = last_dim(out)
    tensors = tuple(i for i, k in enumerate(kinds) if k in TENSOR)
    tag = "".join(k if k in TENSOR else f"c{float(k)!r}" if out.dtype in FLOATS else f"c{int(k)}" for k in kinds)
    extra = info.attrs.get("approximate", "") if info.op == "gelu" else ""
    if info.op == "clamp":
        extra = "_".join(f"{b}{float(info.attrs[b])!r}" for b in ("min", "max") if info.attrs.get(b) is not None)
    name = name_of(info.op, f"n{n}" if n is not None else "nT", short(out.dtype), tag, extra)
    func = _ewise_func(n, out.dtype, kinds, fn, serial_bytes(config))
    keep = (*(i for i in tensors), 2)
    return Kernel(name, keep_params(func, keep), tensors, (0,), (ROWS,) * (len(tensors) + 1))


ELEMENTWISE = ("gelu", "relu", "tanh", "sigmoid", "silu", "neg", "exp", "clamp", "add", "sub", "mul", "div", "pow")

BUILDERS = {
    **dict.fromkeys(ELEMENTWISE, elementwise),
    "silu_and_mul": _gated(lambda attrs: "silu"),
    "gelu_and_mul": _gated(lambda attrs: attrs.get("approximate", "none")),
    "softcap": softcap,
    "gather_rows": gather_rows,
    "embedding": embedding,
}
