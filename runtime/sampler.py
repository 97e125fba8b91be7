"""Next-token selection for a batch of sequences, each row with its own `SamplingParams`.

Per row, in this order (vLLM's):

    raw logits ─┬─> repetition penalty (prompt + output) ─> frequency/presence (output)
                │     ─> min_tokens mask (EOS, stop ids) ─┬─> greedy: argmax
                │                                         └─> / temperature ─> top-k ─> top-p
                │                                              ─> min-p ─> one draw
                └─> logprobs (log_softmax of the raw logits)

Everything is batched except the random draw: each sampled row takes one uniform number from its
own generator (or the global one) and inverts its own CDF, so a seeded request yields the same
tokens whatever else shares its batch.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from kiln.runtime.sampling_params import Logprob, SamplingParams


@dataclass
class SamplingState:
    """What the sampler needs to know about one generated sequence (owned by the engine)."""

    params: SamplingParams
    prompt_token_ids: list[int]
    output_token_ids: list[int] = field(default_factory=list)
    """The engine appends each sampled token."""
    eos_token_ids: list[int] = field(default_factory=list)
    generator: torch.Generator | None = None
    """Set from params.seed when not given (a CPU generator); None => the global RNG."""

    def __post_init__(self) -> None:
        if self.generator is None and self.params.seed is not None:
            self.generator = torch.Generator().manual_seed(self.params.seed)


@dataclass
class SampleResult:
    """The tokens chosen in one step, one per row."""

    token_ids: list[int]
    logprobs: list[dict[int, Logprob] | None]
    """Per row, None unless params.logprobs is set; else the chosen token's Logprob and the
    top-N tokens' (ranks 1..N), from log_softmax of the raw logits."""


class Sampler:
    """Turns [B, V] logits into one token per row; stateless (state lives in SamplingState)."""

    def __call__(self, logits: torch.Tensor, states: list[SamplingState]) -> SampleResult:
        """Pick one token per row of logits (row i belongs to states[i])."""
        if logits.dim() != 2 or logits.shape[0] != len(states):
            raise ValueError(
                f"logits must be [B, V] with B = len(states) = {len(states)}, got {tuple(logits.shape)}"
            )
        raw = logits.float()  # [B, V]
        x = apply_penalties(raw, states)  # [B, V], a copy
        _mask_min_tokens(x, states)
        tokens = x.argmax(dim=-1)  # [B]
        rows = [i for i, s in enumerate(states) if not s.params.greedy]
        if rows:
            idx = torch.tensor(rows, device=x.device)
            tokens[idx] = _sample(x[idx], [states[i] for i in rows])
        token_ids = tokens.tolist()
        return SampleResult(token_ids, _logprobs(raw, token_ids, states))


def apply_penalties(logits: torch.Tensor, states: list[SamplingState]) -> torch.Tensor:
    """A copy of float32 logits [B, V] with repetition, frequency and presence penalties applied."""
    x = logits.clone()  # [B, V]
    rows = [i for i, s in enumerate(states) if _has_penalty(s.params)]
    if not rows:
        return x
    dev, vocab = x.device, x.shape[1]
    ps = [states[i].params for i in rows]
    sub = x[rows]  # [R, V]
    seen_ids = [
        (states[i].prompt_token_ids + states[i].output_token_ids)
        if p.repetition_penalty != 1
        else []
        for i, p in zip(rows, ps, strict=True)
    ]
    seen = _token_counts(seen_ids, vocab, dev) > 0  # [R, V]
    rep = torch.tensor([p.repetition_penalty for p in ps], device=dev).unsqueeze(1)  # [R, 1]
    sub = torch.where(seen, torch.where(sub > 0, sub / rep, sub * rep), sub)
    counts = _token_counts([states[i].output_token_ids for i in rows], vocab, dev)  # [R, V]
    freq = torch.tensor([p.frequency_penalty for p in ps], device=dev).unsqueeze(1)  # [R, 1]
    pres = torch.tensor([p.presence_penalty for p in ps], device=dev).unsqueeze(1)  # [R, 1]
    x[rows] = sub - freq * counts - pres * (counts > 0).float()
    return x


def _has_penalty(p: SamplingParams) -> bool:
    return p.repetition_penalty != 1 or p.frequency_penalty != 0 or p.presence_penalty != 0


def _token_counts(id_lists: list[list[int]], vocab: int, device: torch.device) -> torch.Tensor:
    """counts[r, t] = occurrences of token t in id_lists[r]; float32 [R, V]."""
    width = max((len(ids) for ids in id_lists), default=0)
    # pad with an extra column V that is dropped afterwards
    ids = torch.tensor([ids + [vocab] * (width - len(ids)) for ids in id_lists], dtype=torch.long)
    ids = ids.reshape(len(id_lists), width).to(device)  # [R, L]
    counts = torch.zeros(len(id_lists), vocab + 1, device=device)  # [R, V + 1]
    counts.scatter_add_(1, ids, torch.ones(ids.shape, device=device))
    return counts[:, :vocab]


