"""Paged attention of the cpu target: one TensorIR function per specialization, for flattened
batches of prefill chunks and decodes (the semantics of `kiln.ir.ops.attention.paged_attention`).

Layouts (T tokens, S sequences, NB cache blocks of BS tokens, MB blocks per table row):

    q [T, Hq, D]   k_cache [NB, BS, Hkv, D]   v_cache [NB, BS, Hkv, Dv]
    block_tables int32 [S, MB]   seq_lens int32 [S]   cu_seqlens int32 [S+1]   sinks [Hq]
    out [T, Hq, Dv]

Work: one parallel loop over T * Hkv items (token row, KV head), rows in zig-zag order (0, T-1,
1, T-2, ...) so the static chunks of the parallel loop share a causal prefill's triangle evenly.
An item finds its sequence by binary search over cu_seqlens (rows outside cu_seqlens[0]:
cu_seqlens[S] are padding, written 0). Each runs an online softmax for the G = Hq / Hkv query
heads of its KV head over its keys [lo, hi), KB keys at a time (KB = the largest power of two
<= 16 dividing BS):

    qpos = seq_lens[s] - q_len + row        hi = qpos + 1 (causal) or seq_lens[s]
    lo = max(qpos - W + 1, 0) (window W) or 0

    blocks b = lo // BS .. (hi - 1) // BS of the table row, KB slots of block blk at a time:
        sc[g, i] = q[g] . K[blk, i] * scale  (-inf-like where key i is outside [lo, hi))
        m' = max(m, max_i sc)   p = e^(sc - m')   acc = acc * e^(m - m') + sum_i p[g, i] V[blk, i]

in one of two ways:

- Tiles (prefill, CPUs with AVX-512): a sequence of at least TILE_MIN query rows (enough to
  fill half a tile's lanes, 2 at least) is cut into tiles of R = L / G rows from its first row
  (L = 16 lanes, or G rounded up to a power of two when larger); the item of a tile's first
  row computes the whole tile, the items of its other rows do nothing.
  Lane r * G + g of every L-wide vector is row r, head g (lanes past the tile's rows idle):

      qT [D, L] = (q * scale)^T           kbuf [KB, D], vbuf [KB, Dv]: the step's K, V rows
      S^T[j, :] = sum_c kbuf[j, c] * qT[c, :]      (one FMA per key and c; S^T in registers)
      m, den, alpha: L-wide vectors        O^T[c, :] = O^T[c, :] * alpha + sum_j vbuf[j, c] P^T[j, :]

  The tile reads keys [lo of its first row, hi of its last row); a step where some key is out
  of some row's range masks scores per lane (lo, hi as lane vectors) and writes 0 for the V rows
  outside the tile's range. A tile's last rows, when fewer than TILE_MIN, go row by row.
  (AVX2's 16 vector registers cannot hold a tile's scores: there, tiles measured slower.)
- Rows (decodes, short chunks, everything without AVX-512): per row, the G heads' dot
  products over D in VL-wide vectors (lane-wise FMAs, then a shuffle tree across lanes), the
  softmax of KB scores one vector,
  KB weighted V rows per VL slice of Dv; the G heads unrolled, so each V slice loads once.

Blocks before a row's window are never touched: every row's lo is at or after its sequence's
first query's window start, whose block is the first the reference reads (earlier ones may be
freed, and hold NaN). Inside a touched block, slots outside [lo, hi) may be loaded but never
reach the result: their scores and V rows are replaced by selects, not multiplied by 0.

Schedule: whole expressions (and stack buffers under 1 KiB, which LLVM promotes to registers;
larger ones are TVM workspace memory) keep accumulators in registers; scalars are T.let
bindings (an assigned name is a mutable buffer in TVMScript). e^x is a vector polynomial.
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


def kernel_name(
    dtype: str, hq: int, hkv: int, d: int, dv: int, bs: int, attrs: Mapping[str, Any], sinks: bool
) -> str:
    """The unique name of one specialization: dtype, query/KV heads, head sizes (d192v128 when
    they differ), block size, causal, window, softcap, sinks, and the scale when it is not
    1/sqrt(D), e.g. paged_attention_f32_h8k2_d64_bs16_c1_w0_s0_k0."""
    dims = f"d{d}" if d == dv else f"d{d}v{dv}"
    scale = float(attrs["scale"])
    tail = "" if abs(scale - d**-0.5) <= 1e-12 * scale else f"_q{_num(scale)}"
    return (
        f"paged_attention_{SHORT[dtype]}_h{hq}k{hkv}_{dims}_bs{bs}_c{int(bool(attrs['causal']))}"
        f"_w{int(attrs.get('sliding_window') or 0)}_s{_num(float(attrs.get('softcap') or 0.0))}"
        f"_k{int(sinks)}{tail}"
    )


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
            f"float32{suffix}",
            bits << (sixteen if lanes == 1 else tvm.tirx.Broadcast(sixteen, lanes)),
        )
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
            v, owners = _fold(
                tvm.tirx.Shuffle([a, b], [tvm.tirx.const(j, "int32") for j in range(2 * lanes)]),
                oa + ob,
                bind,
            )
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
        hi_idx += pos[len(pos) // 2 :]
        out += [key] * (len(pos) // 2)
    lo, hi = (
        tvm.tirx.Shuffle([v], [tvm.tirx.const(j, "int32") for j in idx]) for idx in (lo_idx, hi_idx)
    )
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
    zero = (
        tvm.tirx.const(0.0, "float32")
        if lanes == 1
        else tvm.tirx.Broadcast(tvm.tirx.const(0.0, "float32"), lanes)
    )
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


def _bcast(x: tvm.tirx.PrimExpr, lanes: int) -> tvm.tirx.PrimExpr:
    """x broadcast to lanes (x itself when lanes is 1)."""
    return x if lanes == 1 else tvm.tirx.Broadcast(x, lanes)


def _scaled_rows(acc, rows: list, buf: tvm.tirx.Buffer, c, lanes: int) -> tvm.tirx.PrimExpr:
    """acc + sum_i buf[i, c] * rows[i] (rows: float32 vectors of lanes lanes; buf: float32) in
    four independent FMA chains."""
    chains: list = [None] * min(4, len(rows))
    for i, row in enumerate(rows):
        term = _bcast(tvm.tirx.BufferLoad(buf, [tvm.tirx.const(i, "int32"), c]), lanes) * row
        j = i % len(chains)
        chains[j] = term if chains[j] is None else chains[j] + term
    while len(chains) > 1:
        chains = [a + b for a, b in zip(chains[::2], chains[1::2], strict=True)]
    return acc + chains[0]


def _rows(buf: tvm.tirx.Buffer, n: int, lanes: int) -> list:
    """buf[i, 0:lanes] for i < n, as float32 vectors."""
    return [
        tvm.tirx.BufferLoad(buf, [tvm.tirx.const(i, "int32"), tvm.tirx.Ramp(0, 1, lanes)])
        for i in range(n)
    ]


def _tree(values: list, op) -> tvm.tirx.PrimExpr:
    """values combined pairwise by op, as a balanced tree."""
    while len(values) > 1:
        values = [op(a, b) for a, b in zip(values[::2], values[1::2], strict=True)] + (
            [values[-1]] if len(values) % 2 else []
        )
    return values[0]


def _key_mask(k, lo, hi, lanes: int) -> tvm.tirx.PrimExpr:
    """The tile lanes whose row may see key k: lo <= k < hi (lo, hi: int32 vectors)."""
    kv = tvm.tirx.Broadcast(tvm.tirx.Cast("int32", k), lanes)
    return tvm.tirx.all(kv >= lo, kv < hi)


def _host_tile_lanes() -> int:
    """The tile width for this machine: 16 float32 lanes with AVX-512 (32 vector registers), else
    0, no tiles: with AVX2's 16 registers, tiles of 8 lanes measured slower than rows."""
    from tvm.target import codegen

    target = tvm.target.Target({"kind": "llvm", "mcpu": codegen.llvm_get_system_cpu()})
    features = {str(f) for f in codegen.llvm_get_cpu_features(target)}
    return 16 if "avx512f" in features else 0


