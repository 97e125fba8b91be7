"""Triton kernels of the sampler (`kiln.runtime.sampler`): the per-row work of one sampling step
in one to three launches, one program per row looping over the vocabulary in chunks.

    _penalize_kernel   repetition penalty (prompt + output), frequency/presence (output), then
                       the min_tokens mask (-inf at banned ids), in place on float32 logits
    _argmax_part_kernel greedy rows of a large vocabulary: the max and its first index of each
                       ARGMAX_CHUNK-token part, one program per (row, part), so one row's
                       argmax reads the vocabulary at the whole GPU's bandwidth
    _sample_kernel     greedy rows: argmax (first index of the max, as torch.argmax), over the
                       parts' results when there are parts, else over the row;
                       drawn rows: online max and sum of exp(x/T - max), then a CDF walk to
                       u * sum that stops at the chunk holding the token;
                       filtered rows without top-k: the logsumexp of x/T;
                       every row: its uniform u = hash(seed, counter), bit-identical to
                       `kiln.runtime.sampler.uniforms`
    _candidates_kernel filtered rows, over their top candidates (torch.topk, descending): the
                       top-k/top-p/min-p kept prefix, the draw at u, and whether the kept set
                       surely lies within the candidates (else the sampler redraws the row)

Sampling is no IR op, so this module has no LAUNCHERS table: the runtime's sampler calls
`penalize_` (when a row is penalized or masked), `sample_rows` and `draw_candidates` (when a
row is filtered) directly. Per-row parameters arrive packed in two small tensors
(one host-to-device copy each); the kernels read them from memory, so nothing the batch holds
specializes a binary and no launch waits on the device.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

# fparams [B, NF] float32 columns
F_TEMP, F_REP, F_FREQ, F_PRES, F_TOP_P, F_MIN_P = 0, 1, 2, 3, 4, 5
NF = 6
# iparams [B, NI + max banned] int64 columns; the banned ids follow from column NI
I_SEED_LO, I_SEED_HI, I_COUNTER, I_MODE, I_SLOT, I_NBAN, I_TOP_K = 0, 1, 2, 3, 4, 5, 6
NI = 7
MODE_GREEDY, MODE_DRAW, MODE_FILTERED = 0, 1, 2
"""I_MODE values: argmax; draw over the whole distribution; filtered, drawn by
`draw_candidates` (sample_rows writes only u, and the lse when there is no top-k)."""

BLOCK = 1024
"""Vocabulary chunk each program loads per iteration."""
NUM_WARPS = 4
"""Warps of each row's program of `_sample_kernel`."""
ARGMAX_CHUNK = 4096
"""Vocabulary tokens per program of `_argmax_part_kernel` (vocabularies of at least two chunks
take that path)."""


# the layout's twins that jit code may read
_F_TEMP = tl.constexpr(F_TEMP)
_F_REP = tl.constexpr(F_REP)
_F_FREQ = tl.constexpr(F_FREQ)
_F_PRES = tl.constexpr(F_PRES)
_F_TOP_P = tl.constexpr(F_TOP_P)
_F_MIN_P = tl.constexpr(F_MIN_P)
_NF = tl.constexpr(NF)
_I_SEED_LO = tl.constexpr(I_SEED_LO)
_I_SEED_HI = tl.constexpr(I_SEED_HI)
_I_COUNTER = tl.constexpr(I_COUNTER)
_I_MODE = tl.constexpr(I_MODE)
_I_SLOT = tl.constexpr(I_SLOT)
_I_NBAN = tl.constexpr(I_NBAN)
_I_TOP_K = tl.constexpr(I_TOP_K)
_NI = tl.constexpr(NI)
_MODE_GREEDY = tl.constexpr(MODE_GREEDY)
_MODE_DRAW = tl.constexpr(MODE_DRAW)
_MODE_FILTERED = tl.constexpr(MODE_FILTERED)


@triton.jit
def _hash32(x):
    # Wellons' lowbias32 on uint32: multiplies wrap mod 2^32 as the torch version's masks do
    x = x ^ (x >> 16)
    x = x * tl.full(x.shape, 0x7FEB352D, tl.uint32)
    x = x ^ (x >> 15)
    x = x * tl.full(x.shape, 0x846CA68B, tl.uint32)
    return x ^ (x >> 16)


