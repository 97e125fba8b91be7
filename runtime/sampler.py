"""Next-token selection for a batch of sequences, each row with its own `SamplingParams`.

Per row, in this order (vLLM's):

    raw logits ─┬─> repetition penalty (prompt + output) ─> frequency/presence (output)
                │     ─> min_tokens mask (EOS, stop ids) ─┬─> greedy: argmax
                │                                         └─> / temperature ─> top-k ─> top-p
                │                                              ─> min-p ─> one draw
                └─> logprobs (log_softmax of the raw logits)

Everything is batched and stays on the logits' device:

- Penalty counts are kept, not recounted: the sampler owns one row of output-token counts per
  penalized request (updated by one scatter per step) and the prompt's seen-mask, built once.
- The draw inverts each row's CDF at one uniform number u = hash(request seed, tokens generated
  so far), computed with integer ops on the device: a seeded request yields the same tokens
  whatever else shares its batch, and no random number crosses from the host. Unseeded requests
  take a seed from the global RNG (or the state's generator) when their state is created.
- Rows without top-k/top-p/min-p draw over the unsorted probabilities (no sort). Filtered rows
  look at their top `CANDIDATES` logits (torch.topk); a row whose kept set may reach past them
  (a flat distribution under top-p) draws from the whole distribution and accepts the token if
  the filters keep it (rejection sampling: exact, no sort, >= top_p acceptance per round), and
  only a row still unaccepted after `REJECTION_ROUNDS` sorts its whole vocabulary.

On a CUDA device (or when asked: `Sampler(use_triton=True)`) the per-row work runs in Triton
kernels (`kiln.kernels.triton_kernels.sampling`): one launch applies penalties and the
min_tokens mask in place, one picks greedy rows' argmax and draws unfiltered rows by a CDF walk
(computing every row's uniform on the device), and filtered rows take torch.topk's candidates
and one launch draws over them. The step's one copy to the host brings the tokens and which
filtered rows may reach past their candidates; only those are redrawn by the torch code below.
The two paths agree exactly except where a uniform lands within float rounding of a CDF
boundary (the kernels sum in another order than torch.cumsum).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from kiln.runtime.pending_sample import PendingSample, SampleResult, index_tensor, logprob_tensors
from kiln.runtime.sampling_params import SamplingParams

CANDIDATES = 1024
"""Logits a filtered row looks at before it falls back to rejection draws, then a full sort."""
REJECTION_ROUNDS = 8
"""Rejection draws a wide top-p/min-p row makes before the full sort (each accepts with
probability >= top_p)."""

_M32 = 0xFFFFFFFF


@dataclass(eq=False)
class SamplingState:
    """What the sampler needs to know about one generated sequence (created by the engine;
    the sampler advances it by one token per call that samples it)."""

    params: SamplingParams
    prompt_token_ids: Sequence[int] = ()
    output_token_ids: Sequence[int] = ()
    """Tokens generated before this state was made (counted once, when first penalized)."""
    eos_token_ids: Sequence[int] = ()
    generator: torch.Generator | None = None
    """Draws the seed of an unseeded request; None => the global RNG."""
    seed: int = field(init=False)
    """params.seed, or a draw from the generator: keys the request's random stream."""
    num_generated: int = field(init=False)
    """Tokens generated so far (the stream's counter, and the min_tokens clock)."""
    banned: list[int] = field(init=False)
    """Token ids forbidden below min_tokens: stop_token_ids, and EOS unless ignore_eos."""

    def __post_init__(self) -> None:
        p = self.params
        if p.seed is not None:
            self.seed = p.seed
        else:
            self.seed = int(torch.randint(0, 1 << 62, (), generator=self.generator))
        self.num_generated = len(self.output_token_ids)
        self.banned = sorted(set(p.stop_token_ids) | (set() if p.ignore_eos else set(self.eos_token_ids)))


