"""linear: y [M, N] = x [M, K] @ W^T (+ bias), W [N, K] ("out_in") or [K, N] ("in_out").

Schedule (both layouts): one parallel loop over blocks of nv * jt output columns (consecutive
blocks merged into one iteration down to `par` iterations: an iteration allocates its buffers);
each task serves every row of its columns, by one of two paths chosen by the row count M:

    wide (M >= pm, prefill): the task's columns of W packed once into jt contiguous panels
        P[jb] [K, nv] float32 (in_out: row slices copied; out_in: transposed, gathering 8 rows
        at a time so the rows' lines do not fight over one L1 set), then register tiles:

            for each (mr x nv) tile of y:          acc[mr, nv] in registers (mr * nv / 16 zmm)
              for k in 0..K:                       one panel row P[jb, k, :] (nv / 16 loads)
                acc[i, :] += x[m0 + i, k] * P[jb, k, :]      (mr broadcasts, mr * nv / 16 FMAs)

        the panel (K * nv * 4 bytes) stays in L2 while every row tile passes over it.
    narrow (M < pm: decode steps, and the M % mr rows the wide path leaves): W read as it is,
        rows in tiles of mt then one at a time
        out_in: an (mt x nb) tile of dot products; each accumulates v float32 lanes along K
                (vectorized loads of x and W rows), summed across lanes by a tree at the end;
                a lone row (batch-1 decode: a GEMV) takes nb1 rows of W at a time instead, as
                many independent streams and accumulator chains as keep loads in flight
        in_out: an (mt x nv) tile of y; each step broadcasts x[m, k] against the contiguous
                W[k, n0:n0+nv] row slice (no horizontal sums)

A third layout, "panels" (W stored as N / nb panels [K, nb] by the weight-panels pass), is
linear_panels.py's: its panels are what the wide path packs, so both paths read them as stored.

So every M is served by one function. The knobs (`KNOBS`, searched by `kiln tune`) are the tile
sizes, pm and `ku`, the unroll of the K loop; `config=None` is the default schedule
(`default_config`).
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
from kiln.kernels.tvm_kernels.linear_panels import entry, panels_func
from kiln.kernels.tvm_kernels.tir import F32

KNOBS = {"linear": {"mt": (1, 2, 4, 8), "nb": (1, 2, 4, 8), "nb1": (2, 4, 8, 16), "nv": (8, 16, 32, 64),
                    "v": (4, 8, 16, 32),
                    "ku": (1, 2, 4), "mr": (4, 6, 8, 12), "jt": (1, 2, 4), "pm": (16, 32, 64, 128),
                    "par": (4, 8, 16, 32, 64), "ser": (0, 256, 512, 1024, 2048, 4096)}}
"""The search space. Narrow path: rows per tile (mt); out_in's columns per tile (nb), per step of a
lone row (nb1) and lanes along K (v). Wide path: rows per register tile (mr), the fewest rows
that take it (pm). Both: float32 columns per tile (nv; out_in's narrow path splits them in nb
and nb1), tiles per task (jt: a task owns nv * jt output columns), unroll of the K loop (ku),
the fewest parallel iterations (par: consecutive tasks are merged into one iteration down to
it), the most KiB of W times rows that run on the calling thread alone (ser). The panels layout
reads mr, mt (its tiles of rows: mr, then mt, then one) and ser. A value that does not divide the shape is not a schedule of it
(`resolve` says which configs are)."""


PAR = 16
"""Default fewest parallel iterations: each allocates its task's buffers (the panel, the
accumulators) through TVM's workspace pool, 6 allocations and frees, about 0.3 us a task; at
batch-1 decode 128 tasks of 32 columns cost 10-15% of a 768 x 4096 GEMV. 16 iterations still
split evenly over 2-8 threads."""


SER = 1024
"""Default most KiB of W x rows run serially (no fork and join of TVM's pool): a decode row of the
demo model's projections (256-1376 KiB, in L3) ran 1.5-2.5x faster serial than over 2 threads
(k256n256 2.3 vs 5.7 us, k256n1376 14.7 vs 21.6 us, machine loaded by others); a ~100M Llama's
(2.4-12 MiB, streamed from memory) stay parallel."""


def _block(n: int, widest: int) -> int:
    b = widest
    while b > 1 and n % b:
        b //= 2
    return b


def default_config(layout: str, k: int, n: int) -> dict[str, int]:
    """The schedule built without tuning: 8 x 32 float32 of y per wide tile (16 AVX-512
    registers of accumulators); pm where the wide path's packing starts to pay on a 2-core Zen 5
    (out_in's transposing pack costs about what 60 rows of its narrow path do at K=768, N=4096;
    in_out's copy is cheap, but at 16 rows the narrow path still ties). Decode steps of at most
    16 rows keep the narrow path of before. A lone row of out_in reads 8 rows of W at a time:
    10-25% faster than 4 at batch-1 decode on the ~100M Llama's shapes (16 ties 8; 2 slower).
    A lone row over panels keeps 4 partial sums along K: 5-10% faster than 1 on those shapes
    with their weights read from memory (8: 5-20% slower)."""
    if layout == "panels":
        return {"mr": 8, "mt": 4, "ku": _block(k, 4), "ser": SER}
    if layout == "out_in":
        nv = _block(n, 32)
        return {"mt": 4, "nb": _block(n, 4), "nb1": min(_block(n, 8), nv), "v": vec_width(k), "nv": nv, "ku": 1,
                "mr": 8, "jt": 1, "pm": 64, "par": PAR, "ser": SER}
    return {"mt": 4, "nv": _block(n, 32), "ku": 1, "mr": 8, "jt": 1, "pm": 32, "par": PAR, "ser": SER}


def resolve(layout: str, k: int, n: int, config: Mapping[str, int] | None) -> dict[str, int] | None:
    """The full config of this layout and shape (defaults for missing knobs), or None when a
    value does not divide the shape."""
    c = default_config(layout, k, n)
    c.update({key: int(v) for key, v in (config or {}).items() if key in c})
    if layout == "out_in":
        cols = c["nv"] * c["jt"]
        ok = (n % cols == 0 and cols % c["nb"] == 0 and cols % c["nb1"] == 0 and k % (c["v"] * c["ku"]) == 0
              and c["nv"] % min(c["nv"], 8) == 0)  # the transposing pack gathers 8 rows at a time
    elif layout == "in_out":
        ok = n % (c["nv"] * c["jt"]) == 0 and k % c["ku"] == 0
    else:
        ok = k % c["ku"] == 0
    return c if ok and c["ser"] >= 0 and min(v for key, v in c.items() if key != "ser") >= 1 else None


@T.macro
def _lane_sum(acc, i, j, v):
    """acc[i, j, 0] = the sum of acc[i, j, :v], a tree of vector adds (a scalar chain costs as
    much as the dot product)."""
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


def _func(layout: str, k: int, n: int, dt: str, wdt: str, bdt: str, has_b: bool, c: Mapping[str, int]):
    out_in = layout == "out_in"
    mr, nv, jt, pm, mt, ku = c["mr"], c["nv"], c["jt"], c["pm"], c["mt"], c["ku"]
    nb, nb1, v = c.get("nb", 1), c.get("nb1", 1), c.get("v", 1)  # out_in's narrow path
    wshape = (n, k) if out_in else (k, n)
    cols = nv * jt  # output columns per task
    per = 1  # tasks per parallel iteration: its buffers are allocated once per iteration (~0.3 us)
    while (n // cols) % (per * 2) == 0 and n // cols // (per * 2) >= c["par"]:
        per *= 2
    qp = min(nv, 8)

    @T.macro
    def task(tp, X, W, Bias, Y, M):  # tasks tp * per .. tp * per + per - 1
        for t0 in range(per):
            t = T.meta_var(tp * per + t0)
            if M >= pm:
                # wide: the task's columns of W packed once, P[jb, k, q] = W^T[k, (t*jt + jb)*nv + q]
                P = T.alloc_buffer((jt, k, nv), F32)
                if out_in:
                    for jb, qb, kk in T.grid(jt, nv // qp, k):
                        for q in T.vectorized(qp):
                            P[jb, kk, qb * qp + q] = T.Cast(F32, W[t * cols + jb * nv + qb * qp + q, kk])
                else:
                    for jb, kk in T.grid(jt, k):
                        for q in T.vectorized(nv):
                            P[jb, kk, q] = T.Cast(F32, W[kk, t * cols + jb * nv + q])
                # then (mr x nv) tiles of y in registers, each k broadcasting x[m, k] against the
                # panel's contiguous row P[jb, k, :]
                for mb, jb in T.grid(M // mr, jt):
                    acc = T.alloc_buffer((mr, nv), F32, scope="local")
                    for i in T.unroll(mr):
                        for q in T.vectorized(nv):
                            acc[i, q] = T.float32(0)
                    for k0 in range(k // ku):
                        for u in T.unroll(ku):
                            for i in T.unroll(mr):
                                for q in T.vectorized(nv):
                                    acc[i, q] = acc[i, q] + T.Cast(F32, X[mb * mr + i, k0 * ku + u]) * P[jb, k0 * ku + u, q]
                    for i in T.unroll(mr):
                        for q in T.vectorized(nv):
                            if has_b:
                                Y[mb * mr + i, t * cols + jb * nv + q] = T.Cast(
                                    dt, acc[i, q] + T.Cast(F32, Bias[t * cols + jb * nv + q]))
                            else:
                                Y[mb * mr + i, t * cols + jb * nv + q] = T.Cast(dt, acc[i, q])
            # narrow (decode steps, and the rows the wide path leaves): W read as it is, rows
            # in tiles of mt, then one at a time
            r0 = T.meta_var(T.if_then_else(M >= pm, M // mr * mr, T.int64(0)))
            r1 = T.meta_var(r0 + (M - r0) // mt * mt)
            if out_in:
                # (mt x nb) dot products, each accumulating v lanes along K, summed at the end
                for mb, jb in T.grid((M - r0) // mt, cols // nb):
                    acc1 = T.alloc_buffer((mt, nb, v), F32, scope="local")
                    for i, j in T.grid(mt, nb):
                        for q in T.vectorized(v):
                            acc1[i, j, q] = T.float32(0)
                    for k0 in range(k // (v * ku)):
                        for u in T.unroll(ku):
                            for i in T.unroll(mt):
                                for j in T.unroll(nb):
                                    for q in T.vectorized(v):
                                        acc1[i, j, q] = acc1[i, j, q] + T.Cast(F32, X[r0 + mb * mt + i, (k0 * ku + u) * v + q]) * T.Cast(
                                            F32, W[t * cols + jb * nb + j, (k0 * ku + u) * v + q])
                    for i, j in T.grid(mt, nb):
                        _lane_sum(acc1, i, j, v)
                        if has_b:
                            Y[r0 + mb * mt + i, t * cols + jb * nb + j] = T.Cast(
                                dt, acc1[i, j, 0] + T.Cast(F32, Bias[t * cols + jb * nb + j]))
                        else:
                            Y[r0 + mb * mt + i, t * cols + jb * nb + j] = T.Cast(dt, acc1[i, j, 0])
                for m, jb in T.grid(M - r1, cols // nb1):
                    acc2 = T.alloc_buffer((1, nb1, v), F32, scope="local")
                    for j in T.unroll(nb1):
                        for q in T.vectorized(v):
                            acc2[0, j, q] = T.float32(0)
                    for k0 in range(k // (v * ku)):
                        for u in T.unroll(ku):
                            for j in T.unroll(nb1):
                                for q in T.vectorized(v):
                                    acc2[0, j, q] = acc2[0, j, q] + T.Cast(F32, X[r1 + m, (k0 * ku + u) * v + q]) * T.Cast(
                                        F32, W[t * cols + jb * nb1 + j, (k0 * ku + u) * v + q])
                    for j in range(nb1):
                        _lane_sum(acc2, 0, j, v)
                        if has_b:
                            Y[r1 + m, t * cols + jb * nb1 + j] = T.Cast(dt, acc2[0, j, 0] + T.Cast(F32, Bias[t * cols + jb * nb1 + j]))
                        else:
                            Y[r1 + m, t * cols + jb * nb1 + j] = T.Cast(dt, acc2[0, j, 0])
            else:
                # (mt x nv) tiles of y, each k broadcasting x[m, k] against W[k, nv columns]
                for mb, jb in T.grid((M - r0) // mt, jt):
                    acc1 = T.alloc_buffer((mt, nv), F32, scope="local")
                    for i in T.unroll(mt):
                        for q in T.vectorized(nv):
                            acc1[i, q] = T.float32(0)
                    for k0 in range(k // ku):
                        for u in T.unroll(ku):
                            for i in T.unroll(mt):
                                for q in T.vectorized(nv):
                                    acc1[i, q] = acc1[i, q] + T.Cast(F32, X[r0 + mb * mt + i, k0 * ku + u]) * T.Cast(
                                        F32, W[k0 * ku + u, t * cols + jb * nv + q])
                    for i in T.unroll(mt):
                        for q in T.vectorized(nv):
                            if has_b:
                                Y[r0 + mb * mt + i, t * cols + jb * nv + q] = T.Cast(
                                    dt, acc1[i, q] + T.Cast(F32, Bias[t * cols + jb * nv + q]))
                            else:
                                Y[r0 + mb * mt + i, t * cols + jb * nv + q] = T.Cast(dt, acc1[i, q])
                for m, jb in T.grid(M - r1, jt):
                    acc2 = T.alloc_buffer((nv,), F32, scope="local")
                    for q in T.vectorized(nv):
                        acc2[q] = T.float32(0)
                    for k0 in range(k // ku):
                        for u in T.unroll(ku):
                            for q in T.vectorized(nv):
                                acc2[q] = acc2[q] + T.Cast(F32, X[r1 + m, k0 * ku + u]) * T.Cast(
                                    F32, W[k0 * ku + u, t * cols + jb * nv + q])
                    for q in T.vectorized(nv):
                        if has_b:
                            Y[r1 + m, t * cols + jb * nv + q] = T.Cast(dt, acc2[q] + T.Cast(F32, Bias[t * cols + jb * nv + q]))
                        else:
                            Y[r1 + m, t * cols + jb * nv + q] = T.Cast(dt, acc2[q])


    return entry(k, n, wshape, dt, wdt, bdt, c["ser"] * 1024, n // cols // per, task)


def linear(info: OpInfo, config: Mapping[str, int] | None = None) -> Kernel | None:
    """The kernel of a linear node with the schedule `config` (None: the default); None when
    the node is not covered. A config that does not divide the shape is a ValueError."""
    x, w = info.inputs[:2]
    b = info.inputs[2] if len(info.inputs) > 2 else None
    layout = info.attrs.get("weight_layout", "out_in")
    if x is None or w is None or x.dtype not in FLOATS or w.dtype not in FLOATS:
        return None
    if b is not None and (b.dtype not in FLOATS or b.rank != 1):
        return None
    if layout == "panels" and w.rank == 3 and all(isinstance(d, int) for d in w.shape):
        k, n, nb = w.shape[1], w.shape[0] * w.shape[2], w.shape[2]
    elif layout in ("out_in", "in_out") and w.rank == 2:
        k, n, nb = (w.shape[1], w.shape[0], 0) if layout == "out_in" else (w.shape[0], w.shape[1], 0)
    else:
        return None
    if not isinstance(k, int) or not isinstance(n, int):
        return None
    c = resolve(layout, k, n, config)
    if c is None:
        raise ValueError(f"linear {layout} k={k} n={n}: config {dict(config or {})} does not divide the shape")
    bdt = b.dtype if b is not None else F32
    if nb:
        func = panels_func(k, n, nb, x.dtype, w.dtype, bdt, b is not None, c)
    else:
        func = _func(layout, k, n, x.dtype, w.dtype, bdt, b is not None, c)
    name = name_of("linear", layout, f"k{k}n{n}", f"p{nb}" if nb else "", short(x.dtype), f"w{short(w.dtype)}",
                   f"b{short(b.dtype)}" if b is not None else "")
    keep = (0, 1, 2, 3) if b is not None else (0, 1, 3)
    ins = (0, 1, 2) if b is not None else (0, 1)
    present = (MAT, AS_IS, AS_IS, MAT) if b is not None else (MAT, AS_IS, MAT)
    return Kernel(name, keep_params(func, keep), ins, (0,), present)


BUILDERS = {"linear": linear}
