"""Paged attention of the cuda target: one Triton kernel for flattened batches of prefill
chunks and decodes, and a split-KV variant for long contexts at small batch.

Layouts (T tokens, S sequences, NB cache blocks of BS tokens, MB blocks per table row):

    q [T, Hq, D] (may be a strided view)   k_cache [NB, BS, Hkv, D]   v_cache [NB, BS, Hkv, Dv]
    block_tables int32 [S, MB]   seq_lens int32 [S]   cu_seqlens int32 [S+1]   sinks [Hq]
    out [T, Hq, Dv]

Work: the query rows of each sequence are cut into tiles of BLOCK_Q tokens. Sequence s's first
tile id is cu_seqlens[s] // BLOCK_Q + s, so every id is below cdiv(T, BLOCK_Q) + S (a grid from
shapes alone); program (id, kv head) finds its sequence by binary search over cu_seqlens and
exits when the id names no tile of it, or a sequence whose query length q_len lies outside the
launch's [MIN_Q, MAX_Q] (MAX_Q 0: no upper bound):

    BLOCK_Q 4, cu_seqlens [0, 6, 7, 7], grid cdiv(7, 4) + 3 = 5:
    ids 0 1 -> seq 0 tiles 0 1 | 2 -> seq 1 tile 0 | 3 4 -> seq 2 (no rows): exit

Launches, from shapes alone (no host sync; CUDA-graph safe):
- decode-sized steps (T <= S): one launch of decode_block_m-row tiles (or the split path below);
- one sequence (S == 1), or tiles of equal size: one launch of block_m-row tiles;
- mixed steps (T > S > 1): a 1-token query fills GP rows of its tile (4 of 64 at block_m 64,
  GP 4: 16x the exps and dots that matter), so two launches share the step: first
  decode_block_m-row tiles (BLOCK_Q_dec = decode_block_m // GP tokens) over the sequences with
  q_len <= BLOCK_Q_dec (MAX_Q = BLOCK_Q_dec; this launch also zeroes the padded rows), then
  block_m-row tiles over the longer ones (MIN_Q = BLOCK_Q_dec + 1); each program of one exits
  where the other works (after its PDL wait). The decode tiles go first: the longest prefill
  tiles then end the step, where the next kernel's launch overlaps them.

    decodes and a 390-token chunk, GP 4:  launch 1  BLOCK_Q 4,  MAX_Q 4: 511 decode tiles
                                          launch 2  BLOCK_Q 16, MIN_Q 5: 25 prefill tiles

GQA: the G = Hq / Hkv query heads of one KV head are packed with the tile's tokens into the
BLOCK_M rows of tl.dot, row r = (token r // GP, head r % GP), GP = G padded to a power of two.
A tile reads only keys [lo, hi): lo the window start of its first query, hi the causal end of
its last; the block table is read per key, loads outside [lo, hi) are masked (blocks that left
the window may be freed and hold NaN), masked scores are -inf and masked V rows load as 0.

Split-KV: each (tile, kv head) range [lo, hi) is cut into NUM_SPLITS parts by a third grid
axis; each writes its unnormalized (acc, max, sum) to a float32 workspace and `_reduce_kernel`
merges them (sinks join there), writing every row of out (padded rows 0).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields, replace
from typing import Any

import torch
import triton
import triton.language as tl

from kiln.kernels import Launcher
from kiln.kernels.triton_kernels import pdl

Tensor = torch.Tensor


@dataclass(frozen=True)
class AttentionConfig:
    """The knobs of the paged-attention kernels (defaults for an H200 in bf16)."""

    block_m: int = 64
    """Rows of a tile (query tokens x packed heads) of the unified kernel on steps with more
    tokens than sequences (prefill or mixed)."""
    decode_block_m: int = 16
    """Rows of a tile on decode-sized steps (T <= S), on the split path, and of the launch that
    takes the short sequences (q_len <= decode_block_m // GP) of mixed steps."""
    block_n: int = 64
    """Keys per iteration of the KV loop."""
    num_warps: int = 4
    """Warps per program (both kernels)."""
    num_stages: int = 2
    """Software-pipelining depth of the KV loop (K/V tiles in flight)."""
    num_splits: int = 16
    """Parts of each KV range on the split path (a power of two)."""
    split_min_context: int = 2048
    """The split path needs a block-table capacity MB * BS of at least this many tokens ..."""
    split_max_programs: int = 256
    """... and at most this many (token, kv head) programs: T * Hkv (about 2 waves on 132 SMs)."""
    path: str = "auto"
    """"auto" (the rule of `choose_path`), or "unified" / "split" to force one."""


KNOBS: dict[str, tuple[Any, ...]] = {
    "block_m": (16, 32, 64, 128),
    "decode_block_m": (16, 32),
    "block_n": (16, 32, 64, 128),
    "num_warps": (2, 4, 8),
    "num_stages": (1, 2, 3, 4),
    "num_splits": (4, 8, 16, 32),
}
"""The search space of each AttentionConfig knob, for the autotuner."""


def choose_path(config: AttentionConfig, t: int, s: int, hkv: int, capacity: int) -> str:
    """The kernel path of a step, from shapes only (t tokens, s sequences, hkv KV heads,
    capacity = MB * BS tokens of a table row): "split" when the step is decode-sized (T <= S),
    launches few programs (T * Hkv <= split_max_programs) and sequences may be long
    (capacity >= split_min_context); "unified" otherwise."""
    if config.path != "auto":
        return config.path
    if t <= s and t * hkv <= config.split_max_programs and capacity >= config.split_min_context:
        return "split"
    return "unified"


# -- kernels ------------------------------------------------------------------------------------


@triton.jit
def _find_sequence(cu_ptr, pid, S, BLOCK_Q: tl.constexpr):
    """The largest s < S whose first tile id (cu_seqlens[s] // BLOCK_Q + s) is <= pid, or -1."""
    lo: tl.int32 = 0
    hi = S
    while lo < hi:
        mid = (lo + hi) // 2
        first = tl.load(cu_ptr + mid) // BLOCK_Q + mid
        if first <= pid:
            lo = mid + 1
        else:
            hi = mid
    return lo - 1


@triton.jit
def _dot(a, b, acc, IEEE: tl.constexpr):
    if IEEE:  # float32 inputs: no TF32, for parity with the reference
        return tl.dot(a, b, acc, input_precision="ieee")
    else:
        return tl.dot(a, b, acc)


@triton.jit
def _softmax_step(qk, allowed, acc, m_i, l_i, v_ptr, v_off, v_cols, dv_ok, k_ok, scale, softcap,
                  MASKED: tl.constexpr, SOFTCAP: tl.constexpr, IEEE: tl.constexpr):
    """One key tile of the online softmax: raw scores qk [BLOCK_M, BLOCK_N] (where `allowed`,
    when MASKED) into (acc, running max m_i, running sum l_i), base 2; V rows outside k_ok load
    as 0."""
    if SOFTCAP:  # tanh(x) = 1 - 2 / (exp(2x) + 1), exact at both infinities
        th = 1.0 - 2.0 / (tl.exp(qk * (2.0 * scale / softcap)) + 1.0)
        sc = th * (softcap * 1.4426950408889634)
    else:
        sc = qk * (scale * 1.4426950408889634)
    if MASKED:
        sc = tl.where(allowed, sc, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(sc, 1))
    m_use = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row with nothing yet
    p = tl.exp2(sc - m_use[:, None])
    alpha = tl.exp2(m_i - m_use)
    l_i = l_i * alpha + tl.sum(p, 1)
    v = tl.load(v_ptr + v_off[:, None] + v_cols[None, :], mask=k_ok[:, None] & dv_ok[None, :], other=0.0)
    acc = _dot(p.to(v.dtype), v, acc * alpha[:, None], IEEE)
    return acc, m_new, l_i


@triton.jit(do_not_specialize=["T", "S"])
def _attention_kernel(
    out_ptr, q_ptr, k_ptr, v_ptr, bt_ptr, seq_lens_ptr, cu_ptr, sinks_ptr,
    part_acc_ptr, part_m_ptr, part_l_ptr,
    T, S, scale, softcap, window,
    stride_qt, stride_qh, stride_qd,
    stride_kb, stride_ks, stride_kh, stride_kd,
    stride_vb, stride_vs, stride_vh, stride_vd,
    stride_bs, stride_bm,
    stride_ot, stride_oh, stride_od,
    HQ: tl.constexpr, G: tl.constexpr, GP: tl.constexpr,
    BLOCK_Q: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BS: tl.constexpr,
    D: tl.constexpr, DV: tl.constexpr, D_PAD: tl.constexpr, DV_PAD: tl.constexpr,
    CAUSAL: tl.constexpr, SLIDING: tl.constexpr, SOFTCAP: tl.constexpr,
    HAS_SINKS: tl.constexpr, SPLIT: tl.constexpr, NUM_SPLITS: tl.constexpr, IEEE: tl.constexpr,
    MIN_Q: tl.constexpr, MAX_Q: tl.constexpr, ZERO_PAD: tl.constexpr, PDL: tl.constexpr,
):
    pid = tl.num_programs(0) - 1 - tl.program_id(0)  # the last tiles (the longest, causal) start first
    kvh = tl.program_id(1)
    pdl.wait(PDL)  # q, the caches and the step's metadata come from earlier kernels
    rows = tl.arange(0, BLOCK_M)
    qi = rows // GP  # token of the row within the tile
    hh = rows % GP
    head = kvh * G + hh
    head_ok = hh < G
    offs_d = tl.arange(0, D_PAD)
    offs_dv = tl.arange(0, DV_PAD)
    d_ok = offs_d < D
    dv_ok = offs_dv < DV

    if ZERO_PAD:
        # Padded token rows (outside cu_seqlens[0]:cu_seqlens[S]) belong to no tile: program
        # pid zeroes those of rows pid*BLOCK_Q .. +BLOCK_Q (the split path's reduce does it there;
        # on mixed steps the first of the two launches does).
        t = pid * BLOCK_Q + qi
        pad = (t < T) & ((t < tl.load(cu_ptr)) | (t >= tl.load(cu_ptr + S))) & head_ok
        o_ptrs = out_ptr + t[:, None] * stride_ot + head[:, None] * stride_oh + offs_dv[None, :] * stride_od
        zero = tl.zeros([BLOCK_M, DV_PAD], dtype=out_ptr.dtype.element_ty)
        tl.store(o_ptrs, zero, mask=pad[:, None] & dv_ok[None, :])

    found = _find_sequence(cu_ptr, pid, S, BLOCK_Q)
    s = tl.maximum(found, 0)
    q_start = tl.load(cu_ptr + s)
    q_len = tl.load(cu_ptr + s + 1) - q_start
    ctx = tl.load(seq_lens_ptr + s)
    tile = pid - (q_start // BLOCK_Q + s)
    skip = (found < 0) | (tile * BLOCK_Q >= q_len) | (q_len < MIN_Q)
    if MAX_Q > 0:  # the other launch of a mixed step takes the longer sequences
        skip = skip | (q_len > MAX_Q)
    if skip:
        return

    tok = tile * BLOCK_Q + qi  # token of the row within its sequence
    row_ok = (tok < q_len) & head_ok
    qpos = ctx - q_len + tok
    q_ptrs = (q_ptr + (q_start + tok)[:, None] * stride_qt + head[:, None] * stride_qh
              + offs_d[None, :] * stride_qd)
    q = tl.load(q_ptrs, mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    q = q.to(k_ptr.dtype.element_ty)

    # Keys the tile can attend: [lo, hi).
    hi = ctx
    if CAUSAL:
        hi = tl.minimum(ctx - q_len + tl.minimum(tile * BLOCK_Q + BLOCK_Q, q_len), ctx)
    lo = 0
    if SLIDING:
        lo = tl.maximum(ctx - q_len + tile * BLOCK_Q - window + 1, 0)
    start = (lo // BLOCK_N) * BLOCK_N
    end = hi
    if SPLIT:
        sid = tl.program_id(2)
        per = tl.cdiv(tl.cdiv(tl.maximum(hi - start, 0), BLOCK_N), NUM_SPLITS) * BLOCK_N
        start = start + sid * per
        end = tl.minimum(hi, start + per)

    if HAS_SINKS:  # a sink is one more logit in the softmax denominator, without a value
        m_i = tl.load(sinks_ptr + head, mask=head_ok, other=0.0).to(tl.float32) * 1.4426950408889634
        l_i = tl.full([BLOCK_M], 1.0, dtype=tl.float32)
    else:
        m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, DV_PAD], dtype=tl.float32)

    offs_n = tl.arange(0, BLOCK_N)
    v_cols = offs_dv * stride_vd
    bt_row = bt_ptr + s.to(tl.int64) * stride_bs
    # Whole key tiles that every row of the tile attends (keys before its first query's
    # position, when no window bounds them from below) need no masks: [start, full_end).
    full_end = start
    if CAUSAL and not SLIDING and not SPLIT:
        full_end = start + ((tl.minimum(ctx - q_len + tile * BLOCK_Q + 1, end) - start) // BLOCK_N) * BLOCK_N
    for j in range(start, full_end, BLOCK_N):
        kpos = j + offs_n
        blk = tl.load(bt_row + (kpos // BS) * stride_bm).to(tl.int64)
        slot = kpos % BS
        k = tl.load(k_ptr + (blk * stride_kb + slot * stride_ks + kvh * stride_kh)[None, :]
                    + offs_d[:, None] * stride_kd, mask=d_ok[:, None], other=0.0)
        qk = _dot(q, k, tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32), IEEE)
        acc, m_i, l_i = _softmax_step(qk, qk, acc, m_i, l_i, v_ptr, blk * stride_vb + slot * stride_vs + kvh * stride_vh,
                                      v_cols, dv_ok, offs_n >= 0, scale, softcap, False, SOFTCAP, IEEE)
    for j in range(full_end, end, BLOCK_N):
        kpos = j + offs_n
        k_ok = (kpos >= lo) & (kpos < end)
        blk = tl.load(bt_row + (kpos // BS) * stride_bm, mask=k_ok, other=0).to(tl.int64)
        slot = kpos % BS
        k_off = blk * stride_kb + slot * stride_ks + kvh * stride_kh
        k = tl.load(k_ptr + k_off[None, :] + offs_d[:, None] * stride_kd,
                    mask=k_ok[None, :] & d_ok[:, None], other=0.0)  # [D_PAD, BLOCK_N]
        qk = _dot(q, k, tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32), IEEE)
        allowed = k_ok[None, :]
        if CAUSAL:
            allowed = allowed & (kpos[None, :] <= qpos[:, None])
        if SLIDING:
            allowed = allowed & (qpos[:, None] - kpos[None, :] < window)
        acc, m_i, l_i = _softmax_step(qk, allowed, acc, m_i, l_i, v_ptr,
                                      blk * stride_vb + slot * stride_vs + kvh * stride_vh,
                                      v_cols, dv_ok, k_ok, scale, softcap, True, SOFTCAP, IEEE)

    t = q_start + tok
    if SPLIT:
        part = (t * HQ + head) * NUM_SPLITS + tl.program_id(2)
        tl.store(part_m_ptr + part, m_i, mask=row_ok)
        tl.store(part_l_ptr + part, l_i, mask=row_ok)
        tl.store(part_acc_ptr + part[:, None] * DV_PAD + offs_dv[None, :], acc,
                 mask=row_ok[:, None])
    else:
        out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
        o_ptrs = out_ptr + t[:, None] * stride_ot + head[:, None] * stride_oh + offs_dv[None, :] * stride_od
        tl.store(o_ptrs, out.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & dv_ok[None, :])


@triton.jit(do_not_specialize=["T", "S"])
def _reduce_kernel(
    out_ptr, part_acc_ptr, part_m_ptr, part_l_ptr, cu_ptr, sinks_ptr,
    T, S, stride_ot, stride_oh, stride_od,
    HQ: tl.constexpr, DV: tl.constexpr, DV_PAD: tl.constexpr, NUM_SPLITS: tl.constexpr,
    HAS_SINKS: tl.constexpr, PDL: tl.constexpr,
):
    pdl.wait(PDL)  # the partial results of the attention kernel before it
    t = tl.program_id(0)
    h = tl.program_id(1)
    valid = (t >= tl.load(cu_ptr)) & (t < tl.load(cu_ptr + S))  # padded rows are written 0
    sp = tl.arange(0, NUM_SPLITS)
    offs_dv = tl.arange(0, DV_PAD)
    part = (t * HQ + h) * NUM_SPLITS + sp
    ok = sp < tl.where(valid, NUM_SPLITS, 0)  # (the interpreter mistypes a bool block & scalar)
    m = tl.load(part_m_ptr + part, mask=ok, other=float("-inf"))
    l_ = tl.load(part_l_ptr + part, mask=ok, other=0.0)
    acc = tl.load(part_acc_ptr + part[:, None] * DV_PAD + offs_dv[None, :],
                  mask=ok[:, None] & (offs_dv >= 0)[None, :], other=0.0)
    m_max = tl.max(m, 0)
    if HAS_SINKS:
        sink = tl.load(sinks_ptr + h).to(tl.float32) * 1.4426950408889634
        m_max = tl.maximum(m_max, sink)
    m_use = tl.where(m_max == float("-inf"), 0.0, m_max)
    w = tl.exp2(m - m_use)
    num = tl.sum(acc * w[:, None], 0)
    den = tl.sum(l_ * w, 0)
    if HAS_SINKS:
        den = den + tl.exp2(sink - m_use)
    out = num / tl.where(den == 0.0, 1.0, den)
    out = tl.where(valid, out, 0.0)
    tl.store(out_ptr + t * stride_ot + h * stride_oh + offs_dv * stride_od,
             out.to(out_ptr.dtype.element_ty), mask=offs_dv < DV)


# -- launcher ------------------------------------------------------------------------------------


def _check(q: Tensor, k_cache: Tensor, v_cache: Tensor, block_tables: Tensor, seq_lens: Tensor,
           cu_seqlens: Tensor, sinks: Tensor | None, out: Tensor) -> None:
    t, hq, d = q.shape
    nb, bs, hkv, dk = k_cache.shape
    if dk != d or v_cache.shape[:3] != k_cache.shape[:3]:
        raise ValueError(f"paged_attention: q {tuple(q.shape)}, k_cache {tuple(k_cache.shape)} and "
                         f"v_cache {tuple(v_cache.shape)} disagree (want [NB, BS, Hkv, D|Dv] caches)")
    if hq % hkv:
        raise ValueError(f"paged_attention: {hq} query heads are not a multiple of {hkv} KV heads")
    s = seq_lens.shape[0]
    if block_tables.dim() != 2 or block_tables.shape[0] != s or cu_seqlens.shape[0] != s + 1:
        raise ValueError(f"paged_attention: block_tables {tuple(block_tables.shape)}, seq_lens {s} "
                         f"and cu_seqlens {tuple(cu_seqlens.shape)} disagree (want [S, MB], [S], [S+1])")
    if sinks is not None and sinks.shape != (hq,):
        raise ValueError(f"paged_attention: sinks {tuple(sinks.shape)}, want [{hq}]")
    if out.shape != (t, hq, v_cache.shape[3]):
        raise ValueError(f"paged_attention: out {tuple(out.shape)}, want [{t}, {hq}, {v_cache.shape[3]}]")


def _pow2(n: int) -> int:
    return max(16, triton.next_power_of_2(n))


DEFAULT_CONFIG = AttentionConfig()


def make_launcher(config: AttentionConfig = DEFAULT_CONFIG, decode: AttentionConfig | None = None) -> Launcher:
    """The `paged_attention` launcher with these knobs (inputs as the op: q, k_cache, v_cache,
    block_tables, seq_lens, cu_seqlens[, sinks]; attrs scale, causal, sliding_window, softcap);
    `decode`, when given, configures decode-sized steps (T <= S) instead of `config`."""
    for c in (config, decode or config):
        for knob in ("block_m", "decode_block_m", "block_n", "num_splits"):
            value = getattr(c, knob)
            if value < 1 or value & (value - 1) or (knob != "num_splits" and value < 16):
                raise ValueError(f"AttentionConfig.{knob} must be a power of two (>= 16 for tile sizes), "
                                 f"got {value}")
        if c.path not in ("auto", "unified", "split"):
            raise ValueError(f"AttentionConfig.path must be auto, unified or split, got {c.path!r}")

    def launch(outs: list[Tensor], args: list[Any], attrs: dict[str, Any]) -> None:
        q, k_cache, v_cache, block_tables, seq_lens, cu_seqlens, *rest = args
        sinks = rest[0] if rest else None
        (out,) = outs
        _check(q, k_cache, v_cache, block_tables, seq_lens, cu_seqlens, sinks, out)
        t, hq, d = q.shape
        _, bs, hkv, _ = k_cache.shape
        dv = v_cache.shape[3]
        s = seq_lens.shape[0]
        if t == 0:
            return
        if s == 0:  # every row is padding
            out.zero_()
            return
        g = hq // hkv
        gp = triton.next_power_of_2(g)
        c = decode if decode is not None and t <= s else config
        split = choose_path(c, t, s, hkv, block_tables.shape[1] * bs) == "split"
        dv_pad = _pow2(dv)
        window = int(attrs.get("sliding_window") or 0)
        softcap = float(attrs.get("softcap") or 0.0)
        pdl_options = pdl.options(q)

        def attend(block_m: int, min_q: int, max_q: int, zero_pad: bool, num_splits: int,
                   parts: tuple[Tensor, Tensor, Tensor]) -> None:
            """One launch of the attention kernel over the sequences with q_len in [min_q, max_q]."""
            block_q = block_m // gp
            _attention_kernel[(triton.cdiv(t, block_q) + s, hkv, num_splits)](
                out, q, k_cache, v_cache, block_tables, seq_lens, cu_seqlens,
                sinks if sinks is not None else q, *parts,
                t, s, float(attrs["scale"]), softcap, window,
                *q.stride(), *k_cache.stride(), *v_cache.stride(), *block_tables.stride(), *out.stride(),
                HQ=hq, G=g, GP=gp, BLOCK_Q=block_q, BLOCK_M=block_m, BLOCK_N=c.block_n, BS=bs,
                D=d, DV=dv, D_PAD=_pow2(d), DV_PAD=dv_pad,
                CAUSAL=bool(attrs["causal"]), SLIDING=window > 0, SOFTCAP=softcap > 0.0,
                HAS_SINKS=sinks is not None and not split, SPLIT=split, NUM_SPLITS=num_splits,
                IEEE=k_cache.dtype == torch.float32, MIN_Q=min_q, MAX_Q=max_q, ZERO_PAD=zero_pad,
                num_warps=c.num_warps, num_stages=c.num_stages, **pdl_options,
            )

        short_m = max(c.decode_block_m, gp)  # the tile rows of decode-sized work
        long_m = max(c.block_m, gp)
        if split:
            parts = (torch.empty(t, hq, c.num_splits, dv_pad, dtype=torch.float32, device=q.device),
                     torch.empty(t, hq, c.num_splits, dtype=torch.float32, device=q.device),
                     torch.empty(t, hq, c.num_splits, dtype=torch.float32, device=q.device))
            attend(short_m, 0, 0, False, c.num_splits, parts)
            _reduce_kernel[(t, hq)](
                out, *parts, cu_seqlens, sinks if sinks is not None else q,
                t, s, *out.stride(),
                HQ=hq, DV=dv, DV_PAD=dv_pad, NUM_SPLITS=c.num_splits, HAS_SINKS=sinks is not None,
                num_warps=c.num_warps, **pdl_options,
            )
        elif t <= s:
            attend(short_m, 0, 0, True, 1, (out, out, out))
        elif s > 1 and short_m < long_m:  # mixed: short queries in small tiles, then the rest
            attend(short_m, 0, short_m // gp, True, 1, (out, out, out))
            attend(long_m, short_m // gp + 1, 0, False, 1, (out, out, out))
        else:
            attend(long_m, 0, 0, True, 1, (out, out, out))

    return launch


def config_from(values: Mapping[str, Any]) -> AttentionConfig:
    """DEFAULT_CONFIG with `values` (knob -> value) replaced; ValueError naming an unknown knob."""
    unknown = sorted(set(values) - {f.name for f in fields(AttentionConfig)})
    if unknown:
        raise ValueError(f"tuning.json: paged_attention has unknown knobs {unknown}")
    return replace(DEFAULT_CONFIG, **values)


def from_tuning(entry: Mapping[str, Any]) -> dict[str, Launcher]:
    """The launcher that tuning.json's paged_attention entry chose: {"prefill": {"config": {...}},
    "decode": {"config": {...}}}, each config the knobs that differ from DEFAULT_CONFIG."""
    return {"paged_attention": make_launcher(config_from(entry.get("prefill", {}).get("config", {})),
                                             config_from(entry.get("decode", {}).get("config", {})))}


LAUNCHERS: dict[str, Launcher] = {"paged_attention": make_launcher(DEFAULT_CONFIG)}

__all__ = ["DEFAULT_CONFIG", "KNOBS", "LAUNCHERS", "AttentionConfig", "choose_path", "config_from", "from_tuning",
           "make_launcher"]
