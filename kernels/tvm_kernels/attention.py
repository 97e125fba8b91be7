"""Paged attention of the cpu target: one TensorIR function per specialization, for flattened
batches of prefill chunks and decodes (the semantics of `kiln.ir.ops.attention.paged_attention`).

Layouts (T tokens, S sequences, NB cache blocks of BS tokens, MB blocks per table row):

    q [T, Hq, D]   k_cache [NB, BS, Hkv, D]   v_cache [NB, BS, Hkv, Dv]
    block_tables int32 [S, MB]   seq_lens int32 [S]   cu_seqlens int32 [S+1]   sinks [Hq]
    out [T, Hq, Dv]

Work: one parallel loop over T * Hkv items (token row, KV head). An item finds its sequence by
binary search over cu_seqlens (rows outside cu_seqlens[0]:cu_seqlens[S] are padding, written
0), then runs an online softmax for the G = Hq / Hkv query heads of its KV head over its keys
[lo, hi), KB keys at a time (KB = the largest power of two <= 16 dividing BS):

    qpos = seq_lens[s] - q_len + row        hi = qpos + 1 (causal) or seq_lens[s]
    lo = max(qpos - W + 1, 0) (window W) or 0

    blocks b = lo // BS .. (hi - 1) // BS of the table row, KB slots of block blk at a time:
        sc[g, i] = q[g] . K[blk, i] * scale  (-inf-like where key i is outside [lo, hi))
        m' = max(m, max_i sc)   p = e^(sc - m')   acc = acc * e^(m - m') + sum_i p[g, i] V[blk, i]

Blocks before a row's window are never touched: every row's lo is at or after its sequence's
first query's window start, whose block is the first the reference reads (earlier ones may be
freed, and hold NaN). Inside a touched block, slots outside [lo, hi) may be loaded but never
reach the result: their scores and V rows are replaced by selects, not multiplied by 0.

Schedule: the dot products and the P @ V updates are built as whole expressions (lane-wise
FMAs over D in VL-wide vectors, then a shuffle tree across lanes; KB weighted V rows per VL
slice of Dv), so their accumulators stay in registers; the softmax of KB scores is one vector
(tree max, a polynomial e^x, tree sum). Rows are visited in zig-zag order (0, T-1, 1, T-2, ...)
so the static chunks of the parallel loop share a causal prefill's triangle evenly.
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
    """The vector width of the loops over a head of d elements."""
    for lanes in (16, 8, 4, 2):
        if d % lanes == 0:
            return lanes
    return 1


# Expression builders: a whole dot product or weighted row sum as one expression, so that its
# vector accumulators stay in registers (through local buffers LLVM keeps them in memory).


def _vec(buf: tvm.tirx.Buffer, index: list, start, lanes: int) -> tvm.tirx.PrimExpr:
    """buf[*index, start : start + lanes] as a float32 vector (a scalar when lanes is 1)."""
    last = tvm.tirx.Ramp(start, 1, lanes) if lanes > 1 else start
    x = tvm.tirx.BufferLoad(buf, [*index, last])
    if str(buf.dtype) == "float32":
        return x
    suffix = "" if lanes == 1 else f"x{lanes}"
    if str(buf.dtype) == "bfloat16":  # by its bits: TVM's vector bfloat16 cast is wrong here
        bits = tvm.tirx.Cast(f"uint32{suffix}", tvm.tirx.reinterpret(f"uint16{suffix}", x))
        sixteen = tvm.tirx.const(16, "uint32")
        return tvm.tirx.reinterpret(
            f"float32{suffix}", bits << (sixteen if lanes == 1 else tvm.tirx.Broadcast(sixteen, lanes)))
    return tvm.tirx.Cast(f"float32{suffix}", x)


def _dots(q, g, k_cache, index, d: int, lanes: int, keys: int) -> tvm.tirx.PrimExpr:
    """[q[g] . k_cache[blk, slot + i, h] for i < keys] as one float32 vector, from lane-wise
    FMA accumulators (one per key) reduced together: each round pairs two vectors and adds the
    two halves of every key's partial sums, so keys share the shuffles (a transpose-reduce)."""
    blk, slot, h = index
    lets: list[tuple[tvm.tirx.Var, tvm.tirx.PrimExpr]] = []

    def bind(value, n):
        var = tvm.tirx.Var("v", f"float32x{n}" if n > 1 else "float32")
        lets.append((var, value))
        return var

    # (vector, owner key of each lane)
    vecs = []
    for i in range(keys):
        acc = None
        for c0 in range(0, d, lanes):
            term = _vec(q, [g], c0, lanes) * _vec(k_cache, [blk, slot + i, h], c0, lanes)
            acc = term if acc is None else acc + term
        vecs.append((bind(acc, lanes), [i] * lanes))
    while len(vecs) > 1 and len(vecs[0][1]) // len(set(vecs[0][1])) > 1:
        nxt = []
        for (a, oa), (b, ob) in zip(vecs[::2], vecs[1::2], strict=True):
            v, owners = _fold(tvm.tirx.Shuffle([a, b], [tvm.tirx.const(j, "int32") for j in range(2 * lanes)]), oa + ob, bind)
            nxt.append((v, owners))
        vecs = nxt
    # One key per lane now, or one vector left: add each key's remaining partials, concatenate.
    parts, owners = [], []
    for v, own in vecs:
        while len(own) > len(set(own)):
            v, own = _fold(v, own, bind)
        parts.append(v)
        owners += own
    flat = tvm.tirx.Shuffle(parts, [tvm.tirx.const(owners.index(i), "int32") for i in range(keys)])
    for var, value in reversed(lets):
        flat = tvm.tirx.Let(var, value, flat)
    return flat