def make_prim_func(
    dtype: str,
    hq: int,
    hkv: int,
    d: int,
    dv: int,
    bs: int,
    *,
    scale: float,
    causal: bool,
    window: int,
    softcap: float,
    sinks: bool,
    sinks_dtype: str | None = None,
    tile_min: int | None = None,
    tile_lanes: int | None = None,
) -> tvm.tirx.PrimFunc:
    """The destination-passing PrimFunc (q, k_cache, v_cache, block_tables, seq_lens, cu_seqlens,
    [sinks,] out) of one specialization; symbolic in T, S, NB and MB (int64). Sinks may have
    their own dtype (sinks_dtype, default dtype); like the reference, they are rounded to dtype.
    tile_min: the fewest rows of one sequence that take the tiled path (default: enough rows to
    fill half the tile's lanes). tile_lanes: the lanes of a tile's vectors, 0 for no tiles
    (default: by the machine that builds, which is the one the cpu target compiles for)."""
    sinks_dtype = sinks_dtype or dtype
    g_heads = hq // hkv
    vl, vlv = _lanes(d), _lanes(dv)
    kb = max(k for k in (1, 2, 4, 8, 16) if bs % k == 0)  # keys per online-softmax step
    tile_lanes = _host_tile_lanes() if tile_lanes is None else tile_lanes
    tiled = tile_lanes > 0
    ml = max(tile_lanes, 1 << (g_heads - 1).bit_length())  # lanes of a tile: rows x G, padded
    rows = ml // g_heads  # query rows per tile
    kh = kb // 2  # keys per score buffer: two of them, each under 1 KiB (on the stack)
    if tile_min is None:
        tile_min = max(2, -(-ml // (2 * g_heads)))
    neg = T.min_value("float32")
    lanes_all = T.Ramp(0, 1, ml)

    def cap(x):
        return T.tanh(x / T.float32(softcap)) * T.float32(softcap) if softcap > 0 else x

    def lo_of(qp):
        return T.max(qp - window + 1, T.int64(0)) if window > 0 else T.int64(0)

    def hi_of(qp, ctx):
        return T.min(qp + 1, ctx) if causal else ctx

    has_sinks = bool(sinks)

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
                            _in_range(k0, lo, hi, kb),
                            cap(_dots(qf, g, k_cache, [blk, u * kb, h], d, vl, kb)),
                            T.Broadcast(neg, kb),
                        )
                        red[0] = T.max(m[g], _lanes_reduce(sc[g, T.Ramp(0, 1, kb)], kb, T.max))
                        alpha[g] = T.exp(m[g] - red[0])  # rescales what came before
                        m[g] = red[0]
                        sc[g, T.Ramp(0, 1, kb)] = _exp(  # ~0 where masked
                            sc[g, T.Ramp(0, 1, kb)] - T.Broadcast(red[0], kb), kb
                        )
                        den[g] = den[g] * alpha[g] + _lanes_reduce(sc[g, T.Ramp(0, 1, kb)], kb)
                    # The G heads unrolled, so each V row slice is loaded once for all.
                    if k0 >= lo and k0 + kb <= hi:  # every key in range
                        for c0 in range(dv // vlv):
                            for g in T.unroll(g_heads):
                                acc[g, T.Ramp(c0 * vlv, 1, vlv)] = _weighted_rows(
                                    acc[g, T.Ramp(c0 * vlv, 1, vlv)] * alpha[g],
                                    [sc[g, i] for i in range(kb)],
                                    v_cache,
                                    [blk, u * kb, h, c0 * vlv],
                                    vlv,
                                )
                    else:
                        for c0 in range(dv // vlv):
                            for g in T.unroll(g_heads):
                                acc[g, T.Ramp(c0 * vlv, 1, vlv)] = _weighted_rows(
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
                    _key_mask(k + j, lov[lanes_all], hiv[lanes_all], ml),
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
                    _key_mask(k + j, lov[lanes_all], hiv[lanes_all], ml),
                    _exp(sx[j, lanes_all] - mn[lanes_all], ml),
                    T.Broadcast(T.float32(0), ml),
                )
            else:
                sx[j, lanes_all] = _exp(sx[j, lanes_all] - mn[lanes_all], ml)

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
                kbuf[j, T.Ramp(c0 * vl, 1, vl)] = _vec(k_cache, [blk, slot + j, h], c0 * vl, vl)
            if masked:
                if k0 + j >= lo_t and k0 + j < hi_t:
                    for c0 in T.unroll(dv // vlv):
                        vbuf[j, T.Ramp(c0 * vlv, 1, vlv)] = _vec(
                            v_cache, [blk, slot + j, h], c0 * vlv, vlv
                        )
                else:
                    for c0 in T.unroll(dv // vlv):
                        vbuf[j, T.Ramp(c0 * vlv, 1, vlv)] = T.Broadcast(T.float32(0), vlv)
            else:
                for c0 in T.unroll(dv // vlv):
                    vbuf[j, T.Ramp(c0 * vlv, 1, vlv)] = _vec(
                        v_cache, [blk, slot + j, h], c0 * vlv, vlv
                    )
        qk(kbuf, qT, sa, 0)
        qk(kbuf, qT, sb, kh)
        cap_mask(sa, k0, lov, hiv, masked)
        cap_mask(sb, k0 + kh, lov, hiv, masked)
        mn[lanes_all] = T.max(mv[lanes_all], _tree(_rows(sa, kh, ml) + _rows(sb, kh, ml), T.max))
        av[lanes_all] = _exp(mv[lanes_all] - mn[lanes_all], ml)  # rescales what came before
        mv[lanes_all] = mn[lanes_all]
        weights(sa, k0, mn, lov, hiv, masked)
        weights(sb, k0 + kh, mn, lov, hiv, masked)
        dn[lanes_all] = dn[lanes_all] * av[lanes_all] + _tree(
            _rows(sa, kh, ml) + _rows(sb, kh, ml), lambda a, b: a + b
        )
        for c in range(dv):  # O^T[c, lanes] = O^T[c, lanes] * alpha + sum_j v[j, c] * p[j, lanes]
            oT[c, lanes_all] = _scaled_rows(
                oT[c, lanes_all] * av[lanes_all], _rows(sa, kh, ml) + _rows(sb, kh, ml), vbuf, c, ml
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

    @T.macro
    def body(q, k_cache, v_cache, tables, seq_lens, cu, snk, out, n_tok, n_seq):
        for p in T.parallel(n_tok * hkv):
            h: T.let = p % hkv
            r: T.let = p // hkv
            t: T.let = T.if_then_else(r % 2 == 0, r // 2, n_tok - 1 - r // 2)
            bnd = T.alloc_buffer((2,), "int64", scope="global")
            bnd[0] = T.int64(0)
            bnd[1] = n_seq
            if t >= T.Cast("int64", cu[0]) and t < T.Cast("int64", cu[n_seq]):
                # s: the last sequence whose first row is <= t (empty ones before it share it).
                while bnd[0] < bnd[1]:
                    mid: T.let = (bnd[0] + bnd[1]) // 2
                    if T.Cast("int64", cu[mid]) <= t:
                        bnd[0] = mid + 1
                    else:
                        bnd[1] = mid
            else:
                bnd[0] = T.int64(0)
            s: T.let = bnd[0] - 1
            if s < 0:  # a padding row
                for g, c in T.grid(g_heads, dv):
                    out[t, h * g_heads + g, c] = T.Cast(dtype, T.float32(0))
            else:
                # Stack buffers (under 1 KiB each) where LLVM may keep them in registers.
                qf = T.alloc_buffer((g_heads, d), "float32", scope="global")  # row path: q * scale
                sc = T.alloc_buffer((g_heads, kb), "float32", scope="global")  # scores, weights
                acc = T.alloc_buffer((g_heads, dv), "float32", scope="global")
                m = T.alloc_buffer((g_heads,), "float32", scope="global")
                den = T.alloc_buffer((g_heads,), "float32", scope="global")
                red = T.alloc_buffer((2,), "float32", scope="global")
                alpha = T.alloc_buffer((g_heads,), "float32", scope="global")
                q_len: T.let = T.Cast("int64", cu[s + 1]) - T.Cast("int64", cu[s])
                rel: T.let = t - T.Cast("int64", cu[s])
                if not tiled or q_len < tile_min:  # static: no tile code without tiles
                    row(
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
                    )
                elif rel % rows == 0:  # row t leads the tile of rows t .. t + rows - 1
                    n_r: T.let = T.min(q_len - rel, T.int64(rows))
                    if n_r >= tile_min:
                        qT = T.alloc_buffer((d, ml), "float32", scope="global")  # q^T * scale
                        kbuf = T.alloc_buffer((kb, d), "float32", scope="global")
                        vbuf = T.alloc_buffer((kb, dv), "float32", scope="global")
                        sa = T.alloc_buffer((kh, ml), "float32", scope="global")  # scores, weights
                        sb = T.alloc_buffer((kh, ml), "float32", scope="global")  # of kb keys
                        oT = T.alloc_buffer((dv, ml), "float32", scope="global")  # out^T
                        mv = T.alloc_buffer((ml,), "float32", scope="global")
                        dn = T.alloc_buffer((ml,), "float32", scope="global")
                        av = T.alloc_buffer((ml,), "float32", scope="global")
                        mn = T.alloc_buffer((ml,), "float32", scope="global")
                        lov = T.alloc_buffer((ml,), "int32", scope="global")
                        hiv = T.alloc_buffer((ml,), "int32", scope="global")
                        tile(
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
                        )
                    else:
                        for i in range(n_r):
                            row(
                                q,
                                k_cache,
                                v_cache,
                                tables,
                                seq_lens,
                                cu,
                                snk,
                                out,
                                t + i,
                                s,
                                h,
                                qf,
                                sc,
                                acc,
                                m,
                                den,
                                red,
                                alpha,
                            )

    @T.prim_func(private=True)
    def func(
        q_h: T.handle,
        k_h: T.handle,
        v_h: T.handle,
        bt_h: T.handle,
        sl_h: T.handle,
        cu_h: T.handle,
        sk_h: T.handle,
        o_h: T.handle,
    ):
        T.func_attr({"tir.noalias": True})
        # Dims and strides all int64: the stride binder compares a stride with the product of
        # the dims inside it, and a mismatch of int32 and int64 fails the build.
        n_tok, n_seq, n_blk, n_tab = T.int64(), T.int64(), T.int64(), T.int64()
        sq0, sq1, so0, so1, sb0 = T.int64(), T.int64(), T.int64(), T.int64(), T.int64()
        sk0, sk1, sk2, sv0, sv1, sv2 = (
            T.int64(),
            T.int64(),
            T.int64(),
            T.int64(),
            T.int64(),
            T.int64(),
        )
        q = T.match_buffer(
            q_h,
            (n_tok, T.int64(hq), T.int64(d)),
            dtype,
            strides=(sq0, sq1, T.int64(1)),
            offset_factor=1,
        )
        k_cache = T.match_buffer(
            k_h,
            (n_blk, T.int64(bs), T.int64(hkv), T.int64(d)),
            dtype,
            strides=(sk0, sk1, sk2, T.int64(1)),
            offset_factor=1,
        )
        v_cache = T.match_buffer(
            v_h,
            (n_blk, T.int64(bs), T.int64(hkv), T.int64(dv)),
            dtype,
            strides=(sv0, sv1, sv2, T.int64(1)),
            offset_factor=1,
        )
        tables = T.match_buffer(
            bt_h, (n_seq, n_tab), "int32", strides=(sb0, T.int64(1)), offset_factor=1
        )
        seq_lens = T.match_buffer(sl_h, (n_seq,), "int32", offset_factor=1)
        cu = T.match_buffer(cu_h, (n_seq + 1,), "int32", offset_factor=1)
        snk = T.match_buffer(sk_h, (T.int64(hq),), sinks_dtype, offset_factor=1)
        out = T.match_buffer(
            o_h,
            (n_tok, T.int64(hq), T.int64(dv)),
            dtype,
            strides=(so0, so1, T.int64(1)),
            offset_factor=1,
        )
        body(q, k_cache, v_cache, tables, seq_lens, cu, snk, out, n_tok, n_seq)

    # One body for both signatures: without sinks the sinks param (never read) is dropped.
    keep = (0, 1, 2, 3, 4, 5, 6, 7) if has_sinks else (0, 1, 2, 3, 4, 5, 7)
    return keep_params(func, keep)


def build(
    input_types: Sequence[TensorType], attrs: Mapping[str, Any]
) -> tuple[str, tvm.tirx.PrimFunc] | None:
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
        q.dtype,
        hq,
        hkv,
        d,
        dv,
        bs,
        scale=float(attrs["scale"]),
        causal=bool(attrs["causal"]),
        window=int(attrs.get("sliding_window") or 0),
        softcap=float(attrs.get("softcap") or 0.0),
        sinks=sinks,
        sinks_dtype=sinks_dtype,
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