@triton.jit
def _uniform(seed_lo, seed_hi, counter, stream_hash):
    """uniforms() of one row: float32 in [0, 1) from uint32 seed halves and counter."""
    h = _hash32(_hash32(_hash32(seed_lo ^ tl.full(seed_lo.shape, 0x9E3779B9, tl.uint32)) ^ seed_hi ^ stream_hash)
                ^ counter)
    return (h >> 8).to(tl.float32) * (1.0 / 16777216.0)


@triton.jit(do_not_specialize=["ip_stride"])
def _penalize_kernel(x_ptr, x_stride, counts_ptr, seen_ptr, c_stride, fp_ptr, ip_ptr, ip_stride, V,
                     BLOCK: tl.constexpr):
    row = tl.program_id(0)
    ip = ip_ptr + row * ip_stride
    slot = tl.load(ip + _I_SLOT)
    nban = tl.load(ip + _I_NBAN)
    x_row = x_ptr + row.to(tl.int64) * x_stride
    if slot >= 0:
        rep = tl.load(fp_ptr + row * _NF + _F_REP)
        freq = tl.load(fp_ptr + row * _NF + _F_FREQ)
        pres = tl.load(fp_ptr + row * _NF + _F_PRES)
        c_row = counts_ptr + slot * c_stride
        s_row = seen_ptr + slot * c_stride
        for start in range(0, V, BLOCK):
            offs = start + tl.arange(0, BLOCK)
            m = offs < V
            x = tl.load(x_row + offs, mask=m, other=0.0)
            c = tl.load(c_row + offs, mask=m, other=0.0)
            seen = (tl.load(s_row + offs, mask=m, other=0) != 0) | (c > 0)
            # the same float ops, in the same order, as Sampler.apply_penalties' torch code
            # (which skips rep == 1: x / 1 and x * 1 are exact)
            x = tl.where(seen, tl.where(x > 0, tl.math.div_rn(x, rep), x * rep), x)
            x = x - freq * c - pres * (c > 0).to(tl.float32)
            tl.store(x_row + offs, x, mask=m)
        tl.debug_barrier()  # the mask below overwrites what this program's threads just stored
    for j in range(nban):
        tok = tl.load(ip + _NI + j)
        tl.store(x_row + tok, float("-inf"))


@triton.jit
def _first_max(x_row, lo, hi, BLOCK: tl.constexpr):
    """(max, first index of the max) of x_row[lo:hi]; (-inf, 0) when nothing beats -inf."""
    lanes = tl.arange(0, BLOCK)
    best = tl.full([BLOCK], float("-inf"), tl.float32)
    best_i = tl.zeros([BLOCK], tl.int32)
    for start in range(lo, hi, BLOCK):
        offs = start + lanes
        x = tl.load(x_row + offs, mask=offs < hi, other=float("-inf"))
        up = x > best  # strict: each lane keeps its first index of its max
        best = tl.where(up, x, best)
        best_i = tl.where(up, offs, best_i)
    top = tl.max(best, axis=0)
    return top, tl.min(tl.where(best == top, best_i, hi), axis=0)


