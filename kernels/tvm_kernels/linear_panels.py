"""linear over a panels weight: y [M, N] = x [M, K] @ W^T (+ bias), W stored as N / nb panels
[K, nb] (weight_layout "panels", kiln.passes.weight_panels: P[p, k, j] = W^T[k, p * nb + j]).

Schedule: one parallel loop over the panels (TVM gives each thread one contiguous range of
them, so a thread's weights are one contiguous run of memory); per panel, its rows in register
tiles of mr rows, then mt, then one at a time:

    for each (rows x nb) tile of y:             acc[rows, nb] in registers (rows * nb / 16 zmm)
      for k in 0..K:                            the panel's row P[p, k, :] (nb / 16 loads)
        acc[i, :] += x[m0 + i, k] * P[p, k, :]  (rows broadcasts, rows * nb / 16 FMAs)

A decode step (M = 1) streams each panel once, one vector per k and no sums across lanes; a
prefill step keeps the panel (K * nb * 4 bytes) in L2 while every row tile passes over it, as
the out_in and in_out layouts' wide path does after packing what this layout stores packed.
"""

from __future__ import annotations

from collections.abc import Mapping

from tvm.script import tirx as T

from kiln.kernels.tvm_kernels.tir import F32, dtype_bytes


def panels_func(
    k: int, n: int, nb: int, dt: str, wdt: str, bdt: str, has_b: bool, c: Mapping[str, int]
):
    """The PrimFunc (x, W, bias, y) of one shape: K = k, N = n outputs in panels of nb; knobs
    mr and mt (rows per register tile) and ser (the most KiB of W x rows run serially)."""
    mr, mt, ku = c["mr"], c["mt"], c["ku"]

    @T.macro
    def tile(X, W, Bias, Y, p, m0, rows, splits):
        # `splits` partial sums per row along K (a one-row tile: more FMA chains than nb / 16)
        acc = T.alloc_buffer((splits, rows, nb), F32, scope="local")
        for u in T.unroll(splits):
            for i in T.unroll(rows):
                for q in T.vectorized(nb):
                    acc[u, i, q] = T.float32(0)
        for k0 in range(k // splits):
            for u in T.unroll(splits):
                for i in T.unroll(rows):
                    for q in T.vectorized(nb):
                        kk = T.meta_var(k0 * splits + u)
                        acc[u, i, q] = acc[u, i, q] + T.Cast(F32, X[m0 + i, kk]) * T.Cast(
                            F32, W[p, kk, q]
                        )
        for u in T.unroll(splits - 1):
            for i in T.unroll(rows):
                for q in T.vectorized(nb):
                    acc[0, i, q] = acc[0, i, q] + acc[u + 1, i, q]
        for i in T.unroll(rows):
            for q in T.vectorized(nb):
                if has_b:
                    Y[m0 + i, p * nb + q] = T.Cast(dt, acc[0, i, q] + T.Cast(F32, Bias[p * nb + q]))
                else:
                    Y[m0 + i, p * nb + q] = T.Cast(dt, acc[0, i, q])

    @T.macro
    def panel(p, X, W, Bias, Y, M):
        for mb in range(M // mr):
            tile(X, W, Bias, Y, p, mb * mr, mr, 1)
        r0 = T.meta_var(M // mr * mr)
        for mb in range((M - r0) // mt):
            tile(X, W, Bias, Y, p, r0 + mb * mt, mt, 1)
        r1 = T.meta_var(r0 + (M - r0) // mt * mt)
        for m in range(M - r1):
            tile(X, W, Bias, Y, p, r1 + m, 1, ku)

    return entry(k, n, (n // nb, k, nb), dt, wdt, bdt, c["ser"] * 1024, n // nb, panel)


def entry(
    k: int,
    n: int,
    wshape: tuple[int, ...],
    dt: str,
    wdt: str,
    bdt: str,
    ser_bytes: int,
    tasks: int,
    body,
):
    """The PrimFunc (x, W, bias, y) of a linear: body(t, X, W, Bias, Y, M) for each task t in
    range(tasks), in TVM's pool, or on the calling thread when the call moves at most ser_bytes
    of W times rows (M)."""
    wbytes = dtype_bytes(wdt)
    serial = k * n * wbytes <= ser_bytes  # else no row count runs serially: no serial copy built

    @T.prim_func(private=True)
    def func(x_h: T.handle, w_h: T.handle, b_h: T.handle, y_h: T.handle):
        T.func_attr({"tirx.noalias": True})  # y never overlaps x, W or bias: x loads stay hoisted
        M = T.int64()
        sx0, sy0 = T.int64(), T.int64()
        X = T.match_buffer(x_h, (M, k), dt, strides=(sx0, 1), offset_factor=1)
        W = T.match_buffer(w_h, wshape, wdt, offset_factor=1)
        Bias = T.match_buffer(b_h, (n,), bdt, offset_factor=1)
        Y = T.match_buffer(y_h, (M, n), dt, strides=(sy0, 1), offset_factor=1)
        if serial:
            # few bytes of W per call: the pool's fork and join would cost more than the work
            if M * (k * n * wbytes) <= ser_bytes:
                for t in range(tasks):
                    body(t, X, W, Bias, Y, M)
            else:
                for t in T.parallel(tasks):
                    body(t, X, W, Bias, Y, M)
        else:
            for t in T.parallel(tasks):
                body(t, X, W, Bias, Y, M)

    return func