def _fold(v, owners: list[int], bind):
    """Add the first half of each key's lanes of v to its second half: (vector, owners)."""
    lo_idx, hi_idx, out = [], [], []
    for key in dict.fromkeys(owners):
        pos = [j for j, o in enumerate(owners) if o == key]
        lo_idx += pos[: len(pos) // 2]
        hi_idx += pos[len(pos) // 2:]
        out += [key] * (len(pos) // 2)
    lo, hi = (tvm.tirx.Shuffle([v], [tvm.tirx.const(j, "int32") for j in idx]) for idx in (lo_idx, hi_idx))
    return bind(lo + hi, len(out)), out


def _in_range(k0, lo, hi, keys: int) -> tvm.tirx.PrimExpr:
    """The lanes i < keys with lo <= k0 + i < hi."""
    pos = tvm.tirx.Ramp(k0, tvm.tirx.const(1, "int64"), keys)
    return tvm.tirx.all(pos >= tvm.tirx.Broadcast(lo, keys), pos < tvm.tirx.Broadcast(hi, keys))


def _lanes_reduce(v: tvm.tirx.PrimExpr, lanes: int, op=None) -> tvm.tirx.PrimExpr:
    """The lanes of a vector combined by op (default +) as a tree: halves until one is left."""
    if lanes == 1:
        return v
    var = tvm.tirx.Var("half", f"float32x{lanes}")
    half = lanes // 2
    lo = tvm.tirx.Shuffle([var], [tvm.tirx.const(j, "int32") for j in range(half)])
    hi = tvm.tirx.Shuffle([var], [tvm.tirx.const(j, "int32") for j in range(half, lanes)])
    both = lo + hi if op is None else op(lo, hi)
    return tvm.tirx.Let(var, v, both if half == 1 else _lanes_reduce(both, half, op))


def _exp(x: tvm.tirx.PrimExpr, lanes: int) -> tvm.tirx.PrimExpr:
    """e^x for x <= 0, vectorized (LLVM calls expf per lane): x = n ln2 + r, |r| <= ln2 / 2,
    e^r by Cephes' expf polynomial (float32-exact to ~1 ulp), 2^n by the exponent bits; x below
    -87 gives ~6e-39."""
    def vec(value, dtype="float32"):
        c = tvm.tirx.const(value, dtype)
        return c if lanes == 1 else tvm.tirx.Broadcast(c, lanes)

    suffix = "" if lanes == 1 else f"x{lanes}"
    xv = tvm.tirx.Var("x", f"float32{suffix}")
    nv = tvm.tirx.Var("n", f"float32{suffix}")
    rv = tvm.tirx.Var("r", f"float32{suffix}")
    poly = vec(1.9875691500e-4)
    for c in (1.3981999507e-3, 8.3334519073e-3, 4.1665795894e-2, 1.6666665459e-1, 5.0000001201e-1):
        poly = poly * rv + vec(c)
    er = poly * rv * rv + rv + vec(1.0)
    bits = (tvm.tirx.Cast(f"int32{suffix}", nv) + vec(127, "int32")) << vec(23, "int32")
    two_n = tvm.tirx.reinterpret(f"float32{suffix}", bits)
    r = xv - nv * vec(0.693359375) + nv * vec(2.12194440e-4)
    n = tvm.tirx.floor(xv * vec(1.44269504088896341) + vec(0.5))
    body = tvm.tirx.Let(nv, n, tvm.tirx.Let(rv, r, er * two_n))
    return tvm.tirx.Let(xv, tvm.tirx.max(x, vec(-87.0)), body)


def _weighted_rows(acc, weights, buf, index, lanes: int, lo=None, hi=None) -> tvm.tirx.PrimExpr:
    """acc + sum_i weights[i] * buf[index[0], index[1] + i, index[2], index[3] : +lanes] in four
    independent FMA chains; with lo and hi, rows i outside [lo, hi) are replaced by 0 (a stale
    slot may hold NaN, and NaN * 0 is NaN)."""
    blk, slot, h, c = index
    zero = tvm.tirx.const(0.0, "float32") if lanes == 1 else tvm.tirx.Broadcast(
        tvm.tirx.const(0.0, "float32"), lanes)
    chains: list = [None] * min(4, len(weights))
    for i, w in enumerate(weights):
        row = _vec(buf, [blk, slot + i, h], c, lanes)
        if lo is not None:
            row = tvm.tirx.Select(tvm.tirx.all(lo <= i, hi > i), row, zero)
        term = (w if lanes == 1 else tvm.tirx.Broadcast(w, lanes)) * row
        j = i % len(chains)
        chains[j] = term if chains[j] is None else chains[j] + term
    while len(chains) > 1:
        chains = [a + b for a, b in zip(chains[::2], chains[1::2], strict=True)]
    return acc + chains[0]


def make_prim_func(dtype: str, hq: int, hkv: int, d: int, dv: int, bs: int, *, scale: float,
                   causal: bool, window: int, softcap: float, sinks: bool,
                   sinks_dtype: str | None = None) -> tvm.tirx.PrimFunc:
    """The destination-passing PrimFunc (q, k_cache, v_cache, block_tables, seq_lens, cu_seqlens,
    [sinks,] out) of one specialization; symbolic in T, S, NB and MB (int64). Sinks may have
    their own dtype (sinks_dtype, default dtype); like the reference, they are rounded to dtype."""
    sinks_dtype = sinks_dtype or dtype
    g_heads = hq // hkv
    vl, vlv = _lanes(d), _lanes(dv)
    kb = max(k for k in (1, 2, 4, 8, 16) if bs % k == 0)  # keys per online-softmax step
    neg = T.min_value("float32")

    def cap(x):
        return T.tanh(x / T.float32(softcap)) * T.float32(softcap) if softcap > 0 else x

    has_sinks, sliding = bool(sinks), window > 0

    @T.macro
    def body(q, k_cache, v_cache, tables, seq_lens, cu, snk, out, n_tok, n_seq):
        for p in T.parallel(n_tok * hkv):
            h = p % hkv
            r = p // hkv
            t = T.if_then_else(r % 2 == 0, r // 2, n_tok - 1 - r // 2)
            bnd = T.alloc_local((2,), "int64")
            qf = T.alloc_local((g_heads, d), "float32")  # q * scale
            sc = T.alloc_local((g_heads, kb), "float32")  # scores, then weights, of kb keys
            acc = T.alloc_local((g_heads, dv), "float32")
            m = T.alloc_local((g_heads,), "float32")
            den = T.alloc_local((g_heads,), "float32")
            red = T.alloc_local((2,), "float32")
            alpha = T.alloc_local((g_heads,), "float32")
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
                        m[g] = T.Cast("float32", T.Cast(dtype, snk[h * g_heads + g]))
                        den[g] = T.float32(1)
                    else:
                        m[g] = neg
                for b in range(lo // bs, (hi + bs - 1) // bs):
                    blk = T.Cast("int64", tables[s, b])
                    for u in range(bs // kb):
                        k0 = b * bs + u * kb  # keys k0 .. k0 + kb - 1: slots u * kb .. of blk
                        if k0 < hi and k0 + kb > lo:
                            for g in range(g_heads):
                                sc[g, T.Ramp(0, 1, kb)] = T.Select(
                                    _in_range(k0, lo, hi, kb),
                                    cap(_dots(qf, g, k_cache, [blk, u * kb, h], d, vl, kb)),
                                    T.Broadcast(neg, kb))
                                red[0] = T.max(m[g], _lanes_reduce(sc[g, T.Ramp(0, 1, kb)], kb, T.max))
                                alpha[g] = T.exp(m[g] - red[0])  # rescales what came before
                                m[g] = red[0]
                                sc[g, T.Ramp(0, 1, kb)] = _exp(  # ~0 where masked
                                    sc[g, T.Ramp(0, 1, kb)] - T.Broadcast(red[0], kb), kb)
                                den[g] = den[g] * alpha[g] + _lanes_reduce(sc[g, T.Ramp(0, 1, kb)], kb)
                            # The G heads unrolled, so each V row slice is loaded once for all.
                            if k0 >= lo and k0 + kb <= hi:  # every key in range
                                for c0 in range(dv // vlv):
                                    for g in T.unroll(g_heads):
                                        acc[g, T.Ramp(c0 * vlv, 1, vlv)] = _weighted_rows(
                                            acc[g, T.Ramp(c0 * vlv, 1, vlv)] * alpha[g],
                                            [sc[g, i] for i in range(kb)], v_cache,
                                            [blk, u * kb, h, c0 * vlv], vlv)
                            else:
                                for c0 in range(dv // vlv):
                                    for g in T.unroll(g_heads):
                                        acc[g, T.Ramp(c0 * vlv, 1, vlv)] = _weighted_rows(
                                            acc[g, T.Ramp(c0 * vlv, 1, vlv)] * alpha[g],
                                            [sc[g, i] for i in range(kb)], v_cache,
                                            [blk, u * kb, h, c0 * vlv], vlv, lo - k0, hi - k0)
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
        snk = T.match_buffer(sk_h, (T.int64(hq),), sinks_dtype, offset_factor=1)
        out = T.match_buffer(o_h, (n_tok, T.int64(hq), T.int64(dv)), dtype, strides=(so0, so1, T.int64(1)), offset_factor=1)
        body(q, k_cache, v_cache, tables, seq_lens, cu, snk, out, n_tok, n_seq)

    # One body for both signatures: without sinks the sinks param (never read) is dropped.
    keep = (0, 1, 2, 3, 4, 5, 6, 7) if has_sinks else (0, 1, 2, 3, 4, 5, 7)
    return keep_params(func, keep)


def build(input_types: Sequence[TensorType], attrs: Mapping[str, Any]) -> tuple[str, tvm.tirx.PrimFunc] | None:
    """(function name, PrimFunc) of `paged_attention` for these input types and attrs, or None
    when the kernel does not cover them (another dtype, heads not a multiple of KV heads, odd
    head or block sizes, or fixed-size dims that are not ints)."""
    q, k_cache, v_cache = input_types[:3]
    sinks = len(input_types) > 6
    if q.dtype not in DTYPES or k_cache.dtype != q.dtype or v_cache.dtype != q.dtype:
        return None
    sinks_dtype = input_types[6].dtype if sinks else None
    if sinks and sinks_dtype not in DTYPES:
        return None
    fixed = (*q.shape[1:], *k_cache.shape[1:], v_cache.shape[3])
    if not all(isinstance(x, int) for x in fixed):
        return None
    hq, d = q.shape[1], q.shape[2]
    bs, hkv, dk, dv = k_cache.shape[1], k_cache.shape[2], k_cache.shape[3], v_cache.shape[3]
    if dk != d or hkv < 1 or hq % hkv or tuple(v_cache.shape[1:3]) != (bs, hkv):
        return None
    if d % 2 or dv % 2 or bs % 2:  # the vector steps need two lanes at least
        return None
    name = kernel_name(q.dtype, hq, hkv, d, dv, bs, attrs, sinks)
    if sinks and sinks_dtype != q.dtype:
        name += f"_{SHORT[sinks_dtype]}"
    func = make_prim_func(
        q.dtype, hq, hkv, d, dv, bs, scale=float(attrs["scale"]), causal=bool(attrs["causal"]),
        window=int(attrs.get("sliding_window") or 0), softcap=float(attrs.get("softcap") or 0.0),
        sinks=sinks, sinks_dtype=sinks_dtype,
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
