"""Paged attention of the cpu target: one TensorIR function per specialization, for flattened
batches of prefill chunks and decodes (the semantics of `kiln.ir.ops.attention.paged_attention`).

Layouts (T tokens, S sequences, NB cache blocks of BS tokens, MB blocks per table row):

    q [T, Hq, D]   k_cache [NB, BS, Hkv, D]   v_cache [NB, BS, Hkv, Dv]
    block_tables int32 [S, MB]   seq_lens int32 [S]   cu_seqlens int32 [S+1]   sinks [Hq]
    out [T, Hq, Dv]

Work: one parallel loop over T * Hkv items (token row, KV head). An item finds its sequence by
binary search over cu_seqlens (rows outside cu_seqlens[0]:cu_seqlens[S] are padding, written
0), then runs an online softmax for the G = Hq / Hkv query heads of its KV head over its keys
[lo, hi), a cache block at a time:

    qpos = seq_lens[s] - q_len + row        hi = qpos + 1 (causal) or seq_lens[s]
    lo = max(qpos - W + 1, 0) (window W) or 0

    block b of the table:  scores[g, i] = q[g] . K[blk, i]        i in [j0, j1): keys in [lo, hi)
                           m' = max(m, max_i scores)   acc = acc * e^(m - m') + sum_i p[g, i] V[blk, i]

Only keys in [lo, hi) are loaded, so a block that left the window (freed, maybe NaN) is never
read: every row's lo is at or after its sequence's first query's window start. Dot products
over D accumulate in VL float32 lanes (vectorized), P @ V is vectorized over Dv; the G query
rows share each K and V row load. Rows are visited in zig-zag order (0, T-1, 1, T-2, ...) so
the static chunks of the parallel loop get equal shares of a causal prefill's triangle.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import tvm
from tvm.script import tirx as T

from kiln.ir.types import SHORT, TensorType
from kiln.kernels.tvm_kernels import AS_IS, Kernel, OpInfo, keep_params

DTYPES = ("float32", "float16", "bfloat16")
"""Element types of q and the caches that the kernel takes (scores are float32 throughout)."""


def _num(x: float) -> str:
    """A float as a name part: 50.0 -> 50, 0.125 -> 0p125, -1e-05 -> m1em05."""
    text = str(int(x)) if float(x).is_integer() else repr(float(x))
    return text.replace(".", "p").replace("-", "m").replace("+", "")


def kernel_name(dtype: str, hq: int, hkv: int, d: int, dv: int, bs: int, attrs: Mapping[str, Any],
                sinks: bool) -> str:
    """The unique name of one specialization: dtype, query/KV heads, head sizes (d192v128 when
    they differ), block size, causal, window, softcap, sinks, and the scale when it is not
    1/sqrt(D), e.g. paged_attention_f32_h8k2_d64_bs16_c1_w0_s0_k0."""
    dims = f"d{d}" if d == dv else f"d{d}v{dv}"
    scale = float(attrs["scale"])
    tail = "" if abs(scale - d**-0.5) <= 1e-12 * scale else f"_q{_num(scale)}"
    return (f"paged_attention_{SHORT[dtype]}_h{hq}k{hkv}_{dims}_bs{bs}_c{int(bool(attrs['causal']))}"
            f"_w{int(attrs.get('sliding_window') or 0)}_s{_num(float(attrs.get('softcap') or 0.0))}"
            f"_k{int(sinks)}{tail}")


def _lanes(d: int) -> int:
    """The vector width of the dot products over a head of d elements."""
    for lanes in (8, 4, 2):
        if d % lanes == 0:
            return lanes
    return 1


def make_prim_func(dtype: str, hq: int, hkv: int, d: int, dv: int, bs: int, *, scale: float,
                   causal: bool, window: int, softcap: float, sinks: bool) -> tvm.tirx.PrimFunc:
    """The destination-passing PrimFunc (q, k_cache, v_cache, block_tables, seq_lens, cu_seqlens,
    [sinks,] out) of one specialization; symbolic in T, S, NB and MB (int64)."""
    g_heads = hq // hkv
    vl = _lanes(d)
    neg = T.min_value("float32")
    has_sinks, sliding, capped = bool(sinks), window > 0, softcap > 0.0

    @T.macro
    def body(q, k_cache, v_cache, tables, seq_lens, cu, snk, out, n_tok, n_seq):
        for p in T.parallel(n_tok * hkv):
            h = p % hkv
            r = p // hkv
            t = T.if_then_else(r % 2 == 0, r // 2, n_tok - 1 - r // 2)
            bnd = T.alloc_local((2,), "int64")
            qf = T.alloc_local((g_heads, d), "float32")  # q * scale
            sc = T.alloc_local((g_heads, bs), "float32")  # scores of one block
            acc = T.alloc_local((g_heads, dv), "float32")
            m = T.alloc_local((g_heads,), "float32")
            den = T.alloc_local((g_heads,), "float32")
            red = T.alloc_local((2,), "float32")
            lanes = T.alloc_local((vl,), "float32")
            bnd[0] = T.int64(0)
            bnd[1] = n_seq
            if t >= T.Cast("int64", cu[0]) and t < T.Cast("int64", cu[n_seq]):
                # s: the last sequence whose first row is <= t (empty ones before it share it).
                while bnd[0] < bnd[1]:
                    mid = (bnd[0] + bnd[1]) // 2
                    if T.Cast("int64", cu[mid]) <= t:
                        bnd[0] = mid + 1
                    else:
                        bnd[1] = mid
            else:
                bnd[0] = T.int64(0)
            s = bnd[0] - 1
            for g, c in T.grid(g_heads, dv):
                acc[g, c] = T.float32(0)
            for g in range(g_heads):
                den[g] = T.float32(0)
            if s >= 0:
                q_start = T.Cast("int64", cu[s])
                q_len = T.Cast("int64", cu[s + 1]) - q_start
                ctx = T.Cast("int64", seq_lens[s])
                qpos = ctx - q_len + (t - q_start)
                hi = T.min(qpos + 1, ctx) if causal else ctx
                lo = T.max(qpos - window + 1, T.int64(0)) if sliding else T.int64(0)
                for g in range(g_heads):
                    for c in T.vectorized(d):
                        qf[g, c] = T.Cast("float32", q[t, h * g_heads + g, c]) * T.float32(scale)
                    if has_sinks:  # a sink is one more logit, without a value
                        m[g] = T.Cast("float32", snk[h * g_heads + g])
                        den[g] = T.float32(1)
                    else:
                        m[g] = neg
                for b in range(T.max(lo, 0) // bs, T.max(hi + bs - 1, 0) // bs):
                    blk = T.Cast("int64", tables[s, b])
                    j0 = T.max(lo - b * bs, T.int64(0))
                    j1 = T.min(hi - b * bs, T.int64(bs))
                    for i in range(j0, j1):
                        for g in range(g_heads):
                            for c in T.vectorized(vl):
                                lanes[c] = T.float32(0)
                            for c0 in range(d // vl):
                                for c in T.vectorized(vl):
                                    lanes[c] = lanes[c] + qf[g, c0 * vl + c] * T.Cast(
                                        "float32", k_cache[blk, i, h, c0 * vl + c])
                            red[0] = T.float32(0)
                            for c in T.unroll(vl):
                                red[0] = red[0] + lanes[c]
                            if capped:
                                sc[g, i] = T.tanh(red[0] / T.float32(softcap)) * T.float32(softcap)
                            else:
                                sc[g, i] = red[0]
                    for g in range(g_heads):
                        red[0] = m[g]
                        for i in range(j0, j1):
                            red[0] = T.max(red[0], sc[g, i])
                        red[1] = T.exp(m[g] - red[0])  # rescales what came before
                        m[g] = red[0]
                        den[g] = den[g] * red[1]
                        for c in T.vectorized(dv):
                            acc[g, c] = acc[g, c] * red[1]
                        for i in range(j0, j1):
                            sc[g, i] = T.exp(sc[g, i] - red[0])
                            den[g] = den[g] + sc[g, i]
                    for i in range(j0, j1):
                        for g in range(g_heads):
                            for c in T.vectorized(dv):
                                acc[g, c] = acc[g, c] + sc[g, i] * T.Cast(
                                    "float32", v_cache[blk, i, h, c])
            for g in range(g_heads):
                red[0] = T.if_then_else(den[g] > T.float32(0), T.float32(1) / den[g], T.float32(0))
                for c in T.vectorized(dv):
                    out[t, h * g_heads + g, c] = T.Cast(dtype, acc[g, c] * red[0])

    @T.prim_func(private=True)
    def func(q_h: T.handle, k_h: T.handle, v_h: T.handle, bt_h: T.handle, sl_h: T.handle,
             cu_h: T.handle, sk_h: T.handle, o_h: T.handle):
        T.func_attr({"tir.noalias": True})
        # Dims and strides all int64: the stride binder compares a stride with the product of
        # the dims inside it, and a mismatch of int32 and int64 fails the build.
        n_tok, n_seq, n_blk, n_tab = T.int64(), T.int64(), T.int64(), T.int64()
        sq0, sq1, so0, so1, sb0 = T.int64(), T.int64(), T.int64(), T.int64(), T.int64()
        sk0, sk1, sk2, sv0, sv1, sv2 = T.int64(), T.int64(), T.int64(), T.int64(), T.int64(), T.int64()
        q = T.match_buffer(q_h, (n_tok, T.int64(hq), T.int64(d)), dtype, strides=(sq0, sq1, T.int64(1)), offset_factor=1)
        k_cache = T.match_buffer(k_h, (n_blk, T.int64(bs), T.int64(hkv), T.int64(d)), dtype, strides=(sk0, sk1, sk2, T.int64(1)),
                                 offset_factor=1)
        v_cache = T.match_buffer(v_h, (n_blk, T.int64(bs), T.int64(hkv), T.int64(dv)), dtype, strides=(sv0, sv1, sv2, T.int64(1)),
                                 offset_factor=1)
        tables = T.match_buffer(bt_h, (n_seq, n_tab), "int32", strides=(sb0, T.int64(1)), offset_factor=1)
        seq_lens = T.match_buffer(sl_h, (n_seq,), "int32", offset_factor=1)
        cu = T.match_buffer(cu_h, (n_seq + 1,), "int32", offset_factor=1)
        snk = T.match_buffer(sk_h, (T.int64(hq),), dtype, offset_factor=1)
        out = T.match_buffer(o_h, (n_tok, T.int64(hq), T.int64(dv)), dtype, strides=(so0, so1, T.int64(1)), offset_factor=1)
        body(q, k_cache, v_cache, tables, seq_lens, cu, snk, out, n_tok, n_seq)

    # One body for both signatures: without sinks the sinks param (never read) is dropped.
    keep = (0, 1, 2, 3, 4, 5, 6, 7) if has_sinks else (0, 1, 2, 3, 4, 5, 7)
    return keep_params(func, keep)


def build(input_types: Sequence[TensorType], attrs: Mapping[str, Any]) -> tuple[str, tvm.tirx.PrimFunc] | None:
    """(function name, PrimFunc) of `paged_attention` for these input types and attrs, or None
    when the kernel does not cover them (another dtype, heads not a multiple of KV heads, or
    fixed-size dims that are not ints)."""
    q, k_cache, v_cache = input_types[:3]
    sinks = len(input_types) > 6
    if q.dtype not in DTYPES or k_cache.dtype != q.dtype or v_cache.dtype != q.dtype:
        return None
    if sinks and input_types[6].dtype != q.dtype:
        return None
    fixed = (*q.shape[1:], *k_cache.shape[1:], v_cache.shape[3])
    if not all(isinstance(x, int) for x in fixed):
        return None
    hq, d = q.shape[1], q.shape[2]
    bs, hkv, dk, dv = k_cache.shape[1], k_cache.shape[2], k_cache.shape[3], v_cache.shape[3]
    if dk != d or hkv < 1 or hq % hkv or tuple(v_cache.shape[1:3]) != (bs, hkv):
        return None
    name = kernel_name(q.dtype, hq, hkv, d, dv, bs, attrs, sinks)
    func = make_prim_func(
        q.dtype, hq, hkv, d, dv, bs, scale=float(attrs["scale"]), causal=bool(attrs["causal"]),
        window=int(attrs.get("sliding_window") or 0), softcap=float(attrs.get("softcap") or 0.0),
        sinks=sinks,
    )
    return name, func.with_attr("global_symbol", name)


def build_kernel(info: OpInfo) -> Kernel | None:
    """The package's builder contract: the `Kernel` of a paged_attention node (every input, then
    the output, passed as they are), or None when `build` does not cover it."""
    if any(t is None for t in info.inputs):
        return None
    built = build(info.inputs, info.attrs)
    if built is None:
        return None
    name, func = built
    n = len(info.inputs)
    return Kernel(name, func, tuple(range(n)), (0,), (AS_IS,) * (n + 1))


BUILDERS = {"paged_attention": build_kernel}
"""Op name -> builder of its TVM kernel (OpInfo -> Kernel, see kiln.kernels.tvm_kernels)."""

__all__ = ["BUILDERS", "DTYPES", "build", "build_kernel", "kernel_name", "make_prim_func"]
