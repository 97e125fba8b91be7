"""Triton kernels of the sampler (`kiln.runtime.sampler`): the per-row work of one sampling step
in two launches, one program per row looping over the vocabulary in chunks.

    _penalize_kernel   repetition penalty (prompt + output), frequency/presence (output), then
                       the min_tokens mask (-inf at banned ids), in place on float32 logits
    _sample_kernel     greedy rows: argmax (first index of the max, as torch.argmax);
                       drawn rows: online max and sum of exp(x/T - max), then a CDF walk to
                       u * sum that stops at the chunk holding the token;
                       every row: its uniform u = hash(seed, counter), bit-identical to
                       `kiln.runtime.sampler.uniforms` (filtered rows draw from it in torch)

Sampling is no IR op, so this module has no LAUNCHERS table: the runtime's sampler calls
`penalize_` and `sample_rows` directly. Per-row parameters arrive packed in two small tensors
(one host-to-device copy each); the kernels read them from memory, so nothing the batch holds
specializes a binary and no launch waits on the device.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

# fparams [B, NF] float32 columns
F_TEMP, F_REP, F_FREQ, F_PRES = 0, 1, 2, 3
NF = 4
# iparams [B, NI + max banned] int64 columns; the banned ids follow from column NI
I_SEED_LO, I_SEED_HI, I_COUNTER, I_MODE, I_SLOT, I_NBAN = 0, 1, 2, 3, 4, 5
NI = 6
MODE_GREEDY, MODE_DRAW, MODE_FILTERED = 0, 1, 2
"""I_MODE values: argmax; draw over the whole distribution; drawn elsewhere (only u is written)."""

BLOCK = 1024
"""Vocabulary chunk each program loads per iteration."""


# the layout's twins that jit code may read
_F_TEMP = tl.constexpr(F_TEMP)
_F_REP = tl.constexpr(F_REP)
_F_FREQ = tl.constexpr(F_FREQ)
_F_PRES = tl.constexpr(F_PRES)
_NF = tl.constexpr(NF)
_I_SEED_LO = tl.constexpr(I_SEED_LO)
_I_SEED_HI = tl.constexpr(I_SEED_HI)
_I_COUNTER = tl.constexpr(I_COUNTER)
_I_MODE = tl.constexpr(I_MODE)
_I_SLOT = tl.constexpr(I_SLOT)
_I_NBAN = tl.constexpr(I_NBAN)
_NI = tl.constexpr(NI)
_MODE_GREEDY = tl.constexpr(MODE_GREEDY)
_MODE_DRAW = tl.constexpr(MODE_DRAW)


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


@triton.jit(do_not_specialize=["ip_stride"])
def _sample_kernel(x_ptr, x_stride, tok_ptr, u_ptr, fp_ptr, ip_ptr, ip_stride, V, stream_hash,
                   BLOCK: tl.constexpr):
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
    if mode == _MODE_GREEDY:
        best = tl.full([BLOCK], float("-inf"), tl.float32)
        best_i = tl.zeros([BLOCK], tl.int32)
        for start in range(0, V, BLOCK):
            offs = start + lanes
            x = tl.load(x_row + offs, mask=offs < V, other=float("-inf"))
            up = x > best  # strict: each lane keeps its first index of its max
            best = tl.where(up, x, best)
            best_i = tl.where(up, offs, best_i)
        top = tl.max(best, axis=0)
        tl.store(tok_ptr + row, tl.min(tl.where(best == top, best_i, V), axis=0).to(tl.int64))
    elif mode == _MODE_DRAW:
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
        target = u * total
        # pass 2: the first token whose running mass passes target; the token must have mass
        # (a masked -inf never), and when rounding leaves target past the walk's total, the
        # last token with mass (as the torch path's clamp)
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
    _check_rows(x, fp, ip.contiguous())
    if counts is None:  # no penalized row: any [1, V] stands in, never read
        counts, seen = x[:1], torch.zeros(1, x.shape[1], dtype=torch.bool, device=x.device)
    if counts.shape[1] != x.shape[1] or seen.shape != counts.shape or counts.stride(1) != 1 or \
            seen.stride() != counts.stride():
        raise ValueError(f"counts and seen must be [C, {x.shape[1]}] alike, got {tuple(counts.shape)}")
    _penalize_kernel[(x.shape[0],)](x, x.stride(0), counts, seen.view(torch.uint8), counts.stride(0), fp, ip,
                                    ip.shape[1], x.shape[1], BLOCK=BLOCK, enable_fp_fusion=False)


def sample_rows(x: torch.Tensor, fp: torch.Tensor, ip: torch.Tensor, stream_hash: int = 0,
                block: int = BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row of float32 logits x [B, V] (penalized): the token [B] int64 of greedy and drawn
    rows (filtered rows' entries are left unset) and every row's uniform [B] float32.
    stream_hash is `_hash32(stream)` of `uniforms` (0 for stream 0)."""
    _check_rows(x, fp, ip)
    b, v = x.shape
    tokens = torch.empty(b, dtype=torch.int64, device=x.device)
    u = torch.empty(b, dtype=torch.float32, device=x.device)
    _sample_kernel[(b,)](x, x.stride(0), tokens, u, fp, ip, ip.shape[1], v, stream_hash, BLOCK=block,
                         enable_fp_fusion=False)
    return tokens, u
