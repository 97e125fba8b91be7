"""The loops of quant_linear.py's kernel (its docstring draws the schedule): the staging of x,
the narrow path's tiles, the wide path's panel and register tiles, and the PrimFunc around them."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from tvm.script import tirx as T

from kiln.ir.ops.quant import QMAX
from kiln.kernels.tvm_kernels import vec_width
from kiln.kernels.tvm_kernels.tir import F32, rounded_to


@dataclass(frozen=True)
class Spec:
    """What one quantized_linear function is specialized to."""

    k: int
    """Input channels."""
    n: int
    """Output channels."""
    group: int
    """Channels per group (without g_idx)."""
    g: int
    """Groups per row of scales."""
    bits: int
    """4 or 8."""
    dt: str
    """x's and y's dtype."""
    sdt: str
    """The scales' dtype."""
    bdt: str
    """The bias' dtype (float32 when there is none)."""
    odt: str
    """The offsets' dtype (float32 when there are none)."""
    has_z: bool
    """Zeros are given (else 2^(bits-1))."""
    has_o: bool
    """Float offsets are given: w = q * scale + offset (no zero point, no g_idx)."""
    has_g: bool
    """g_idx is given (act-order groups)."""
    has_b: bool
    """A bias is given."""
    act: bool
    """x goes through quant_act's int8 rounding."""


