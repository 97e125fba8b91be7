"""Row norms: rms_norm (every variant of the reference: no weight, offset, float32 weight),
fused_add_rms_norm (x + residual, then its rms_norm; two results) and layer_norm.

Each row of [A, B, N] (T rows, or T*H for a per-head norm) is one task of a parallel loop; its
statistics accumulate in float32 over V lanes (vectorized), then sum across the lanes. A call
that moves at most `ser` KiB (a decode step's rows) runs its rows on the calling thread: forking
and joining TVM's pool costs more than such a call's work. The row body is one `T.macro` that
the serial and the parallel loop both call, so both compute the same bits. Its scratch (lanes,
statistics) is scope "global": TVM 0.27 puts a "local" buffer on the heap
(TVMBackendAllocWorkspace per row) and a "global" one of constant size on the stack, where LLVM
keeps it in registers; row indices are `T.meta_var` (an assigned name would be a heap scalar).
Knobs (`KNOBS`, searched by `kiln tune`): V (default the widest of 16 or less that divides N)
and ser (KiB, default tir.SER).
"""

from __future__ import annotations

from tvm.script import tirx as T

from kiln.kernels.tvm_kernels import (
    AS_IS,
    FLOATS,
    ROWS,
    Kernel,
    OpInfo,
    last_dim,
    name_of,
    short,
    vec_width,
)
from kiln.kernels.tvm_kernels import keep_params as _drop
from kiln.kernels.tvm_kernels.tir import F32, dtype_bytes, rounded_to, serial_bytes

KNOBS = {op: {"v": (4, 8, 16, 32, 64), "ser": (0, 16, 64, 256, 1024)} for op in ("rms_norm", "fused_add_rms_norm", "layer_norm")}
"""float32 lanes of the row statistics (v; a width that does not divide N is no schedule of it)
and the most KiB of row data that a call runs on the calling thread (ser; 0: always parallel)."""





def _lanes(n: int, config) -> int:
    v = int((config or {}).get("v", vec_width(n)))
    if v < 1 or n % v:
        raise ValueError(f"norm of width {n}: {v} lanes do not divide it")
    return v


def _rms_variant(attrs) -> tuple[str, float]:
    """(mode, offset): "plain" (F.rms_norm), "cast_mul" (Llama: w * y.to(dtype)), "fp32_mul"
    (Gemma/OLMo2: (y * (w + offset)).to(dtype))."""
    if attrs.get("offset") is None and attrs.get("weight_fp32") is None:
        return "plain", 0.0
    return ("fp32_mul" if attrs.get("weight_fp32") else "cast_mul"), float(attrs.get("offset") or 0.0)


