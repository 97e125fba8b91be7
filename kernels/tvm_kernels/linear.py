"""linear: y [M, N] = x [M, K] @ W^T (+ bias), W [N, K] ("out_in") or [K, N] ("in_out").

Schedule (both layouts): one parallel loop over blocks of output columns, so each core streams
its own slice of the weight once per row tile (batch-1 decode is a GEMV bound by reading W);
rows go in tiles of `mt` with a one-row tail, so every T is served by one function.

    out_in: an (mt x nb) tile of dot products; each accumulates v float32 lanes along K
            (vectorized loads of x and W rows), summed across lanes by a tree at the end
    in_out: an (mt x nv) tile of y; each step broadcasts x[m, k] against the contiguous
            W[k, n0:n0+nv] row slice (no horizontal sums)

The schedule's knobs (`KNOBS`, searched by `kiln tune`) are those tile sizes and `ku`, the
unroll of the K loop; `config=None` is the default schedule (`default_config`).
"""

from __future__ import annotations

from collections.abc import Mapping

from tvm.script import tirx as T

from kiln.kernels.tvm_kernels import (
    AS_IS,
    FLOATS,
    MAT,
    Kernel,
    OpInfo,
    keep_params,
    name_of,
    short,
    vec_width,
)

F32 = "float32"

KNOBS = {"linear": {"mt": (1, 2, 4, 8), "nb": (1, 2, 4, 8), "nv": (8, 16, 32, 64), "v": (4, 8, 16, 32),
                    "ku": (1, 2, 4)}}
"""The search space: rows per tile (mt); output columns per task, out_in (nb) or in_out (nv);
float32 lanes along K, out_in (v); unroll of the K loop (ku). A value that does not divide the
shape is not a schedule of it (`resolve` says which configs are)."""


def _block(n: int, widest: int) -> int:
    b = widest
    while b > 1 and n % b:
        b //= 2
    return b


def default_config(layout: str, k: int, n: int) -> dict[str, int]:
    """The schedule built without tuning: MT x NB (or NV) accumulators stay in registers."""
    if layout == "out_in":
        return {"mt": 4, "nb": _block(n, 4), "v": vec_width(k), "ku": 1}
    return {"mt": 4, "nv": _block(n, 32), "ku": 1}


def resolve(layout: str, k: int, n: int, config: Mapping[str, int] | None) -> dict[str, int] | None:
    """The full config of this layout and shape (defaults for missing knobs), or None when a
    value does not divide the shape."""
    c = default_config(layout, k, n)
    c.update({key: int(v) for key, v in (config or {}).items() if key in c})
    if layout == "out_in":
        ok = n % c["nb"] == 0 and k % (c["v"] * c["ku"]) == 0
    else:
        ok = n % c["nv"] == 0 and k % c["ku"] == 0
    return c if ok and min(c.values()) >= 1 else None