class Sampler:
    """Turns [B, V] logits into one token per row. Holds the penalty counts of the requests it
    has penalized (one row each, freed by `release`)."""

    def __init__(self, use_triton: bool | None = None) -> None:
        self.use_triton = use_triton
        """Triton kernels for the per-row work: None => when the logits are on a CUDA device."""
        self._counts: torch.Tensor | None = None  # [C, V] float32: output-token counts
        self._prompt_seen: torch.Tensor | None = None  # [C, V] bool
        self._slot: dict[SamplingState, int] = {}
        self._free: list[int] = []

    def __call__(self, logits: torch.Tensor, states: list[SamplingState]) -> SampleResult:
        """Pick one token per row of logits (row i belongs to states[i]) and advance the states."""
        return self.launch(logits, states).result()

    def launch(self, logits: torch.Tensor, states: list[SamplingState]) -> PendingSample:
        """`__call__` without waiting for the device: the tokens stay on it (and are being
        copied to the host) until `result()`. The states advance now, and the penalty counts
        take the new tokens in stream order, so the next step's sampling may be queued first."""
        if logits.dim() != 2 or logits.shape[0] != len(states):
            raise ValueError(
                f"logits must be [B, V] with B = len(states) = {len(states)}, got {tuple(logits.shape)}"
            )
        raw = logits.float()  # [B, V]; a view when already float32: never written
        pen_rows = [i for i, s in enumerate(states) if _has_penalty(s.params)]
        token_ids: list[int] | None = None  # known on the host already (a filtered triton draw)
        if self.use_triton or (self.use_triton is None and logits.is_cuda):
            # raw may be edited in place when it is the sampler's own copy and no logprobs need it
            owned = raw is not logits and all(s.params.logprobs is None for s in states)
            tokens, token_ids = self._select_triton(raw, owned, states, pen_rows)
        else:
            x = self.apply_penalties(raw, states, pen_rows)
            x = _mask_min_tokens(x, raw, states)
            tokens = _argmax(x)  # [B]
            rows = [i for i, s in enumerate(states) if not s.params.greedy]
            if rows:
                idx = torch.tensor(rows, device=x.device)
                tokens[idx] = _sample(x[idx], [states[i] for i in rows])
        if pen_rows:
            slots = index_tensor([self._slot[states[i]] for i in pen_rows], raw.device)
            chosen = tokens[index_tensor(pen_rows, raw.device)]
            self._counts.index_put_((slots, chosen), torch.ones_like(chosen, dtype=torch.float32), accumulate=True)
        for s in states:
            s.num_generated += 1
        lp_rows = [i for i, s in enumerate(states) if s.params.logprobs is not None]
        return PendingSample(states, lp_rows, [tokens, *logprob_tensors(raw, tokens, states, lp_rows)], token_ids)

    def _select_triton(self, raw: torch.Tensor, owned: bool, states: list[SamplingState],
                       pen_rows: list[int]) -> tuple[torch.Tensor, list[int] | None]:
        """The tokens of float32 logits raw [B, V] by the Triton kernels, on the device [B] and,
        when a filtered row made it look, on the host (raw is written only when `owned`, a copy
        the sampler made). That copy to the host says whether a filtered row must be redrawn
        over its whole vocabulary."""
        from kiln.kernels.triton_kernels import sampling as tk  # triton only where it runs

        dev, vocab = raw.device, raw.shape[1]
        slots = {i: self._slot_of(states[i], vocab, dev) for i in pen_rows}  # may grow the pool: first
        fparams: list[list[float]] = []
        iparams: list[list[int]] = []
        filtered: list[int] = []
        edit = bool(pen_rows)
        for i, s in enumerate(states):
            p = s.params
            banned = [t for t in s.banned if t < vocab] if s.num_generated < p.min_tokens else []
            edit |= bool(banned)
            if p.greedy:
                mode = tk.MODE_GREEDY
            elif (p.top_k and p.top_k < vocab) or p.top_p < 1 or p.min_p > 0:
                mode = tk.MODE_FILTERED
                filtered.append(i)
            else:
                mode = tk.MODE_DRAW
            fparams.append([p.temperature, p.repetition_penalty, p.frequency_penalty, p.presence_penalty,
                            p.top_p, p.min_p])
            iparams.append([s.seed & _M32, (s.seed >> 32) & _M32, s.num_generated & _M32, mode,
                            slots.get(i, -1), len(banned), p.top_k, *banned])
        fp, ip = tk.pack_params(fparams, iparams, dev)
        x = raw
        if edit:
            if not owned or x.stride(1) != 1:
                x = x.clone(memory_format=torch.contiguous_format)
            tk.penalize_(x, self._counts if pen_rows else None, self._prompt_seen if pen_rows else None, fp, ip)
        elif x.stride(1) != 1:
            x = x.contiguous()
        tokens, u, lse = tk.sample_rows(x, fp, ip)  # [B] each
        if not filtered:
            return tokens, None
        fstates = [states[i] for i in filtered]
        idx = torch.tensor(filtered, device=dev)  # [F]
        xf = x if len(filtered) == len(states) else x[idx]  # [F, V]; all filtered: no gather
        temp = fp[idx, tk.F_TEMP].unsqueeze(1)  # [F, 1]
        k = min(vocab, max(CANDIDATES, max(s.params.top_k for s in fstates)))
        # T > 0 keeps the order: dividing the candidates gives exactly (x / T)'s top k
        vals, order = xf.topk(k, dim=-1)  # [F, k] each
        fits = tk.draw_candidates(vals / temp, order, idx, fp, ip, u, lse, tokens, vocab)  # [F]
        host = torch.cat([tokens, fits.long()]).tolist()
        if all(host[len(states):]):
            return tokens, host[: len(states)]
        tokens[idx] = _redraw_wide(xf / temp, u[idx], fstates, tokens[idx], fits)
        return tokens, None

    def release(self, state: SamplingState) -> None:
        """Free a finished request's penalty row."""
        slot = self._slot.pop(state, None)
        if slot is not None:
            self._free.append(slot)

    def apply_penalties(self, logits: torch.Tensor, states: list[SamplingState],
                        rows: list[int] | None = None) -> torch.Tensor:
        """float32 logits [B, V] with repetition, frequency and presence penalties applied to
        `rows` (default: every penalized row); a copy when any row is penalized."""
        if rows is None:
            rows = [i for i, s in enumerate(states) if _has_penalty(s.params)]
        if not rows:
            return logits
        dev = logits.device
        slots = torch.tensor([self._slot_of(states[i], logits.shape[1], dev) for i in rows], device=dev)
        ps = [states[i].params for i in rows]
        idx = torch.tensor(rows, device=dev)
        sub = logits[idx]  # [R, V]
        counts = self._counts[slots]  # [R, V]
        seen = self._prompt_seen[slots] | (counts > 0)  # [R, V]
        rep = torch.tensor([p.repetition_penalty for p in ps], device=dev).unsqueeze(1)  # [R, 1]
        sub = torch.where(seen & (rep != 1), torch.where(sub > 0, sub / rep, sub * rep), sub)
        freq = torch.tensor([p.frequency_penalty for p in ps], device=dev).unsqueeze(1)  # [R, 1]
        pres = torch.tensor([p.presence_penalty for p in ps], device=dev).unsqueeze(1)  # [R, 1]
        x = logits.clone()  # [B, V]
        x[idx] = sub - freq * counts - pres * (counts > 0).float()
        return x

    def _slot_of(self, state: SamplingState, vocab: int, device: torch.device) -> int:
        """The state's counts row; a new one holds its prompt mask and any earlier outputs."""
        if self._counts is None or self._counts.shape[1] != vocab or self._counts.device != device:
            self._counts = torch.zeros(8, vocab, device=device)
            self._prompt_seen = torch.zeros(8, vocab, dtype=torch.bool, device=device)
            self._slot, self._free = {}, list(range(7, -1, -1))
        slot = self._slot.get(state)
        if slot is not None:
            return slot
        if not self._free:  # double the pool
            n = self._counts.shape[0]
            self._counts = torch.cat([self._counts, torch.zeros_like(self._counts)])
            self._prompt_seen = torch.cat([self._prompt_seen, torch.zeros_like(self._prompt_seen)])
            self._free = list(range(2 * n - 1, n - 1, -1))
        slot = self._slot[state] = self._free.pop()
        self._counts[slot] = 0
        self._prompt_seen[slot] = False
        prompt = index_tensor([t for t in state.prompt_token_ids if t < vocab], device)
        self._prompt_seen[slot, prompt] = True
        out = index_tensor([t for t in state.output_token_ids if t < vocab], device)
        self._counts[slot].index_put_((out,), torch.ones(out.shape, device=device), accumulate=True)
        return slot


