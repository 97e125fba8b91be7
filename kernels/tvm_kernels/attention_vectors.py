"""Expression builders of the cpu paged-attention kernel (kiln.kernels.tvm_kernels.attention):
a whole dot product or weighted row sum as one expression, so that its vector accumulators stay
in registers (through local buffers LLVM keeps them in memory)."""

from __future__ import annotations

import tvm


def load_f32(buf: tvm.tirx.Buffer, index: list, start, lanes: int) -> tvm.tirx.PrimExpr:
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


def dots(q, g, k_cache, index, d: int, lanes: int, keys: int) -> tvm.tirx.PrimExpr:
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
            term = load_f32(q, [g], c0, lanes) * load_f32(k_cache, [blk, slot + i, h], c0, lanes)
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


def in_range(k0, lo, hi, keys: int) -> tvm.tirx.PrimExpr:
    """The lanes i < keys with lo <= k0 + i < hi."""
    pos = tvm.tirx.Ramp(k0, tvm.tirx.const(1, "int64"), keys)
    return tvm.tirx.all(pos >= tvm.tirx.Broadcast(lo, keys), pos < tvm.tirx.Broadcast(hi, keys))


def lanes_reduce(v: tvm.tirx.PrimExpr, lanes: int, op=None) -> tvm.tirx.PrimExpr:
    """The lanes of a vector combined by op (default +) as a tree: halves until one is left."""
    if lanes == 1:
        return v
    var = tvm.tirx.Var("half", f"float32x{lanes}")
    half = lanes // 2
    lo = tvm.tirx.Shuffle([var], [tvm.tirx.const(j, "int32") for j in range(half)])
    hi = tvm.tirx.Shuffle([var], [tvm.tirx.const(j, "int32") for j in range(half, lanes)])
    both = lo + hi if op is None else op(lo, hi)
    return tvm.tirx.Let(var, v, both if half == 1 else lanes_reduce(both, half, op))


def vector_exp(x: tvm.tirx.PrimExpr, lanes: int) -> tvm.tirx.PrimExpr:
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


def weighted_rows(acc, weights, buf, index, lanes: int, lo=None, hi=None) -> tvm.tirx.PrimExpr:
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
        row = load_f32(buf, [blk, slot + i, h], c, lanes)
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


def scaled_rows(acc, rows: list, buf: tvm.tirx.Buffer, c, lanes: int) -> tvm.tirx.PrimExpr:
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


def row_vectors(buf: tvm.tirx.Buffer, n: int, lanes: int) -> list:
    """buf[i, 0:lanes] for i < n, as float32 vectors."""
    return [
        tvm.tirx.BufferLoad(buf, [tvm.tirx.const(i, "int32"), tvm.tirx.Ramp(0, 1, lanes)])
        for i in range(n)
    ]


def tree(values: list, op) -> tvm.tirx.PrimExpr:
    """values combined pairwise by op, as a balanced tree."""
    while len(values) > 1:
        values = [op(a, b) for a, b in zip(values[::2], values[1::2], strict=True)] + (
            [values[-1]] if len(values) % 2 else []
        )
    return values[0]


def key_mask(k, lo, hi, lanes: int) -> tvm.tirx.PrimExpr:
    """The tile lanes whose row may see key k: lo <= k < hi (lo, hi: int32 vectors)."""
    kv = tvm.tirx.Broadcast(tvm.tirx.Cast("int32", k), lanes)
    return tvm.tirx.all(kv >= lo, kv < hi)


__all__ = [
    "dots",
    "in_range",
    "key_mask",
    "lanes_reduce",
    "load_f32",
    "row_vectors",
    "scaled_rows",
    "tree",
    "vector_exp",
    "weighted_rows",
]