def _out_in(k: int, n: int, dt: str, wdt: str, bdt: str, has_b: bool, c: Mapping[str, int]):
    mt, nb, v, ku = c["mt"], c["nb"], c["v"], c["ku"]

    @T.prim_func(private=True)
    def func(x_h: T.handle, w_h: T.handle, b_h: T.handle, y_h: T.handle):
        T.func_attr({"tirx.noalias": True})  # y never overlaps x, W or bias: x loads stay hoisted
        M = T.int64()
        sx0, sy0 = T.int64(), T.int64()
        X = T.match_buffer(x_h, (M, k), dt, strides=(sx0, 1), offset_factor=1)
        W = T.match_buffer(w_h, (n, k), wdt, offset_factor=1)
        Bias = T.match_buffer(b_h, (n,), bdt, offset_factor=1)
        Y = T.match_buffer(y_h, (M, n), dt, strides=(sy0, 1), offset_factor=1)
        for jb in T.parallel(n // nb):
            for mb in range(M // mt):
                acc = T.alloc_buffer((mt, nb, v), F32, scope="local")
                for i, j in T.grid(mt, nb):
                    for q in T.vectorized(v):
                        acc[i, j, q] = T.float32(0)
                for k0 in range(k // (v * ku)):
                    for u in T.unroll(ku):
                        for i in T.unroll(mt):
                            for j in T.unroll(nb):
                                for q in T.vectorized(v):
                                    acc[i, j, q] = acc[i, j, q] + T.Cast(F32, X[mb * mt + i, (k0 * ku + u) * v + q]) * T.Cast(
                                        F32, W[jb * nb + j, (k0 * ku + u) * v + q])
                for i, j in T.grid(mt, nb):
                    # lanes summed as a tree of vector adds (a scalar chain costs as much as the dot)
                    if v >= 32:
                        for q in T.vectorized(16):
                            acc[i, j, q] = acc[i, j, q] + acc[i, j, q + 16]
                    if v >= 16:
                        for q in T.vectorized(8):
                            acc[i, j, q] = acc[i, j, q] + acc[i, j, q + 8]
                    if v >= 8:
                        for q in T.vectorized(4):
                            acc[i, j, q] = acc[i, j, q] + acc[i, j, q + 4]
                    if v >= 4:
                        for q in T.vectorized(2):
                            acc[i, j, q] = acc[i, j, q] + acc[i, j, q + 2]
                    if v >= 2:
                        acc[i, j, 0] = acc[i, j, 0] + acc[i, j, 1]
                    if has_b:
                        Y[mb * mt + i, jb * nb + j] = T.Cast(dt, acc[i, j, 0] + T.Cast(F32, Bias[jb * nb + j]))
                    else:
                        Y[mb * mt + i, jb * nb + j] = T.Cast(dt, acc[i, j, 0])
            for m in range(M // mt * mt, M):
                acc1 = T.alloc_buffer((nb, v), F32, scope="local")
                for j in T.unroll(nb):
                    for q in T.vectorized(v):
                        acc1[j, q] = T.float32(0)
                for k0 in range(k // (v * ku)):
                    for u in T.unroll(ku):
                        for j in T.unroll(nb):
                            for q in T.vectorized(v):
                                acc1[j, q] = acc1[j, q] + T.Cast(F32, X[m, (k0 * ku + u) * v + q]) * T.Cast(
                                    F32, W[jb * nb + j, (k0 * ku + u) * v + q])
                for j in range(nb):
                    if v >= 32:
                        for q in T.vectorized(16):
                            acc1[j, q] = acc1[j, q] + acc1[j, q + 16]
                    if v >= 16:
                        for q in T.vectorized(8):
                            acc1[j, q] = acc1[j, q] + acc1[j, q + 8]
                    if v >= 8:
                        for q in T.vectorized(4):
                            acc1[j, q] = acc1[j, q] + acc1[j, q + 4]
                    if v >= 4:
                        for q in T.vectorized(2):
                            acc1[j, q] = acc1[j, q] + acc1[j, q + 2]
                    if v >= 2:
                        acc1[j, 0] = acc1[j, 0] + acc1[j, 1]
                    if has_b:
                        Y[m, jb * nb + j] = T.Cast(dt, acc1[j, 0] + T.Cast(F32, Bias[jb * nb + j]))
                    else:
                        Y[m, jb * nb + j] = T.Cast(dt, acc1[j, 0])

    return func


def _in_out(k: int, n: int, dt: str, wdt: str, bdt: str, has_b: bool, c: Mapping[str, int]):
    mt, nv, ku = c["mt"], c["nv"], c["ku"]

    @T.prim_func(private=True)
    def func(x_h: T.handle, w_h: T.handle, b_h: T.handle, y_h: T.handle):
        T.func_attr({"tirx.noalias": True})  # y never overlaps x, W or bias: x loads stay hoisted
        M = T.int64()
        sx0, sy0 = T.int64(), T.int64()
        X = T.match_buffer(x_h, (M, k), dt, strides=(sx0, 1), offset_factor=1)
        W = T.match_buffer(w_h, (k, n), wdt, offset_factor=1)
        Bias = T.match_buffer(b_h, (n,), bdt, offset_factor=1)
        Y = T.match_buffer(y_h, (M, n), dt, strides=(sy0, 1), offset_factor=1)
        for jb in T.parallel(n // nv):
            for mb in range(M // mt):
                acc = T.alloc_buffer((mt, nv), F32, scope="local")
                for i in T.unroll(mt):
                    for q in T.vectorized(nv):
                        acc[i, q] = T.float32(0)
                for k0 in range(k // ku):
                    for u in T.unroll(ku):
                        for i in T.unroll(mt):
                            for q in T.vectorized(nv):
                                acc[i, q] = acc[i, q] + T.Cast(F32, X[mb * mt + i, k0 * ku + u]) * T.Cast(
                                    F32, W[k0 * ku + u, jb * nv + q])
                for i in T.unroll(mt):
                    for q in T.vectorized(nv):
                        if has_b:
                            Y[mb * mt + i, jb * nv + q] = T.Cast(dt, acc[i, q] + T.Cast(F32, Bias[jb * nv + q]))
                        else:
                            Y[mb * mt + i, jb * nv + q] = T.Cast(dt, acc[i, q])
            for m in range(M // mt * mt, M):
                acc1 = T.alloc_buffer((nv,), F32, scope="local")
                for q in T.vectorized(nv):
                    acc1[q] = T.float32(0)
                for k0 in range(k // ku):
                    for u in T.unroll(ku):
                        for q in T.vectorized(nv):
                            acc1[q] = acc1[q] + T.Cast(F32, X[m, k0 * ku + u]) * T.Cast(F32, W[k0 * ku + u, jb * nv + q])
                for q in T.vectorized(nv):
                    if has_b:
                        Y[m, jb * nv + q] = T.Cast(dt, acc1[q] + T.Cast(F32, Bias[jb * nv + q]))
                    else:
                        Y[m, jb * nv + q] = T.Cast(dt, acc1[q])

    return func


def linear(info: OpInfo, config: Mapping[str, int] | None = None) -> Kernel | None:
    """The kernel of a linear node with the schedule `config` (None: the default); None when
    the node is not covered. A config that does not divide the shape is a ValueError."""
    x, w = info.inputs[:2]
    b = info.inputs[2] if len(info.inputs) > 2 else None
    layout = info.attrs.get("weight_layout", "out_in")
    if x is None or w is None or w.rank != 2 or x.dtype not in FLOATS or w.dtype not in FLOATS:
        return None
    if b is not None and (b.dtype not in FLOATS or b.rank != 1):
        return None
    k, n = (w.shape[1], w.shape[0]) if layout == "out_in" else (w.shape[0], w.shape[1])
    if not isinstance(k, int) or not isinstance(n, int) or layout not in ("out_in", "in_out"):
        return None
    c = resolve(layout, k, n, config)
    if c is None:
        raise ValueError(f"linear {layout} k={k} n={n}: config {dict(config or {})} does not divide the shape")
    make = _out_in if layout == "out_in" else _in_out
    func = make(k, n, x.dtype, w.dtype, b.dtype if b is not None else F32, b is not None, c)
    name = name_of("linear", layout, f"k{k}n{n}", short(x.dtype), f"w{short(w.dtype)}",
                   f"b{short(b.dtype)}" if b is not None else "")
    keep = (0, 1, 2, 3) if b is not None else (0, 1, 3)
    ins = (0, 1, 2) if b is not None else (0, 1)
    present = (MAT, AS_IS, AS_IS, MAT) if b is not None else (MAT, AS_IS, MAT)
    return Kernel(name, keep_params(func, keep), ins, (0,), present)


BUILDERS = {"linear": linear}