def _has_penalty(p: SamplingParams) -> bool:
    return p.repetition_penalty != 1 or p.frequency_penalty != 0 or p.presence_penalty != 0


def _argmax(x: torch.Tensor) -> torch.Tensor:
    """Each row's first maximum [B] (int64), as torch.argmax (a NaN counts as the maximum). On
    the CPU numpy's, which is vectorized where torch's is not: 1.4 against 3.6 us for one row of
    4096 float32 logits, 13 against 145 us for 8 rows of 32000 (one thread on a free core)."""
    if x.device.type == "cpu" and x.dtype == torch.float32 and not x.requires_grad:
        return torch.from_numpy(x.numpy().argmax(axis=-1).astype(np.int64, copy=False))
    return x.argmax(dim=-1)


def _mask_min_tokens(x: torch.Tensor, raw: torch.Tensor, states: list[SamplingState]) -> torch.Tensor:
    """x with stop_token_ids, and EOS unless ignore_eos, forbidden below min_tokens (as vLLM);
    copied first if x is still the caller's raw logits."""
    rows: list[int] = []
    cols: list[int] = []
    vocab = x.shape[1]
    for i, s in enumerate(states):
        if s.num_generated < s.params.min_tokens:
            banned = [t for t in s.banned if t < vocab]
            rows += [i] * len(banned)
            cols += banned
    if rows:
        if x is raw:
            x = x.clone()
        x[torch.tensor(rows, device=x.device), torch.tensor(cols, device=x.device)] = float("-inf")
    return x