def _mask_min_tokens(x: torch.Tensor, states: list[SamplingState]) -> None:
    """In place: forbid stop_token_ids, and EOS unless ignore_eos, below min_tokens (as vLLM)."""
    rows: list[int] = []
    cols: list[int] = []
    for i, s in enumerate(states):
        p = s.params
        if len(s.output_token_ids) >= p.min_tokens:
            continue
        banned = set(p.stop_token_ids) | (set() if p.ignore_eos else set(s.eos_token_ids))
        banned = {t for t in banned if t < x.shape[1]}
        rows += [i] * len(banned)
        cols += sorted(banned)
    if rows:
        x[torch.tensor(rows, device=x.device), torch.tensor(cols, device=x.device)] = float("-inf")


def _sample(x: torch.Tensor, states: list[SamplingState]) -> torch.Tensor:
    """One token id per row of penalized logits x [R, V], drawn from each row's filtered
    distribution with that row's generator; returns [R] int64."""
    dev, vocab = x.device, x.shape[1]
    ps = [s.params for s in states]
    temp = torch.tensor([p.temperature for p in ps], device=dev).unsqueeze(1)  # [R, 1]
    top_k = torch.tensor([p.top_k or vocab for p in ps], device=dev).unsqueeze(1)  # [R, 1]
    top_p = torch.tensor([p.top_p for p in ps], device=dev).unsqueeze(1)  # [R, 1]
    min_p = torch.tensor([p.min_p for p in ps], device=dev).unsqueeze(1)  # [R, 1]

    # Every filter keeps a prefix of the tokens sorted by logit, so work in sorted order.
    sorted_x, order = (x / temp).sort(dim=-1, descending=True, stable=True)  # [R, V] each
    pos = torch.arange(vocab, device=dev)  # [V]
    sorted_x = sorted_x.masked_fill(pos >= top_k, float("-inf"))
    probs = sorted_x.softmax(dim=-1)  # [R, V], renormalized after top-k
    mass_before = probs.cumsum(dim=-1) - probs  # [R, V]
    # top_p == 1 keeps everything even when float rounding pushes the cumulative mass past 1
    keep = (mass_before < top_p) | (top_p >= 1)  # [R, V]
    keep &= probs >= min_p * probs[:, :1]  # the ratio to the max is the same before renormalizing
    keep &= probs > 0
    keep[:, 0] = True
    cdf = (probs * keep).cumsum(dim=-1)  # [R, V]

    u = torch.stack([torch.rand((), generator=s.generator) for s in states]).to(dev)  # [R]
    target = (u * cdf[:, -1]).unsqueeze(1)  # [R, 1]
    choice = torch.searchsorted(cdf, target, right=True).squeeze(1)  # [R]
    choice = torch.minimum(choice, keep.sum(dim=-1) - 1)  # guards u * total rounding up to total
    return order.gather(1, choice.unsqueeze(1)).squeeze(1)


def _logprobs(
    raw: torch.Tensor, token_ids: list[int], states: list[SamplingState]
) -> list[dict[int, Logprob] | None]:
    """Per row: None, or {chosen: Logprob(rank)} plus the top-N of log_softmax(raw) [B, V]."""
    out: list[dict[int, Logprob] | None] = [None] * len(states)
    rows = [i for i, s in enumerate(states) if s.params.logprobs is not None]
    if not rows:
        return out
    dev = raw.device
    lp = raw[rows].log_softmax(dim=-1)  # [R, V]
    chosen = torch.tensor([token_ids[i] for i in rows], device=dev).unsqueeze(1)  # [R, 1]
    chosen_lp = lp.gather(1, chosen)  # [R, 1]
    ranks = (lp > chosen_lp).sum(dim=-1) + 1  # [R]
    n = min(max(states[i].params.logprobs for i in rows), lp.shape[1])
    top_lp, top_ids = lp.topk(n, dim=-1)  # [R, n] each
    chosen_l, ranks_l = chosen_lp.squeeze(1).tolist(), ranks.tolist()
    top_lp_l, top_ids_l = top_lp.tolist(), top_ids.tolist()
    for r, i in enumerate(rows):
        d = {token_ids[i]: Logprob(chosen_l[r], rank=ranks_l[r])}
        for k in range(min(states[i].params.logprobs, n)):
            d[top_ids_l[r][k]] = Logprob(top_lp_l[r][k], rank=k + 1)
        out[i] = d
    return out