@triton.jit(do_not_specialize=["ip_stride"])
def _argmax_part_kernel(x_ptr, x_stride, pm_ptr, pi_ptr, ip_ptr, ip_stride, V, CHUNK: tl.constexpr,
                        NPART: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    part = tl.program_id(1)
    if tl.load(ip_ptr + row * ip_stride + _I_MODE) == _MODE_GREEDY:
        lo = part * CHUNK
        top, idx = _first_max(x_ptr + row.to(tl.int64) * x_stride, lo, tl.minimum(lo + CHUNK, V), BLOCK)
        tl.store(pm_ptr + row * NPART + part, top)
        tl.store(pi_ptr + row * NPART + part, idx)


@triton.jit(do_not_specialize=["ip_stride"])
def _sample_kernel(x_ptr, x_stride, tok_ptr, u_ptr, lse_ptr, fp_ptr, ip_ptr, ip_stride, V, stream_hash,
                   pm_ptr, pi_ptr, BLOCK: tl.constexpr, NPART: tl.constexpr, NPART_PAD: tl.constexpr):
    row = tl.program_id(0)
    ip = ip_ptr + row * ip_stride
    mode = tl.load(ip + _I_MODE)
    x_row = x_ptr + row.to(tl.int64) * x_stride
    lanes = tl.arange(0, BLOCK)
    seed_lo = tl.load(ip + _I_SEED_LO).to(tl.uint32)
    seed_hi = tl.load(ip + _I_SEED_HI).to(tl.uint32)
    counter = tl.load(ip + _I_COUNTER).to(tl.uint32)
    u = _uniform(seed_lo, seed_hi, counter, stream_hash)
    tl.store(u_ptr + row, u)
    top_k = tl.load(ip + _I_TOP_K)
    # filtered rows need the whole row's logsumexp only without top-k
    whole = (mode == _MODE_DRAW) | ((mode == _MODE_FILTERED) & ((top_k == 0) | (top_k >= V)))
    if mode == _MODE_GREEDY:
        if NPART > 0:  # the parts' maxima: the first part holding the overall max has its first index
            parts = tl.arange(0, NPART_PAD)
            pm = tl.load(pm_ptr + row * NPART + parts, mask=parts < NPART, other=float("-inf"))
            pi = tl.load(pi_ptr + row * NPART + parts, mask=parts < NPART, other=0)
            top = tl.max(pm, axis=0)
            first = tl.min(tl.where(pm == top, parts, NPART_PAD), axis=0)
            best_idx = tl.sum(tl.where(parts == first, pi, 0), axis=0)
        else:
            top, best_idx = _first_max(x_row, 0, V, BLOCK)
        tl.store(tok_ptr + row, best_idx.to(tl.int64))
    if whole:
        temp = tl.load(fp_ptr + row * _NF + _F_TEMP)
        # pass 1: per-lane running max and sum of exp(y - max), y = x / T
        m_vec = tl.full([BLOCK], float("-inf"), tl.float32)
        s_vec = tl.zeros([BLOCK], tl.float32)
        for start in range(0, V, BLOCK):
            offs = start + lanes
            y = tl.math.div_rn(tl.load(x_row + offs, mask=offs < V, other=float("-inf")), temp)
            m_new = tl.maximum(m_vec, y)
            base = tl.where(m_new == float("-inf"), 0.0, m_new)  # all -inf so far: add nothing
            s_vec = s_vec * tl.exp(m_vec - base) + tl.exp(y - base)
            m_vec = m_new
        m = tl.max(m_vec, axis=0)
        total = tl.sum(s_vec * tl.exp(m_vec - m), axis=0)
        tl.store(lse_ptr + row, m + tl.log(total))
        if mode == _MODE_DRAW:
            target = u * total
            # pass 2: the first token whose running mass passes target; the token must have
            # mass (a masked -inf never), and when rounding leaves target past the walk's
            # total, the last token with mass (as the torch path's clamp)
            carry = 0.0
            found = V
            last = -1
            start = 0
            while (start < V) & (found == V):
                offs = start + lanes
                y = tl.math.div_rn(tl.load(x_row + offs, mask=offs < V, other=float("-inf")), temp)
                e = tl.exp(y - m)
                cdf = carry + tl.cumsum(e, axis=0)
                hit = (cdf > target) & (e > 0)
                found = tl.minimum(found, tl.min(tl.where(hit, offs, V), axis=0))
                last = tl.maximum(last, tl.max(tl.where(e > 0, offs, -1), axis=0))
                carry = tl.max(cdf, axis=0)
                start += BLOCK
            tl.store(tok_ptr + row, tl.where(found < V, found, last).to(tl.int64))


@triton.jit(do_not_specialize=["k_stride", "ip_stride", "K"])
def _candidates_kernel(vals_ptr, order_ptr, k_stride, rows_ptr, fp_ptr, ip_ptr, ip_stride, u_ptr, lse_ptr, tok_ptr,
                       fits_ptr, K, V, BLOCK: tl.constexpr):
    f = tl.program_id(0)
    row = tl.load(rows_ptr + f)
    ip = ip_ptr + row * ip_stride
    top_k = tl.load(ip + _I_TOP_K)
    kk = tl.where((top_k > 0) & (top_k < V), top_k, V)
    top_p = tl.load(fp_ptr + row * _NF + _F_TOP_P)
    min_p = tl.load(fp_ptr + row * _NF + _F_MIN_P)
    u = tl.load(u_ptr + row)
    v_row = vals_ptr + f.to(tl.int64) * k_stride
    lanes = tl.arange(0, BLOCK)
    v0 = tl.load(v_row)  # the largest
    if kk < V:  # top-k renormalizes over the k kept logits
        acc = tl.zeros([BLOCK], tl.float32)
        for start in range(0, K, BLOCK):
            offs = start + lanes
            v = tl.load(v_row + offs, mask=offs < kk, other=float("-inf"))
            acc += tl.exp(v - v0)
        lse = v0 + tl.log(tl.sum(acc, axis=0))
    else:  # without top-k the mass is over the whole row (from _sample_kernel)
        lse = tl.load(lse_ptr + row)
    p0 = tl.exp(v0 - lse)
    # pass 1: the kept prefix (probabilities descend and the mass before grows, so every filter
    # keeps a prefix), its mass, and the candidates' mass and last probability for `fits`
    # top_p == 1 keeps everything even when rounding pushes the mass before past 1
    tp = tl.where(top_p >= 1.0, float("inf"), top_p)
    carry = 0.0
    kept = 0.0
    n_keep = 0
    last_p = 0.0
    for start in range(0, K, BLOCK):
        offs = start + lanes
        v = tl.load(v_row + offs, mask=offs < K, other=float("-inf"))
        p = tl.where(offs < kk, tl.exp(v - lse), 0.0)
        cs = carry + tl.cumsum(p, axis=0)
        keep = (offs < kk) & ((cs - p) < tp) & (p >= min_p * p0) & (p > 0)
        keep = keep | (offs == 0)
        kept += tl.sum(tl.where(keep, p, 0.0), axis=0)
        n_keep += tl.sum(keep.to(tl.int32), axis=0)
        last_p += tl.sum(tl.where(offs == K - 1, p, 0.0), axis=0)
        carry = tl.max(cs, axis=0)
    # every token past the candidates is dropped when top-k ends inside them, top-p is reached,
    # or min-p already drops the last candidate
    fits = (kk <= K) | ((top_p < 1.0) & (carry >= top_p)) | (last_p < min_p * p0)
    # pass 2: the first kept candidate whose running kept mass passes u * kept
    target = u * kept
    c2 = 0.0
    found = K
    start = 0
    while (start < K) & (found == K):
        offs = start + lanes
        v = tl.load(v_row + offs, mask=offs < K, other=float("-inf"))
        q = tl.where(offs < n_keep, tl.exp(v - lse), 0.0)
        cdf = c2 + tl.cumsum(q, axis=0)
        found = tl.minimum(found, tl.min(tl.where((cdf > target) & (offs < n_keep), offs, K), axis=0))
        c2 = tl.max(cdf, axis=0)
        start += BLOCK
    choice = tl.minimum(found, n_keep - 1)  # u * kept rounding past the walk's total
    tl.store(tok_ptr + row, tl.load(order_ptr + f.to(tl.int64) * k_stride + choice))
    tl.store(fits_ptr + f, fits.to(tl.int8))


def pack_params(fparams: list[list[float]], iparams: list[list[int]], device: torch.device
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """The per-row parameter tensors on `device` ([B, NF] float32, [B, NI + nb] int64), each one
    copy that does not wait for the device (pinned host memory when the device is CUDA)."""
    width = max((len(r) for r in iparams), default=NI)
    fp = torch.tensor(fparams, dtype=torch.float32).reshape(-1, NF)
    ip = torch.tensor([r + [0] * (width - len(r)) for r in iparams], dtype=torch.int64)
    if device.type == "cuda":
        return fp.pin_memory().to(device, non_blocking=True), ip.pin_memory().to(device, non_blocking=True)
    return fp.to(device), ip.to(device)


def _check_rows(x: torch.Tensor, fp: torch.Tensor, ip: torch.Tensor) -> None:
    if x.dtype != torch.float32 or x.dim() != 2 or x.stride(1) != 1:
        raise ValueError(f"logits must be float32 [B, V] with unit last stride, got {x.dtype} {tuple(x.shape)}")
    b = x.shape[0]
    if fp.shape != (b, NF) or ip.dim() != 2 or ip.shape[0] != b or ip.shape[1] < NI or not ip.is_contiguous():
        raise ValueError(f"params must be [{b}, {NF}] and contiguous [{b}, >= {NI}], got "
                         f"{tuple(fp.shape)} and {tuple(ip.shape)}")


def penalize_(x: torch.Tensor, counts: torch.Tensor | None, seen: torch.Tensor | None, fp: torch.Tensor,
              ip: torch.Tensor) -> None:
    """In place on float32 logits x [B, V]: per row with ip[:, I_SLOT] >= 0 the penalties of
    fp's REP/FREQ/PRES columns from counts[slot] [C, V] float32 and seen[slot] [C, V] bool,
    then -inf at the row's ip[:, I_NBAN] banned ids."""
    _check_rows(x, fp, ip)
    if counts is None:  # no penalized row: any [1, V] stands in, never read
        counts, seen = x[:1], torch.zeros(1, x.shape[1], dtype=torch.bool, device=x.device)
    if counts.shape[1] != x.shape[1] or seen.shape != counts.shape or counts.stride(1) != 1 or \
            seen.stride() != counts.stride():
        raise ValueError(f"counts and seen must be [C, {x.shape[1]}] alike, got {tuple(counts.shape)}")
    _penalize_kernel[(x.shape[0],)](x, x.stride(0), counts, seen.view(torch.uint8), counts.stride(0), fp, ip,
                                    ip.shape[1], x.shape[1], BLOCK=BLOCK, enable_fp_fusion=False)


def sample_rows(x: torch.Tensor, fp: torch.Tensor, ip: torch.Tensor, stream_hash: int = 0,
                block: int = BLOCK, num_warps: int = NUM_WARPS) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per row of float32 logits x [B, V] (penalized): the token [B] int64 of greedy and drawn
    rows (filtered rows' entries are left unset), every row's uniform [B] float32, and the
    logsumexp of x / T [B] of drawn rows and of filtered rows without top-k (else unset).
    stream_hash is `_hash32(stream)` of `uniforms` (0 for stream 0); block: the vocabulary chunk,
    a power of two; num_warps: the warps of each row's program."""
    _check_rows(x, fp, ip)
    b, v = x.shape
    tokens = torch.empty(b, dtype=torch.int64, device=x.device)
    u = torch.empty(b, dtype=torch.float32, device=x.device)
    lse = torch.empty(b, dtype=torch.float32, device=x.device)
    nparts = triton.cdiv(v, ARGMAX_CHUNK) if v >= 2 * ARGMAX_CHUNK else 0
    pm = torch.empty(b, max(nparts, 1), dtype=torch.float32, device=x.device)
    pi = torch.empty(b, max(nparts, 1), dtype=torch.int32, device=x.device)
    if nparts:
        _argmax_part_kernel[(b, nparts)](x, x.stride(0), pm, pi, ip, ip.shape[1], v, CHUNK=ARGMAX_CHUNK,
                                         NPART=nparts, BLOCK=block)
    # no fp contraction: the float ops round as torch's separate kernels do
    _sample_kernel[(b,)](x, x.stride(0), tokens, u, lse, fp, ip, ip.shape[1], v, stream_hash, pm, pi,
                         BLOCK=block, NPART=nparts, NPART_PAD=triton.next_power_of_2(max(nparts, 1)),
                         enable_fp_fusion=False, num_warps=num_warps)
    return tokens, u, lse


def draw_candidates(vals: torch.Tensor, order: torch.Tensor, rows: torch.Tensor, fp: torch.Tensor, ip: torch.Tensor,
                    u: torch.Tensor, lse: torch.Tensor, tokens: torch.Tensor, vocab: int, block: int = BLOCK
                    ) -> torch.Tensor:
    """For filtered rows `rows` [F] int64 of a batch: the draw from each row's top-k/top-p/min-p
    filtered softmax over its K candidates, vals [F, K] float32 (x / T, descending) and their
    token ids order [F, K] int64, written into tokens[rows]; u and lse are sample_rows'.
    Returns whether each row's kept set surely lies within the candidates [F] bool (K = vocab:
    always); a row that does not fit must be drawn again over its whole vocabulary."""
    f, k = vals.shape
    if vals.dtype != torch.float32 or order.shape != vals.shape or not vals.is_contiguous() or \
            not order.is_contiguous() or rows.shape != (f,):
        raise ValueError(f"vals [F, K] float32 and order [F, K] contiguous, rows [F]: got {tuple(vals.shape)}, "
                         f"{tuple(order.shape)}, {tuple(rows.shape)}")
    fits = torch.empty(f, dtype=torch.int8, device=vals.device)
    _candidates_kernel[(f,)](vals, order, k, rows, fp, ip, ip.shape[1], u, lse, tokens, fits, k, vocab,
                             BLOCK=block, enable_fp_fusion=False)
    return fits.bool()
