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

Modules: attention_spec (a specialization's static parameters), attention_vectors (expression
builders), attention_rows and attention_tiles (the two paths), attention_body (the PrimFunc).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import tvm

from kiln.ir.types import SHORT, TensorType
from kiln.kernels.tvm_kernels import AS_IS, Kernel, OpInfo
from kiln.kernels.tvm_kernels.attention_body import make_func
from kiln.kernels.tvm_kernels.attention_spec import AttentionSpec, host_tile_lanes

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
    spec = AttentionSpec(
        dtype,
        hq,
        hkv,
        d,
        dv,
        bs,
        scale=scale,
        causal=causal,
        window=window,
        softcap=softcap,
        sinks=bool(sinks),
        sinks_dtype=sinks_dtype or dtype,
        tile_lanes=host_tile_lanes() if tile_lanes is None else tile_lanes,
        tile_min=tile_min,
    )
    return make_func(spec)


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
