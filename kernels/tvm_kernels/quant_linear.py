"""quantized_linear over canonical packed integer weights (ir/ops/quant.py), weight-only or
with int8 activations (W8A8 / W4A8):

    x [M, K]   qweight uint8 [N, K * bits / 8]   scales [N, G]   zeros uint8 [N, G] (optional)
    g_idx int32 [K] (optional)
    w[n, k] = dtype(float32(q[n, k] - z[n, g(k)]) * scales[n, g(k)])   g(k) = g_idx[k] or k // group
              (z: 2^(bits-1) without zeros; bits 4: byte j holds k = 2j in its low nibble, 2j + 1
              in its high one)
    y [M, N] = x @ w^T (+ bias), accumulated in float32, rounded once to y's dtype

With act "int8" each row of x goes through quant_act's rounding as the kernel reads it (its
scale, max |x| / 127, computed at the start of each row tile): the reference's values exactly,
multiplied in float32 (no int8 dot products yet). With act-order g_idx [K] a channel's group is
g_idx[k], read per channel (a gather of its scale and zero: slower than groups of whole chunks,
far faster than the reference's dequantized weight). fp8 weights and fp8 activations are not
built here: those nodes run the op's torch reference (the cpu lowering lists them as fallbacks).

Schedule: one parallel loop over blocks of nb output columns (rows of the packed weight); each
task serves every row of x for its columns, by one of two paths chosen by the row count M:

    narrow (M < pm: decode steps, and the rows the wide path leaves), rows in tiles of mt then
        one at a time; per tile the task's packed rows are read once, unpacked in the inner loop:

            for each chunk of v input channels (one group: v divides the group size):
              wv[j, :] = dequant(qweight[n0 + j, chunk])            nb x v float32, registers
              acc[i, j, :] += x[m0 + i, chunk] * wv[j, :]           mt x nb x v lanes
            y[m0 + i, n0 + j] = sum of acc[i, j, :]

        bits 4 keeps two planes of v / 2 lanes instead, one per nibble (the low nibbles hold the
        chunk's even channels, the high ones its odd channels), and splits the chunk of x into
        the same two planes once per tile: each packed byte is loaded once, as a byte vector,
        with no gather (indexing channels k // 2 across lanes made a gather: 3.5x slower at
        batch-1 decode, 1184 vs 333 us at K = N = 2048, group 128, on this 2-core machine).

    wide (M >= pm, prefill): the task's nb columns dequantized once into a panel P [K, nb]
        float32 (chunks read as the narrow path reads them, transposed in registers: 20-30%
        faster than gathering a row of P across nb packed rows), then register tiles of mr rows (acc[mr, nb]: one broadcast of x[m, k] against
        the panel's row P[k, :]), as linear.py's wide path over a packed weight.

Knobs (`KNOBS`, searched by `kiln tune`): nb, v, mt, mr, pm and ser (the most KiB of packed
weight x rows run on the calling thread, no fork and join of TVM's pool).
"""

from __future__ import annotations

import math
from collections.abc import Mapping

from tvm.script import tirx as T

from kiln.ir.ops.quant import QMAX
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
from kiln.kernels.tvm_kernels.tir import F32, rounded_to

KNOBS = {"quantized_linear": {"nb": (2, 4, 8, 16, 32), "v": (4, 8, 16, 32), "mt": (1, 2, 4, 8), "mr": (4, 8, 12),
                              "pm": (8, 16, 32, 64), "ser": (0, 64, 256, 1024)}}
"""The search space: output columns per task (nb), input-channel lanes (v: divides the group size
and K), rows per narrow tile (mt), rows per wide register tile (mr), fewest rows that take the
wide path (pm), serial bound in KiB (ser). A value that does not divide the shape is no schedule
of it."""


def _block(n: int, widest: int) -> int:
    b = widest
    while b > 1 and n % b:
        b //= 2
    return b


def default_config(k: int, n: int, group: int) -> dict[str, int]:
    """The schedule built without tuning: 16 columns per task, lanes of the widest vector up to
    16 that divides the group, 4-row narrow tiles, 8-row wide tiles from 32 rows on."""
    return {"nb": _block(n, 16), "v": vec_width(math.gcd(k, group), 16), "mt": 4, "mr": 8, "pm": 32, "ser": 1024}