def _rms_func(n: int, dt: str, wdt: str | None, eps: float, mode: str, offset: float, fused: bool, v: int,
              ser_bytes: int):
    rnd = rounded_to(dt)
    has_w = wdt is not None
    wdt = wdt or F32
    rw = rounded_to(wdt)
    row_bytes = n * dtype_bytes(dt) * (4 if fused else 2)  # x (and residual) read, y (and h) written

    @T.macro
    def row_body(row, X, R, W, Y, H, B):
        a = T.meta_var(row // B)
        b = T.meta_var(row % B)
        acc = T.alloc_buffer((v,), F32, scope="global")
        tot = T.alloc_buffer((1,), F32, scope="global")
        for i in T.vectorized(v):
            acc[i] = T.float32(0)
        for k0 in range(n // v):
            for i in T.vectorized(v):
                if fused:
                    # the residual add in x's dtype; the norm reads the sum back
                    H[a, b, k0 * v + i] = T.Cast(dt, rnd(T.Cast(F32, X[a, b, k0 * v + i]) + T.Cast(F32, R[a, b, k0 * v + i])))
                    acc[i] = acc[i] + T.Cast(F32, H[a, b, k0 * v + i]) * T.Cast(F32, H[a, b, k0 * v + i])
                else:
                    acc[i] = acc[i] + T.Cast(F32, X[a, b, k0 * v + i]) * T.Cast(F32, X[a, b, k0 * v + i])
        tot[0] = T.float32(0)
        for i in range(v):
            tot[0] = tot[0] + acc[i]
        tot[0] = T.rsqrt(tot[0] / T.float32(n) + T.float32(eps))
        for k in T.vectorized(n):
            if fused:
                if not has_w:
                    Y[a, b, k] = T.Cast(dt, T.Cast(F32, H[a, b, k]) * tot[0])
                elif mode == "fp32_mul":
                    Y[a, b, k] = T.Cast(dt, T.Cast(F32, H[a, b, k]) * tot[0] * (T.Cast(F32, W[k]) + T.float32(offset)))
                elif mode == "cast_mul":
                    Y[a, b, k] = T.Cast(dt, rnd(rw(T.Cast(F32, W[k]) + T.float32(offset))) * rnd(T.Cast(F32, H[a, b, k]) * tot[0]))
                else:
                    Y[a, b, k] = T.Cast(dt, T.Cast(F32, H[a, b, k]) * tot[0] * T.Cast(F32, W[k]))
            else:
                if not has_w:
                    Y[a, b, k] = T.Cast(dt, T.Cast(F32, X[a, b, k]) * tot[0])
                elif mode == "fp32_mul":
                    Y[a, b, k] = T.Cast(dt, T.Cast(F32, X[a, b, k]) * tot[0] * (T.Cast(F32, W[k]) + T.float32(offset)))
                elif mode == "cast_mul":
                    Y[a, b, k] = T.Cast(dt, rnd(rw(T.Cast(F32, W[k]) + T.float32(offset))) * rnd(T.Cast(F32, X[a, b, k]) * tot[0]))
                else:
                    Y[a, b, k] = T.Cast(dt, T.Cast(F32, X[a, b, k]) * tot[0] * T.Cast(F32, W[k]))

    @T.prim_func(private=True)
    def func(x_h: T.handle, r_h: T.handle, w_h: T.handle, y_h: T.handle, h_h: T.handle):
        A = T.int64()
        B = T.int64()
        sx0, sx1, sr0, sr1, sy0, sy1, sh0, sh1 = T.int64(), T.int64(), T.int64(), T.int64(), T.int64(), T.int64(), T.int64(), T.int64()
        X = T.match_buffer(x_h, (A, B, n), dt, strides=(sx0, sx1, 1), offset_factor=1)
        R = T.match_buffer(r_h, (A, B, n), dt, strides=(sr0, sr1, 1), offset_factor=1)
        W = T.match_buffer(w_h, (n,), wdt, offset_factor=1)
        Y = T.match_buffer(y_h, (A, B, n), dt, strides=(sy0, sy1, 1), offset_factor=1)
        H = T.match_buffer(h_h, (A, B, n), dt, strides=(sh0, sh1, 1), offset_factor=1)
        if A * B * row_bytes <= ser_bytes:
            for row in range(A * B):
                row_body(row, X, R, W, Y, H, B)
        else:
            for row in T.parallel(A * B):
                row_body(row, X, R, W, Y, H, B)

    return func


def rms_norm(info: OpInfo, config=None) -> Kernel | None:
    x = info.inputs[0]
    n = last_dim(x)
    if n is None or x.dtype not in FLOATS or list(info.attrs.get("normalized_shape", [n])) != [n]:
        return None
    w = info.inputs[1] if len(info.inputs) > 1 else None
    if w is not None and w.dtype not in FLOATS:
        return None
    mode, offset = _rms_variant(info.attrs)
    eps = float(info.attrs["eps"])
    name = name_of("rms_norm", f"h{n}", short(x.dtype), f"e{eps:g}", mode, f"o{offset:g}" if offset else "",
                   f"w{short(w.dtype)}" if w is not None else "nw")
    func = _rms_func(n, x.dtype, w.dtype if w is not None else None, eps, mode, offset, fused=False, v=_lanes(n, config),
                     ser_bytes=serial_bytes(config))
    keep = (0, 2, 3) if w is not None else (0, 3)
    ins = (0, 1) if w is not None else (0,)
    return Kernel(name, _drop(func, keep), ins, (0,), (ROWS, *(AS_IS,) * (len(ins) - 1), ROWS))


def fused_add_rms_norm(info: OpInfo, config=None) -> Kernel | None:
    x = info.inputs[0]
    n = last_dim(x)
    if n is None or x.dtype not in FLOATS:
        return None
    w = info.inputs[2] if len(info.inputs) > 2 else None
    if w is not None and w.dtype not in FLOATS:
        return None
    mode = "fp32_mul" if info.attrs.get("weight_fp32") else "cast_mul"
    offset = float(info.attrs.get("offset") or 0.0)
    eps = float(info.attrs["eps"])
    name = name_of("fused_add_rms_norm", f"h{n}", short(x.dtype), f"e{eps:g}", mode, f"o{offset:g}" if offset else "",
                   f"w{short(w.dtype)}" if w is not None else "nw")
    func = _rms_func(n, x.dtype, w.dtype if w is not None else None, eps, mode, offset, fused=True, v=_lanes(n, config),
                     ser_bytes=serial_bytes(config))
    keep = (0, 1, 2, 3, 4) if w is not None else (0, 1, 3, 4)
    ins = (0, 1, 2) if w is not None else (0, 1)
    return Kernel(name, _drop(func, keep), ins, (0, 1), (ROWS, ROWS, *(AS_IS,) * (len(ins) - 2), ROWS, ROWS))


def _layer_norm_func(n: int, dt: str, wdt: str, bdt: str, eps: float, has_w: bool, has_b: bool, v: int, ser_bytes: int):
    row_bytes = n * dtype_bytes(dt) * 2  # x read, y written

    @T.macro
    def row_body(row, X, W, Bi, Y, B):
        a = T.meta_var(row // B)
        b = T.meta_var(row % B)
        acc = T.alloc_buffer((v,), F32, scope="global")
        st = T.alloc_buffer((2,), F32, scope="global")
        for i in T.vectorized(v):
            acc[i] = T.float32(0)
        for k0 in range(n // v):
            for i in T.vectorized(v):
                acc[i] = acc[i] + T.Cast(F32, X[a, b, k0 * v + i])
        st[0] = T.float32(0)
        for i in range(v):
            st[0] = st[0] + acc[i]
        st[0] = st[0] / T.float32(n)
        for i in T.vectorized(v):
            acc[i] = T.float32(0)
        for k0 in range(n // v):
            for i in T.vectorized(v):
                acc[i] = acc[i] + (T.Cast(F32, X[a, b, k0 * v + i]) - st[0]) * (T.Cast(F32, X[a, b, k0 * v + i]) - st[0])
        st[1] = T.float32(0)
        for i in range(v):
            st[1] = st[1] + acc[i]
        st[1] = T.rsqrt(st[1] / T.float32(n) + T.float32(eps))
        for k in T.vectorized(n):
            if has_w and has_b:
                Y[a, b, k] = T.Cast(dt, (T.Cast(F32, X[a, b, k]) - st[0]) * st[1] * T.Cast(F32, W[k]) + T.Cast(F32, Bi[k]))
            elif has_w:
                Y[a, b, k] = T.Cast(dt, (T.Cast(F32, X[a, b, k]) - st[0]) * st[1] * T.Cast(F32, W[k]))
            elif has_b:
                Y[a, b, k] = T.Cast(dt, (T.Cast(F32, X[a, b, k]) - st[0]) * st[1] + T.Cast(F32, Bi[k]))
            else:
                Y[a, b, k] = T.Cast(dt, (T.Cast(F32, X[a, b, k]) - st[0]) * st[1])

    @T.prim_func(private=True)
    def func(x_h: T.handle, w_h: T.handle, b_h: T.handle, y_h: T.handle):
        A = T.int64()
        B = T.int64()
        sx0, sx1, sy0, sy1 = T.int64(), T.int64(), T.int64(), T.int64()
        X = T.match_buffer(x_h, (A, B, n), dt, strides=(sx0, sx1, 1), offset_factor=1)
        W = T.match_buffer(w_h, (n,), wdt, offset_factor=1)
        Bi = T.match_buffer(b_h, (n,), bdt, offset_factor=1)
        Y = T.match_buffer(y_h, (A, B, n), dt, strides=(sy0, sy1, 1), offset_factor=1)
        if A * B * row_bytes <= ser_bytes:
            for row in range(A * B):
                row_body(row, X, W, Bi, Y, B)
        else:
            for row in T.parallel(A * B):
                row_body(row, X, W, Bi, Y, B)

    return func


def layer_norm(info: OpInfo, config=None) -> Kernel | None:
    x = info.inputs[0]
    n = last_dim(x)
    if n is None or x.dtype not in FLOATS or list(info.attrs["normalized_shape"]) != [n]:
        return None
    has_w, has_b = info.attrs.get("has_weight", True), info.attrs.get("has_bias", True)
    rest = list(info.inputs[1:])
    w = rest.pop(0) if has_w else None
    b = rest.pop(0) if has_b else None
    if any(t is not None and t.dtype not in FLOATS for t in (w, b)):
        return None
    eps = float(info.attrs["eps"])
    name = name_of("layer_norm", f"h{n}", short(x.dtype), f"e{eps:g}", f"w{short(w.dtype)}" if w else "nw",
                   f"b{short(b.dtype)}" if b else "nb")
    func = _layer_norm_func(n, x.dtype, w.dtype if w else F32, b.dtype if b else F32, eps, w is not None, b is not None,
                             _lanes(n, config), serial_bytes(config))
    keep = (0, *((1,) if w else ()), *((2,) if b else ()), 3)
    ins = tuple(range(1 + (w is not None) + (b is not None)))
    return Kernel(name, _drop(func, keep), ins, (0,), (ROWS, *(AS_IS,) * (len(ins) - 1), ROWS))


BUILDERS = {"rms_norm": rms_norm, "fused_add_rms_norm": fused_add_rms_norm, "layer_norm": layer_norm}
