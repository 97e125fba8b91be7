"""The tile path of the cpu paged-attention kernel (kiln.kernels.tvm_kernels.attention): up to R
query rows of one prefill sequence x the G heads of one KV head as the L lanes of every vector
(lane r * G + g is row r, head g), KB keys per step, scores S^T and output O^T in registers."""

from __future__ import annotations

from tvm.script import tirx as T

from kiln.kernels.tvm_kernels.attention_spec import AttentionSpec
from kiln.kernels.tvm_kernels.attention_vectors import (
    key_mask,
    load_f32,
    row_vectors,
    scaled_rows,
    tree,
    vector_exp,
)


def make_tile(spec: AttentionSpec):
    """The macro tile(q, k_cache, v_cache, tables, seq_lens, cu, snk, out, t, n_r, s, h, qT, kbuf,
    vbuf, sa, sb, oT, mv, dn, av, mn, lov, hiv) of spec: writes out[t : t + n_r] for the G heads
    of KV head h (rows of sequence s; the rest: the body's stack buffers, L lanes wide)."""
    dtype, d, dv, bs, scale = spec.dtype, spec.d, spec.dv, spec.bs, spec.scale
    g_heads, vl, vlv, kb, ml, kh = spec.g_heads, spec.vl, spec.vlv, spec.kb, spec.ml, spec.kh
    cap, lo_of, hi_of = spec.cap, spec.lo_of, spec.hi_of
    softcap, has_sinks = spec.softcap, spec.sinks
    neg = T.min_value("float32")
    lanes_all = T.Ramp(0, 1, ml)

    @T.macro
    def qk(kbuf, qT, sx, j0):
        # sx[j, lanes] = sum_c k[j0 + j, c] * qT[c, lanes]: c outer, so each qT[c] is loaded once
        for j in T.unroll(kh):
            sx[j, lanes_all] = T.Broadcast(T.float32(0), ml)
        for c in T.unroll(d):
            for j in T.unroll(kh):
                sx[j, lanes_all] = (
                    sx[j, lanes_all] + T.Broadcast(kbuf[j0 + j, c], ml) * qT[c, lanes_all]
                )

    @T.macro
    def cap_mask(sx, k, lov, hiv, masked):
        for j in T.unroll(kh):
            if masked:  # a row's keys outside its [lo, hi): -inf-like
                sx[j, lanes_all] = T.Select(
                    key_mask(k + j, lov[lanes_all], hiv[lanes_all], ml),
                    cap(sx[j, lanes_all]),
                    T.Broadcast(neg, ml),
                )
            elif softcap > 0:
                sx[j, lanes_all] = cap(sx[j, lanes_all])

    @T.macro
    def weights(sx, k, mn, lov, hiv, masked):
        for j in T.unroll(kh):
            if masked:
                sx[j, lanes_all] = T.Select(
                    key_mask(k + j, lov[lanes_all], hiv[lanes_all], ml),
                    vector_exp(sx[j, lanes_all] - mn[lanes_all], ml),
                    T.Broadcast(T.float32(0), ml),
                )
            else:
                sx[j, lanes_all] = vector_exp(sx[j, lanes_all] - mn[lanes_all], ml)

    @T.macro
    def step(
        k_cache,
        v_cache,
        blk,
        slot,
        h,
        k0,
        lo_t,
        hi_t,
        qT,
        kbuf,
        vbuf,
        sa,
        sb,
        oT,
        mv,
        dn,
        av,
        mn,
        lov,
        hiv,
        masked,
    ):
        # KB keys k0.. (slots slot.. of block blk) for every lane of the tile. K and V rows are
        # first copied to kbuf, vbuf as float32 (V rows outside [lo_t, hi_t) as 0: NaN * 0 is
        # NaN), so that the FMAs read them at constant offsets from one pointer.
        for j in range(kb):
            for c0 in T.unroll(d // vl):
                kbuf[j, T.Ramp(c0 * vl, 1, vl)] = load_f32(k_cache, [blk, slot + j, h], c0 * vl, vl)
            if masked:
                if k0 + j >= lo_t and k0 + j < hi_t:
                    for c0 in T.unroll(dv // vlv):
                        vbuf[j, T.Ramp(c0 * vlv, 1, vlv)] = load_f32(
                            v_cache, [blk, slot + j, h], c0 * vlv, vlv
                        )
                else:
                    for c0 in T.unroll(dv // vlv):
                        vbuf[j, T.Ramp(c0 * vlv, 1, vlv)] = T.Broadcast(T.float32(0), vlv)
            else:
                for c0 in T.unroll(dv // vlv):
                    vbuf[j, T.Ramp(c0 * vlv, 1, vlv)] = load_f32(
                        v_cache, [blk, slot + j, h], c0 * vlv, vlv
                    )
        qk(kbuf, qT, sa, 0)
        qk(kbuf, qT, sb, kh)
        cap_mask(sa, k0, lov, hiv, masked)
        cap_mask(sb, k0 + kh, lov, hiv, masked)
        mn[lanes_all] = T.max(
            mv[lanes_all], tree(row_vectors(sa, kh, ml) + row_vectors(sb, kh, ml), T.max)
        )
        av[lanes_all] = vector_exp(mv[lanes_all] - mn[lanes_all], ml)  # rescales what came before
        mv[lanes_all] = mn[lanes_all]
        weights(sa, k0, mn, lov, hiv, masked)
        weights(sb, k0 + kh, mn, lov, hiv, masked)
        dn[lanes_all] = dn[lanes_all] * av[lanes_all] + tree(
            row_vectors(sa, kh, ml) + row_vectors(sb, kh, ml), lambda a, b: a + b
        )
        for c in range(dv):  # O^T[c, lanes] = O^T[c, lanes] * alpha + sum_j v[j, c] * p[j, lanes]
            oT[c, lanes_all] = scaled_rows(
                oT[c, lanes_all] * av[lanes_all],
                row_vectors(sa, kh, ml) + row_vectors(sb, kh, ml),
                vbuf,
                c,
                ml,
            )

    @T.macro
    def tile(
        q,
        k_cache,
        v_cache,
        tables,
        seq_lens,
        cu,
        snk,
        out,
        t,
        n_r,
        s,
        h,
        qT,
        kbuf,
        vbuf,
        sa,
        sb,
        oT,
        mv,
        dn,
        av,
        mn,
        lov,
        hiv,
    ):
        # Rows t .. t + n_r - 1 of sequence s (n_r <= rows) x the G heads of KV head h: lane
        # r * G + g of every vector is row t + r, head g; lanes past n_r * G are idle.
        q_start: T.let = T.Cast("int64", cu[s])
        ctx: T.let = T.Cast("int64", seq_lens[s])
        qpos0: T.let = ctx - (T.Cast("int64", cu[s + 1]) - q_start) + (t - q_start)
        qposl: T.let = qpos0 + n_r - 1
        lo_t: T.let = lo_of(qpos0)  # keys [lo_t, hi_t): read by some row of the tile
        hi_t: T.let = hi_of(qposl, ctx)
        lo_in: T.let = lo_of(qposl)  # keys [lo_in, hi_in): read by every row of the tile
        hi_in: T.let = hi_of(qpos0, ctx)
        for lane in range(ml):
            if T.Cast("int64", lane) < n_r * g_heads:
                lov[lane] = T.Cast("int32", lo_of(qpos0 + T.Cast("int64", lane // g_heads)))
                hiv[lane] = T.Cast("int32", hi_of(qpos0 + T.Cast("int64", lane // g_heads), ctx))
                for c in range(d):
                    qT[c, lane] = T.Cast(
                        "float32",
                        q[t + T.Cast("int64", lane // g_heads), h * g_heads + lane % g_heads, c],
                    ) * T.float32(scale)
            else:
                lov[lane] = 0
                hiv[lane] = 0
                for c in range(d):
                    qT[c, lane] = T.float32(0)
            if has_sinks:  # a sink is one more logit, without a value
                mv[lane] = T.Cast("float32", T.Cast(dtype, snk[h * g_heads + lane % g_heads]))
                dn[lane] = T.float32(1)
            else:
                mv[lane] = neg
                dn[lane] = T.float32(0)
        for c in range(dv):
            oT[c, lanes_all] = T.Broadcast(T.float32(0), ml)
        for b in range(lo_t // bs, (hi_t + bs - 1) // bs):
            blk: T.let = T.Cast("int64", tables[s, b])
            for u in range(bs // kb):
                k0: T.let = b * bs + u * kb
                if k0 < hi_t and k0 + kb > lo_t:
                    if k0 >= lo_in and k0 + kb <= hi_in:  # every key in every row's range
                        step(
                            k_cache,
                            v_cache,
                            blk,
                            u * kb,
                            h,
                            k0,
                            lo_t,
                            hi_t,
                            qT,
                            kbuf,
                            vbuf,
                            sa,
                            sb,
                            oT,
                            mv,
                            dn,
                            av,
                            mn,
                            lov,
                            hiv,
                            False,
                        )
                    else:
                        step(
                            k_cache,
                            v_cache,
                            blk,
                            u * kb,
                            h,
                            k0,
                            lo_t,
                            hi_t,
                            qT,
                            kbuf,
                            vbuf,
                            sa,
                            sb,
                            oT,
                            mv,
                            dn,
                            av,
                            mn,
                            lov,
                            hiv,
                            True,
                        )
        for lane in range(ml):
            if T.Cast("int64", lane) < n_r * g_heads:
                mn[lane] = T.if_then_else(
                    dn[lane] > T.float32(0), T.float32(1) / dn[lane], T.float32(0)
                )
                for c in range(dv):
                    out[t + T.Cast("int64", lane // g_heads), h * g_heads + lane % g_heads, c] = (
                        T.Cast(dtype, oT[c, lane] * mn[lane])
                    )

    return tile