def prim_func(s: Spec, c: Mapping[str, int]):
    """The PrimFunc (x, qweight, scales, zeros, offsets, g_idx, bias, y) of spec `s` under config `c`."""
    k, n, bits, dt = s.k, s.n, s.bits, s.dt
    nb, nj, nj1, v, mt, mr, pm = c["nb"], c["nj"], c["nj1"], c["v"], c["mt"], c["mr"], c["pm"]
    kp = k * bits // 8
    rnd = rounded_to(dt)
    half = 1 << (bits - 1)
    planes = 1 if bits == 8 else 2
    lanes = v // planes  # float32 lanes per plane of a chunk
    # bits 4 with AVX-512: a group's 16 dequantized values in one register, each weight one vpermps
    lut = bool(c["lut"]) and bits == 4 and lanes == 16 and not s.has_g
    # the scale multiplies a group's partial sums (offsets: no, each weight is q * scale + offset)
    factored = dt == F32 and not s.has_g and not s.has_o and not lut
    gk = s.group if not s.has_g else v  # channels per partial sum
    av = vec_width(k, 16)  # lanes of the row's max |x|
    ser_bytes = c["ser"] * 1024
    serial = n * kp <= ser_bytes  # else no row count runs serially: no serial copy built

    def xval(X, m, kk, sc):
        """x[m, kk] in float32; with act, through quant_act's int8 rounding at the row's scale sc
        (x / s rounded half to even, clamped, times s, rounded to x's dtype: the reference's
        bits, whatever order the lanes run in)."""
        x = T.Cast(F32, X[m, kk])
        if not s.act:
            return x
        return rnd(T.max(T.min(T.nearbyint(x / sc), T.float32(127)), T.float32(-128)) * sc)

    @T.macro
    def stage(X, XQ, m):
        """XQ[m, :] = x[m, :] as the product reads it (bits 4: per chunk the even channels, then
        the odd ones)."""
        sc = T.alloc_buffer((1,), F32, scope="local")
        sc[0] = T.float32(1)
        if s.act:
            amax = T.alloc_buffer((av,), F32, scope="local")
            for q in T.vectorized(av):
                amax[q] = T.float32(0)
            for kb in range(k // av):
                for q in T.vectorized(av):
                    amax[q] = T.max(amax[q], T.fabs(T.Cast(F32, X[m, kb * av + q])))
            for q in range(1, av):
                amax[0] = T.max(amax[0], amax[q])
            sc[0] = T.if_then_else(amax[0] == T.float32(0), T.float32(1), amax[0] / T.float32(QMAX["int8"]))
        for kb in range(k // v):
            for p in T.unroll(planes):
                for q in T.vectorized(lanes):
                    XQ[m, kb * v + p * lanes + q] = xval(X, m, kb * v + planes * q + p, sc[0])

    def zero(Z, row, grp):
        return T.Cast("int32", Z[row, grp]) if s.has_z else T.int32(half)

    def group_of(G, kk):
        """g_idx[kk], clamped to the scales' columns: an index out of range reads no memory
        outside them."""
        return T.max(T.min(G[kk], T.int32(s.g - 1)), T.int32(0))

    def dequant(S, Z, Off, row, grp, code):
        """The reference's weight of integer code `code` in group grp of row `row`: (q - z) * s,
        or q * s + offset, in float32 rounded to the dtype."""
        if s.has_o:
            return rnd(T.Cast(F32, code) * T.Cast(F32, S[row, grp]) + T.Cast(F32, Off[row, grp]))
        return rnd(T.Cast(F32, code - zero(Z, row, grp)) * T.Cast(F32, S[row, grp]))

    def weight(Q, S, Z, Off, G, row, ch, q, high, scaled):
        """Lane q of chunk ch of packed row `row` (bits 4: plane `high`): the reference's
        dequantized weight, or when not `scaled`, q - z as float32 (the group's scale comes
        later)."""
        if bits == 8:
            code = T.Cast("int32", Q[row, ch * v + q])
        else:
            b = T.Cast("int32", Q[row, ch * lanes + q])
            code = T.shift_right(b, T.int32(4)) if high else T.bitwise_and(b, T.int32(15))
        if not scaled:
            return T.Cast(F32, code - zero(Z, row, ch * v // s.group))
        grp = group_of(G, ch * v + planes * q + high) if s.has_g else ch * v // s.group
        return dequant(S, Z, Off, row, grp, code)

    def permute(tab, j, codes):
        """tab[j, codes & 15] of 16 int32 codes: vpermps reads only the index's low 4 bits."""
        return T.call_llvm_pure_intrin("float32x16", "llvm.x86.avx512.permvar.sf.512", tab[j, T.Ramp(0, 1, 16)],
                                       codes)

    @T.macro
    def lane_sum(acc, i, j):
        """acc[i, j, 0] = the sum of acc[i, j, :lanes], a tree of vector adds."""
        if lanes >= 32:
            for q in T.vectorized(16):
                acc[i, j, q] = acc[i, j, q] + acc[i, j, q + 16]
        if lanes >= 16:
            for q in T.vectorized(8):
                acc[i, j, q] = acc[i, j, q] + acc[i, j, q + 8]
        if lanes >= 8:
            for q in T.vectorized(4):
                acc[i, j, q] = acc[i, j, q] + acc[i, j, q + 4]
        if lanes >= 4:
            for q in T.vectorized(2):
                acc[i, j, q] = acc[i, j, q] + acc[i, j, q + 2]
        if lanes >= 2:
            acc[i, j, 0] = acc[i, j, 0] + acc[i, j, 1]

    def out(Bias, col, val):
        """y's value of a float32 sum: plus the bias, in y's dtype."""
        return T.Cast(dt, val + T.Cast(F32, Bias[col]) if s.has_b else val)

    @T.macro
    def narrow(XQ, Q, S, Z, Off, G, Bias, Y, n0, m0, rows, cols):
        acc = T.alloc_buffer((rows, cols, lanes), F32, scope="local")
        part = T.alloc_buffer((rows, cols, planes, lanes), F32, scope="local")  # a chain per plane
        wv = T.alloc_buffer((planes, cols, lanes), F32, scope="local")
        tab = T.alloc_buffer((cols, 16), F32, scope="local")
        for i, j in T.grid(rows, cols):
            for q in T.vectorized(lanes):
                acc[i, j, q] = T.float32(0)
        for gi in range(k // gk):
            if lut:
                # tab[j, c] = the weight of code c in group gi of column n0 + j, as the reference's
                for j in T.unroll(cols):
                    for q in T.vectorized(16):
                        tab[j, q] = dequant(S, Z, Off, n0 + j, gi, T.Cast("int32", q))
            for i, j, p in T.grid(rows, cols, planes):
                for q in T.vectorized(lanes):
                    part[i, j, p, q] = T.float32(0)
            for kb in range(gk // v):
                ch = T.meta_var(gi * (gk // v) + kb)
                for j in T.unroll(cols):
                    if lut:
                        codes = T.meta_var(T.Cast("int32x16", Q[n0 + j, T.Ramp(ch * 16, 1, 16)]))
                        wv[0, j, T.Ramp(0, 1, 16)] = permute(tab, j, codes)
                        wv[1, j, T.Ramp(0, 1, 16)] = permute(tab, j, T.shift_right(codes, T.Broadcast(T.int32(4), 16)))
                    else:
                        for q in T.vectorized(lanes):
                            wv[0, j, q] = weight(Q, S, Z, Off, G, n0 + j, ch, q, 0, not factored)
                    if bits == 4 and not lut:
                        for q in T.vectorized(lanes):
                            wv[1, j, q] = weight(Q, S, Z, Off, G, n0 + j, ch, q, 1, not factored)
                for i in T.unroll(rows):
                    for j in T.unroll(cols):
                        for p in T.unroll(planes):
                            for q in T.vectorized(lanes):
                                part[i, j, p, q] = part[i, j, p, q] + XQ[m0 + i, ch * v + p * lanes + q] * wv[p, j, q]
            for i in T.unroll(rows):
                for j in T.unroll(cols):
                    for q in T.vectorized(lanes):
                        if bits == 4:
                            part[i, j, 0, q] = part[i, j, 0, q] + part[i, j, 1, q]
                        if factored:
                            acc[i, j, q] = acc[i, j, q] + T.Cast(F32, S[n0 + j, gi]) * part[i, j, 0, q]
                        else:
                            acc[i, j, q] = acc[i, j, q] + part[i, j, 0, q]
        for i, j in T.grid(rows, cols):
            lane_sum(acc, i, j)
            Y[m0 + i, n0 + j] = out(Bias, n0 + j, acc[i, j, 0])

    @T.macro
    def wide(XQ, Q, S, Z, Off, G, Bias, Y, t, M):
        # the task's columns dequantized once, P[k', j] = w[t * nb + j, channel of k'] (k' in
        # XQ's order), chunks transposed in registers
        P = T.alloc_buffer((k, nb), F32)
        wp = T.alloc_buffer((planes, nb, lanes), F32, scope="local")
        for ch in range(k // v):
            for j in T.unroll(nb):
                for q in T.vectorized(lanes):
                    wp[0, j, q] = weight(Q, S, Z, Off, G, t * nb + j, ch, q, 0, True)
                if bits == 4:
                    for q in T.vectorized(lanes):
                        wp[1, j, q] = weight(Q, S, Z, Off, G, t * nb + j, ch, q, 1, True)
            for p in T.unroll(planes):
                for q in T.unroll(lanes):
                    for j in T.vectorized(nb):
                        P[ch * v + p * lanes + q, j] = wp[p, j, q]
        for mb in range(M // mr):
            acc = T.alloc_buffer((mr, nb), F32, scope="local")
            for i in T.unroll(mr):
                for q in T.vectorized(nb):
                    acc[i, q] = T.float32(0)
            for kk in range(k):
                for i in T.unroll(mr):
                    for q in T.vectorized(nb):
                        acc[i, q] = acc[i, q] + XQ[mb * mr + i, kk] * P[kk, q]
            for i in T.unroll(mr):
                for q in T.vectorized(nb):
                    Y[mb * mr + i, t * nb + q] = out(Bias, t * nb + q, acc[i, q])

    @T.macro
    def task(t, XQ, Q, S, Z, Off, G, Bias, Y, M):
        if M >= pm:
            wide(XQ, Q, S, Z, Off, G, Bias, Y, t, M)
        # narrow: the rows the wide path left (all of them below pm), mt at a time, then one
        r0 = T.meta_var(T.if_then_else(M >= pm, M // mr * mr, T.int64(0)))
        r1 = T.meta_var(r0 + (M - r0) // mt * mt)
        for mb, jb in T.grid((M - r0) // mt, nb // nj):
            narrow(XQ, Q, S, Z, Off, G, Bias, Y, t * nb + jb * nj, r0 + mb * mt, mt, nj)
        for m, jb in T.grid(M - r1, nb // nj1):
            narrow(XQ, Q, S, Z, Off, G, Bias, Y, t * nb + jb * nj1, r1 + m, 1, nj1)

    @T.prim_func(private=True)
    def func(x_h: T.handle, q_h: T.handle, s_h: T.handle, z_h: T.handle, o_h: T.handle, g_h: T.handle,
             b_h: T.handle, y_h: T.handle):
        T.func_attr({"tirx.noalias": True})
        M = T.int64()
        sx0, sy0 = T.int64(), T.int64()
        X = T.match_buffer(x_h, (M, k), dt, strides=(sx0, 1), offset_factor=1)
        Q = T.match_buffer(q_h, (n, kp), "uint8", offset_factor=1)
        S = T.match_buffer(s_h, (n, s.g), s.sdt, offset_factor=1)
        Z = T.match_buffer(z_h, (n, s.g), "uint8", offset_factor=1)
        Off = T.match_buffer(o_h, (n, s.g), s.odt, offset_factor=1)
        G = T.match_buffer(g_h, (k,), "int32", offset_factor=1)
        Bias = T.match_buffer(b_h, (n,), s.bdt, offset_factor=1)
        Y = T.match_buffer(y_h, (M, n), dt, strides=(sy0, 1), offset_factor=1)
        XQ = T.alloc_buffer((M, k), F32)
        if M >= pm:
            for m in T.parallel(M):
                stage(X, XQ, m)
        else:
            for m in range(M):
                stage(X, XQ, m)
        if serial and M * (n * kp) <= ser_bytes:
            # few bytes of weight per call: the pool's fork and join would cost more than the work
            for t in range(n // nb):
                task(t, XQ, Q, S, Z, Off, G, Bias, Y, M)
        else:
            for t in T.parallel(n // nb):
                task(t, XQ, Q, S, Z, Off, G, Bias, Y, M)

    return func