def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    """(x * c) mod 2^32 for x in [0, 2^32) without overflowing int64."""
    lo = x * (c & 0xFFFF)
    hi = ((x * (c >> 16)) & 0xFFFF) << 16
    return (lo + hi) & _M32


def _hash32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer mixer (Wellons' lowbias32) over int64 tensors holding [0, 2^32)."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def uniforms(seeds: list[int], counters: list[int], device: torch.device, stream: int = 0) -> torch.Tensor:
    """One float32 in [0, 1) per row from (seed, counter), counter-based: [R]. `stream` picks
    an independent sequence (the retries of a rejection draw)."""
    s = torch.tensor([[v & _M32, (v >> 32) & _M32, c & _M32] for v, c in zip(seeds, counters, strict=True)],
                     dtype=torch.int64, device=device).reshape(-1, 3)  # [R, 3]
    h = _hash32(_hash32(_hash32(s[:, 0] ^ 0x9E3779B9) ^ s[:, 1] ^ _hash32(s.new_tensor(stream))) ^ s[:, 2])  # [R]
    return (h >> 8).float() * (1.0 / (1 << 24))


def _sample(x: torch.Tensor, states: list[SamplingState]) -> torch.Tensor:
    """One token id per row of penalized logits x [R, V], drawn from each row's filtered
    distribution at its own uniform; returns [R] int64."""
    dev, vocab = x.device, x.shape[1]
    ps = [s.params for s in states]
    u = uniforms([s.seed for s in states], [s.num_generated for s in states], dev)  # [R]
    temp = torch.tensor([p.temperature for p in ps], device=dev).unsqueeze(1)  # [R, 1]
    x = x / temp
    filtered = [i for i, p in enumerate(ps) if (p.top_k and p.top_k < vocab) or p.top_p < 1 or p.min_p > 0]
    if not filtered:
        return _draw_unsorted(x, u)
    out = torch.empty(len(states), dtype=torch.int64, device=dev)  # [R]
    is_filtered = set(filtered)
    plain = [i for i in range(len(ps)) if i not in is_filtered]
    if plain:
        p_idx = torch.tensor(plain, device=dev)
        out[p_idx] = _draw_unsorted(x[p_idx], u[p_idx])
    f_idx = torch.tensor(filtered, device=dev)
    out[f_idx] = _draw_filtered(x[f_idx], u[f_idx], [states[i] for i in filtered])
    return out


def _draw_filtered(x: torch.Tensor, u: torch.Tensor, states: list[SamplingState]) -> torch.Tensor:
    """One token id per row of temperature-scaled logits x [F, V] whose rows have top-k, top-p
    or min-p, drawn at u [F]; returns [F] int64."""
    dev, vocab = x.device, x.shape[1]
    fps = [s.params for s in states]
    top_k = torch.tensor([min(p.top_k or vocab, vocab) for p in fps], device=dev)  # [F]
    top_p = torch.tensor([p.top_p for p in fps], device=dev)  # [F]
    min_p = torch.tensor([p.min_p for p in fps], device=dev)  # [F]
    k = min(vocab, max(CANDIDATES, int(max(p.top_k or 0 for p in fps))))
    tokens, fits = _draw_top(x, u, top_k, top_p, min_p, k)
    if k < vocab and not bool(fits.all()):
        tokens = _redraw_wide(x, u, states, tokens, fits)
    return tokens


def _redraw_wide(x: torch.Tensor, u: torch.Tensor, states: list[SamplingState], tokens: torch.Tensor,
                 fits: torch.Tensor) -> torch.Tensor:
    """tokens [F] with the rows whose kept set may reach past the candidates (~fits [F]) drawn
    again over their whole temperature-scaled logits x [F, V]: by rejection, then a full sort."""
    vocab = x.shape[1]
    bad = (~fits).nonzero().squeeze(1)  # rows without top-k whose kept set is wide
    bps = [states[int(i)].params for i in bad.tolist()]
    top_k = torch.tensor([min(p.top_k or vocab, vocab) for p in bps], device=x.device)  # [W]
    top_p = torch.tensor([p.top_p for p in bps], device=x.device)  # [W]
    min_p = torch.tensor([p.min_p for p in bps], device=x.device)  # [W]
    redo, done = _draw_rejection(x[bad], [states[int(i)] for i in bad.tolist()], top_p, min_p)
    left = (~done).nonzero().squeeze(1)
    if len(left):
        rows = bad[left]
        redo[left], _ = _draw_top(x[rows], u[rows], top_k[left], top_p[left], min_p[left], vocab)
    tokens = tokens.clone()
    tokens[bad] = redo
    return tokens


def _draw_rejection(x: torch.Tensor, states: list[SamplingState], top_p: torch.Tensor, min_p: torch.Tensor,
                    rounds: int = REJECTION_ROUNDS) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-p/min-p draws without a sort, for rows without top-k: draw from the whole softmax(x)
    [F, V] and accept the token when the filters keep it (the mass of tokens strictly more
    probable is below top_p, and its probability is at least min_p times the largest), else
    draw again from the next stream. Accepted draws follow the filtered distribution exactly;
    the kept set holds at least top_p of the mass, so a round accepts with probability >= top_p.
    Returns the tokens [F] and which rows accepted within `rounds` [F]."""
    probs = x.softmax(dim=-1)  # [F, V]
    cdf = probs.cumsum(dim=-1)  # [F, V], vocabulary order
    top = probs.amax(dim=-1)  # [F]
    tokens = probs.argmax(dim=-1)  # [F]
    done = torch.zeros(len(states), dtype=torch.bool, device=x.device)  # [F]
    seeds, counters = [s.seed for s in states], [s.num_generated for s in states]
    for r in range(1, rounds + 1):
        u = uniforms(seeds, counters, x.device, stream=r)  # [F]
        pick = torch.searchsorted(cdf, (u * cdf[:, -1]).unsqueeze(1), right=True).clamp_(max=x.shape[1] - 1)  # [F, 1]
        p = probs.gather(1, pick)  # [F, 1]
        above = (probs * (probs > p)).sum(dim=-1)  # [F]: mass strictly more probable
        ok = ((above < top_p) | (top_p >= 1)) & (p.squeeze(1) >= min_p * top) & (p.squeeze(1) > 0) & ~done
        tokens = torch.where(ok, pick.squeeze(1), tokens)
        done |= ok
        if bool(done.all()):
            break
    return tokens, done


def _draw_unsorted(x: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Inverse-CDF draw from softmax(x) [R, V] at u [R], in vocabulary order (no sort)."""
    probs = x.softmax(dim=-1)  # [R, V]
    cdf = probs.cumsum(dim=-1)  # [R, V]
    choice = torch.searchsorted(cdf, (u * cdf[:, -1]).unsqueeze(1), right=True).squeeze(1)  # [R]
    # u * total can round up to total: stay on the last token with any mass
    vocab = x.shape[1]
    last = vocab - 1 - (probs.flip(-1) > 0).to(torch.uint8).argmax(dim=-1)  # [R]
    return torch.minimum(choice, last)


def _draw_top(x: torch.Tensor, u: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor, min_p: torch.Tensor,
              k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Draw from the top-k/top-p/min-p filtered softmax(x) [F, V] looking only at the k largest
    logits (k >= every top_k below V); returns the tokens [F] and whether each row's kept set
    surely lies within them [F] (k = V: always)."""
    vocab = x.shape[1]
    vals, order = x.topk(k, dim=-1)  # [F, k] each, descending
    pos = torch.arange(k, device=x.device)  # [k]
    in_k = pos < top_k.unsqueeze(1)  # [F, k]
    # top-k renormalizes over the k kept logits; without top-k the mass is over the whole row
    lse = torch.where(top_k < vocab, vals.masked_fill(~in_k, float("-inf")).logsumexp(-1), x.logsumexp(-1))  # [F]
    probs = (vals - lse.unsqueeze(1)).exp() * in_k  # [F, k]
    mass_before = probs.cumsum(dim=-1) - probs  # [F, k]
    tp = top_p.unsqueeze(1)  # [F, 1]
    # top_p == 1 keeps everything even when float rounding pushes the cumulative mass past 1
    keep = in_k & ((mass_before < tp) | (tp >= 1))  # [F, k]
    keep &= probs >= min_p.unsqueeze(1) * probs[:, :1]  # the ratio to the max is the same before renormalizing
    keep &= probs > 0
    keep[:, 0] = True
    # Every token past the candidates has mass_before >= the candidates' mass and a probability
    # <= the last candidate's: it is dropped when top-k ends inside, top-p is reached, or min-p
    # already drops the last candidate.
    fits = (top_k <= k) | ((top_p < 1) & (probs.sum(-1) >= top_p)) | (probs[:, -1] < min_p * probs[:, 0])
    cdf = (probs * keep).cumsum(dim=-1)  # [F, k]
    choice = torch.searchsorted(cdf, (u * cdf[:, -1]).unsqueeze(1), right=True).squeeze(1)  # [F]
    choice = torch.minimum(choice, keep.sum(dim=-1) - 1)  # guards u * total rounding up to total
    return order.gather(1, choice.unsqueeze(1)).squeeze(1), fits
