"""The row path of the cpu paged-attention kernel (kiln.kernels.tvm_kernels.attention): one query
row's online softmax for the G heads of its KV head, KB keys per step, the scores of each head
one KB-wide vector and the weighted V rows VL-wide slices (decodes, short chunks, and every row
without AVX-512)."""

from __future__ import annotations

from tvm.script import tirx as T

from kiln.kernels.tvm_kernels.attention_spec import AttentionSpec
from kiln.kernels.tvm_kernels.attention_vectors import (
    dots,
    in_range,
    lanes_reduce,
    vector_exp,
    weighted_rows,
)


def make_row(spec: AttentionSpec):
    """The macro row(q, k_cache, v_cache, tables, seq_lens, cu, snk, out, t, s, h, qf, sc, acc,
    m, den, red, alpha) of spec: writes out[t] for the G heads of KV head h (t: a row of
    sequence s; the rest: the body's stack buffers)."""
    dtype, d, dv, bs, scale = spec.dtype, spec.d, spec.dv, spec.bs, spec.scale
    g_heads, vl, vlv, kb = spec.g_heads, spec.vl, spec.vlv, spec.kb
    cap, lo_of, hi_of = spec.cap, spec.lo_of, spec.hi_of
    has_sinks = spec.sinks
    neg = T.min_value("float32")

    @T.macro
    def row(
        q,
        k_cache,
        v_cache,
        tables,
        seq_lens,
        cu,
        snk,
        out,
        t,
        s,
        h,
        qf,
        sc,
        acc,
        m,
        den,
        red,
        alpha,
    ):
        # One query row t of sequence s: G heads of KV head h, KB keys per step.
        for g, c in T.grid(g_heads, dv):
            acc[g, c] = T.float32(0)
        q_start: T.let = T.Cast("int64", cu[s])
        ctx: T.let = T.Cast("int64", seq_lens[s])
        qpos: T.let = ctx - (T.Cast("int64", cu[s + 1]) - q_start) + (t - q_start)
        hi: T.let = hi_of(qpos, ctx)
        lo: T.let = lo_of(qpos)
        for g in range(g_heads):
            for c in T.vectorized(d):
                qf[g, c] = T.Cast("float32", q[t, h * g_heads + g, c]) * T.float32(scale)
            if has_sinks:  # a sink is one more logit, without a value
                m[g] = T.Cast("float32", T.Cast(dtype, snk[h * g_heads + g]))
                den[g] = T.float32(1)
            else:
                m[g] = neg
                den[g] = T.float32(0)
        for b in range(lo // bs, (hi + bs - 1) // bs):
            blk: T.let = T.Cast("int64", tables[s, b])
            for u in range(bs // kb):
                k0: T.let = b * bs + u * kb  # keys k0 .. k0 + kb - 1: slots u * kb .. of blk
                if k0 < hi and k0 + kb > lo:
                    for g in range(g_heads):
                        sc[g, T.Ramp(0, 1, kb)] = T.Select(
                            in_range(k0, lo, hi, kb),
                            cap(dots(qf, g, k_cache, [blk, u * kb, h], d, vl, kb)),
                            T.Broadcast(neg, kb),
                        )
                        red[0] = T.max(m[g], lanes_reduce(sc[g, T.Ramp(0, 1, kb)], kb, T.max))
                        alpha[g] = T.exp(m[g] - red[0])  # rescales what came before
                        m[g] = red[0]
                        sc[g, T.Ramp(0, 1, kb)] = vector_exp(  # ~0 where masked
                            sc[g, T.Ramp(0, 1, kb)] - T.Broadcast(red[0], kb), kb
                        )
                        den[g] = den[g] * alpha[g] + lanes_reduce(sc[g, T.Ramp(0, 1, kb)], kb)
                    # The G heads unrolled, so each V row slice is loaded once for all.
                    if k0 >= lo and k0 + kb <= hi:  # every key in range
                        for c0 in range(dv // vlv):
                            for g in T.unroll(g_heads):
                                acc[g, T.Ramp(c0 * vlv, 1, vlv)] = weighted_rows(
                                    acc[g, T.Ramp(c0 * vlv, 1, vlv)] * alpha[g],
                                    [sc[g, i] for i in range(kb)],
                                    v_cache,
                                    [blk, u * kb, h, c0 * vlv],
                                    vlv,
                                )
                    else:
                        for c0 in range(dv // vlv):
                            for g in T.unroll(g_heads):
                                acc[g, T.Ramp(c0 * vlv, 1, vlv)] = weighted_rows(
                                    acc[g, T.Ramp(c0 * vlv, 1, vlv)] * alpha[g],
                                    [sc[g, i] for i in range(kb)],
                                    v_cache,
                                    [blk, u * kb, h, c0 * vlv],
                                    vlv,
                                    lo - k0,
                                    hi - k0,
                                )
        for g in range(g_heads):
            red[0] = T.if_then_else(den[g] > T.float32(0), T.float32(1) / den[g], T.float32(0))
            for c in T.vectorized(dv):
                out[t, h * g_heads + g, c] = T.Cast(dtype, acc[g, c] * red[0])

    return row