def resolve(k: int, n: int, group: int, bits: int, config: Mapping[str, int] | None,
            act_order: bool = False) -> dict[str, int] | None:
    """The full config of this shape (defaults for missing knobs), or None when a value does not
    divide it (with act_order, a chunk of v channels need not lie in one group)."""
    c = default_config(k, n, group)
    c.update({key: int(v) for key, v in (config or {}).items() if key in c})
    ok = n % c["nb"] == 0 and k % c["v"] == 0 and (act_order or group % c["v"] == 0) \
        and (bits == 8 or c["v"] % 2 == 0)
    return c if ok and c["ser"] >= 0 and min(v for key, v in c.items() if key != "ser") >= 1 else None


def _func(k: int, n: int, group: int, g: int, bits: int, dt: str, sdt: str, bdt: str, has_z: bool, has_g: bool,
          has_b: bool, act: bool, c: Mapping[str, int]):
    nb, v, mt, mr, pm = c["nb"], c["v"], c["mt"], c["mr"], c["pm"]
    kp = k * bits // 8
    rnd = rounded_to(dt)
    half = 1 << (bits - 1)
    ser_bytes = c["ser"] * 1024
    serial = n * kp <= ser_bytes  # else no row count runs serially: no serial copy built
    lanes = v if bits == 8 else v // 2

    def xval(X, m, kk, sc):
        """x[m, kk] in float32; with act, through quant_act's int8 rounding at the row's scale sc
        (x / s rounded half to even, clamped, times s, rounded to x's dtype: the reference's
        bits, whatever order the lanes run in)."""
        x = T.Cast(F32, X[m, kk])
        if not act:
            return x
        return rnd(T.max(T.min(T.nearbyint(x / sc), T.float32(127)), T.float32(-128)) * sc)

    @T.macro
    def row_scales(X, m0, rows, SC):
        """SC[i] = max |x[m0 + i, :]| / 127 (1 for an all-zero row): quant_act's int8 scale."""
        amax = T.alloc_buffer((v,), F32, scope="local")
        for i in range(rows):
            for q in T.vectorized(v):
                amax[q] = T.float32(0)
            for kb in range(k // v):
                for q in T.vectorized(v):
                    amax[q] = T.max(amax[q], T.fabs(T.Cast(F32, X[m0 + i, kb * v + q])))
            for q in range(1, v):
                amax[0] = T.max(amax[0], amax[q])
            SC[i] = T.if_then_else(amax[0] == T.float32(0), T.float32(1), amax[0] / T.float32(QMAX["int8"]))

    def code4(Q, row, byte, high):
        """The 4-bit code of nibble `high` of byte `byte` of packed row `row`."""
        b = T.Cast("int32", Q[row, byte])
        return T.shift_right(b, T.int32(4)) if high else T.bitwise_and(b, T.int32(15))

    def dequant(Q, S, Z, row, grp, code):
        z = T.Cast("int32", Z[row, grp]) if has_z else T.int32(half)
        return rnd(T.Cast(F32, code - z) * T.Cast(F32, S[row, grp]))

    def group_of(G, kb, kk):
        """The group of channel kk in chunk kb: the chunk's one group, or g_idx[kk] (clamped to
        the scales' columns: an index out of range reads no memory outside them)."""
        if not has_g:
            return kb * v // group
        return T.max(T.min(G[kk], T.int32(g - 1)), T.int32(0))

    @T.macro
    def chunk(Q, S, Z, G, t, kb, wv):
        """wv = the weights of channels kb * v .. + v of the task's nb columns (bits 4: two
        planes of v / 2, the even channels' then the odd ones'), each packed byte loaded once."""
        for j in T.unroll(nb):
            if bits == 8:
                for q in T.vectorized(v):
                    wv[0, j, q] = dequant(Q, S, Z, t * nb + j, group_of(G, kb, kb * v + q),
                                          T.Cast("int32", Q[t * nb + j, kb * v + q]))
            else:
                for q in T.vectorized(lanes):
                    wv[0, j, q] = dequant(Q, S, Z, t * nb + j, group_of(G, kb, kb * v + 2 * q),
                                          code4(Q, t * nb + j, kb * lanes + q, False))
                for q in T.vectorized(lanes):
                    wv[1, j, q] = dequant(Q, S, Z, t * nb + j, group_of(G, kb, kb * v + 2 * q + 1),
                                          code4(Q, t * nb + j, kb * lanes + q, True))

    @T.macro
    def narrow(X, Q, S, Z, G, Bias, Y, t, m0, rows):
        # lanes: bits 8 one per channel of the chunk; bits 4 one per byte, two planes (the low
        # nibbles' channels 2p and the high ones' 2p + 1), x split into the same two planes
        acc = T.alloc_buffer((rows, nb, lanes), F32, scope="local")
        wv = T.alloc_buffer((2, nb, lanes), F32, scope="local")
        xv = T.alloc_buffer((2, rows, lanes), F32, scope="local")
        SC = T.alloc_buffer((rows,), F32, scope="local")
        if act:
            row_scales(X, m0, rows, SC)
        for i, j in T.grid(rows, nb):
            for q in T.vectorized(lanes):
                acc[i, j, q] = T.float32(0)
        for kb in range(k // v):
            chunk(Q, S, Z, G, t, kb, wv)
            if bits == 8:
                for i in T.unroll(rows):
                    for j in T.unroll(nb):
                        for q in T.vectorized(v):
                            acc[i, j, q] = acc[i, j, q] + xval(X, m0 + i, kb * v + q, SC[i]) * wv[0, j, q]
            else:
                for i in T.unroll(rows):
                    for q in T.vectorized(lanes):
                        xv[0, i, q] = xval(X, m0 + i, kb * v + 2 * q, SC[i])
                    for q in T.vectorized(lanes):
                        xv[1, i, q] = xval(X, m0 + i, kb * v + 2 * q + 1, SC[i])
                for i in T.unroll(rows):
                    for j in T.unroll(nb):
                        for q in T.vectorized(lanes):
                            acc[i, j, q] = acc[i, j, q] + xv[0, i, q] * wv[0, j, q] + xv[1, i, q] * wv[1, j, q]
        for i, j in T.grid(rows, nb):
            for q in range(1, lanes):
                acc[i, j, 0] = acc[i, j, 0] + acc[i, j, q]
            if has_b:
                Y[m0 + i, t * nb + j] = T.Cast(dt, acc[i, j, 0] + T.Cast(F32, Bias[t * nb + j]))
            else:
                Y[m0 + i, t * nb + j] = T.Cast(dt, acc[i, j, 0])

    @T.macro
    def task(t, X, Q, S, Z, G, Bias, Y, M):
        if M >= pm:
            # wide: the task's columns dequantized once, P[k, j] = w[t * nb + j, k]
            # (chunks of v channels as the narrow path reads them, transposed in registers)
            P = T.alloc_buffer((k, nb), F32)
            wp = T.alloc_buffer((2, nb, lanes), F32, scope="local")
            for kb in range(k // v):
                chunk(Q, S, Z, G, t, kb, wp)
                for q in T.unroll(lanes):
                    if bits == 8:
                        for j in T.vectorized(nb):
                            P[kb * v + q, j] = wp[0, j, q]
                    else:
                        for j in T.vectorized(nb):
                            P[kb * v + 2 * q, j] = wp[0, j, q]
                        for j in T.vectorized(nb):
                            P[kb * v + 2 * q + 1, j] = wp[1, j, q]
            for mb in range(M // mr):
                acc = T.alloc_buffer((mr, nb), F32, scope="local")
                SC2 = T.alloc_buffer((mr,), F32, scope="local")
                if act:
                    row_scales(X, mb * mr, mr, SC2)
                for i in T.unroll(mr):
                    for q in T.vectorized(nb):
                        acc[i, q] = T.float32(0)
                for kk in range(k):
                    for i in T.unroll(mr):
                        for q in T.vectorized(nb):
                            acc[i, q] = acc[i, q] + xval(X, mb * mr + i, kk, SC2[i]) * P[kk, q]
                for i in T.unroll(mr):
                    for q in T.vectorized(nb):
                        if has_b:
                            Y[mb * mr + i, t * nb + q] = T.Cast(dt, acc[i, q] + T.Cast(F32, Bias[t * nb + q]))
                        else:
                            Y[mb * mr + i, t * nb + q] = T.Cast(dt, acc[i, q])
        # narrow: the rows the wide path left (all of them below pm), mt at a time, then one
        r0 = T.meta_var(T.if_then_else(M >= pm, M // mr * mr, T.int64(0)))
        r1 = T.meta_var(r0 + (M - r0) // mt * mt)
        for mb in range((M - r0) // mt):
            narrow(X, Q, S, Z, G, Bias, Y, t, r0 + mb * mt, mt)
        for m in range(M - r1):
            narrow(X, Q, S, Z, G, Bias, Y, t, r1 + m, 1)

    @T.prim_func(private=True)
    def func(x_h: T.handle, q_h: T.handle, s_h: T.handle, z_h: T.handle, g_h: T.handle, b_h: T.handle,
             y_h: T.handle):
        T.func_attr({"tirx.noalias": True})
        M = T.int64()
        sx0, sy0 = T.int64(), T.int64()
        X = T.match_buffer(x_h, (M, k), dt, strides=(sx0, 1), offset_factor=1)
        Q = T.match_buffer(q_h, (n, kp), "uint8", offset_factor=1)
        S = T.match_buffer(s_h, (n, g), sdt, offset_factor=1)
        Z = T.match_buffer(z_h, (n, g), "uint8", offset_factor=1)
        G = T.match_buffer(g_h, (k,), "int32", offset_factor=1)
        Bias = T.match_buffer(b_h, (n,), bdt, offset_factor=1)
        Y = T.match_buffer(y_h, (M, n), dt, strides=(sy0, 1), offset_factor=1)
        if serial:
            if M * (n * kp) <= ser_bytes:
                for t in range(n // nb):
                    task(t, X, Q, S, Z, G, Bias, Y, M)
            else:
                for t in T.parallel(n // nb):
                    task(t, X, Q, S, Z, G, Bias, Y, M)
        else:
            for t in T.parallel(n // nb):
                task(t, X, Q, S, Z, G, Bias, Y, M)

    return func


def quantized_linear(info: OpInfo, config: Mapping[str, int] | None = None) -> Kernel | None:
    """The kernel of an int4 / int8 quantized_linear node, weight-only or with int8 activations
    (schedule `config`, None: the default); None for the nodes it does not cover. A config
    that does not divide the shape is a ValueError."""
    a = info.attrs
    if a.get("format") != "int" or a.get("act") not in ("none", "int8") or a.get("bits") not in (4, 8):
        return None
    x, qweight, scales = info.inputs[:3]
    rest = list(info.inputs[3:])
    zeros = rest.pop(0) if a["has_zeros"] else None
    g_idx = rest.pop(0) if a["has_g_idx"] else None
    bias = rest.pop(0) if a["has_bias"] else None
    if g_idx is not None and (g_idx.dtype != "int32" or g_idx.rank != 1):
        return None
    if x is None or x.dtype not in FLOATS or scales is None or scales.dtype not in FLOATS:
        return None
    if bias is not None and bias.dtype not in FLOATS:
        return None
    bits, n, kp = a["bits"], *qweight.shape
    if not isinstance(n, int) or not isinstance(kp, int):
        return None
    k = kp * 8 // bits
    group = a["group_size"]
    g = scales.shape[1]
    if not isinstance(group, int) or not isinstance(g, int) or g_idx is None and (k % group or g != k // group):
        return None
    c = resolve(k, n, group, bits, config, g_idx is not None)
    if c is None:
        raise ValueError(f"quantized_linear k={k} n={n} group={group}: config {dict(config or {})} does not divide "
                         "the shape")
    bdt = bias.dtype if bias is not None else F32
    act = a["act"] == "int8"
    func = _func(k, n, group, g, bits, x.dtype, scales.dtype, bdt, zeros is not None, g_idx is not None,
                 bias is not None, act, c)
    name = name_of("quantized_linear", f"k{k}n{n}", f"int{bits}", f"g{group}" if g_idx is None else f"gidx{g}",
                   "z" if zeros is not None else "", "a8" if act else "",
                   short(x.dtype), f"s{short(scales.dtype)}", f"b{short(bdt)}" if bias is not None else "")
    keep = (0, 1, 2, *((3,) if zeros is not None else ()), *((4,) if g_idx is not None else ()),
            *((5,) if bias is not None else ()), 6)
    ins = tuple(range(len(info.inputs)))  # x, qweight, scales[, zeros][, g_idx][, bias]: every op input
    present = (MAT, *(AS_IS,) * (len(ins) - 1), MAT)
    return Kernel(name, keep_params(func, keep), ins, (0,), present)


BUILDERS = {"quantized_linear": quantized_linear}
