"""The sampler: greedy is argmax, seeds are batch-independent, penalties and filters are exact,
and sampled-token frequencies match the target distribution."""

from __future__ import annotations

from collections import Counter

import pytest
import torch
from scipy.stats import chisquare

from kiln.runtime.sampler import (
    CANDIDATES,
    Sampler,
    SamplingState,
    _draw_rejection,
    _draw_top,
    uniforms,
)
from kiln.runtime.sampling_params import SamplingParams as P

ALPHA = 1e-4
"""False-alarm rate of each goodness-of-fit test (they use fixed seeds, so they are deterministic)."""


def _state(params: P, prompt=(0,), output=(), eos=(), generator=None) -> SamplingState:
    return SamplingState(params, list(prompt), list(output), list(eos), generator)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_greedy_is_argmax_of_raw_logits(dtype):
    g = torch.Generator().manual_seed(0)
    logits = (torch.randn(8, 1000, generator=g) * 3).to(dtype)  # [B, V]
    params = [P(temperature=0), P(top_k=1), P(temperature=0, top_p=0.3, min_p=0.5), P(seed=1)] * 2
    before = logits.clone()
    out = Sampler()(logits, [_state(p, prompt=[1, 2, 3]) for p in params])
    want = logits.argmax(dim=-1).tolist()
    assert [t for t, p in zip(out.token_ids, params, strict=True) if p.greedy] == [
        w for w, p in zip(want, params, strict=True) if p.greedy
    ]
    assert torch.equal(logits, before)  # the caller's logits are not modified
    assert out.logprobs == [None] * 8


def test_greedy_takes_the_first_maximum_and_a_nan_as_torch_does():
    logits = torch.randn(6, 4096, generator=torch.Generator().manual_seed(1))  # [B, V]
    logits[1, 7] = float("nan")
    logits[2] = 0.5  # all tied: the first
    logits[3, [9, 3000]] = float("inf")
    logits[4, :100] = float("-inf")
    rows = torch.randn(10, 4096)[3:9]  # rows of a larger buffer, as the arena holds the logits
    rows.copy_(logits)
    for x in (logits, rows):
        out = Sampler()(x, [_state(P(temperature=0)) for _ in range(6)])
        assert out.token_ids == logits.argmax(dim=-1).tolist() == [out.token_ids[0], 7, 0, 9, *out.token_ids[4:]]


def _run(
    states: list[SamplingState], steps: int, vocab: int, seed: int, slot_of=None, use_triton=None
) -> list[list[int]]:
    """Sample `steps` tokens for every state from seeded random logits; each state's tokens."""
    g = torch.Generator().manual_seed(seed)
    sampler = Sampler(use_triton)
    tokens: list[list[int]] = [[] for _ in states]
    for step in range(steps):
        logits = torch.randn(len(states), vocab, generator=g)  # [B, V]
        if slot_of is not None:  # give the probe row the same logits whatever its position
            probe_logits = torch.randn(vocab, generator=torch.Generator().manual_seed(1000 + step))
            logits[slot_of(step)] = probe_logits
        res = sampler(logits, states)  # advances every state by one token
        for out, t in zip(tokens, res.token_ids, strict=True):
            out.append(t)
    return tokens


@pytest.mark.parametrize("use_triton", [False, True], ids=["torch", "triton"])
def test_seeded_sampling_is_independent_of_the_batch(use_triton):
    probe = P(
        seed=7, temperature=0.9, top_p=0.95, top_k=50, presence_penalty=0.3, repetition_penalty=1.1
    )
    vocab, steps = 64, 40
    alone = _state(probe, prompt=[3, 4])
    (alone_ids,) = _run([alone], steps, vocab, seed=0, slot_of=lambda step: 0, use_triton=use_triton)
    others = [P(temperature=0), P(seed=8, top_k=5), P(), P(temperature=1.5, min_p=0.1), P(seed=7)]
    torch.manual_seed(123)  # the unseeded rows draw from the global RNG in between
    batch = [_state(p) for p in others]
    batch.insert(3, _state(probe, prompt=[3, 4]))
    batch_ids = _run(batch, steps, vocab, seed=1, slot_of=lambda step: 3, use_triton=use_triton)
    assert batch_ids[3] == alone_ids
    again = _state(probe, prompt=[3, 4])
    again_ids = _run(
        [_state(P()), _state(P(temperature=0)), again], steps, vocab, seed=2, slot_of=lambda step: 2,
        use_triton=use_triton,
    )[2]
    assert again_ids == alone_ids
    if use_triton:  # and the same tokens as the torch path
        torch_ids = _run([_state(probe, prompt=[3, 4])], steps, vocab, seed=0, slot_of=lambda step: 0)[0]
        assert torch_ids == alone_ids


def test_different_seeds_differ():
    runs = [_run([_state(P(seed=s))], 40, 32, seed=0, slot_of=lambda step: 0)[0] for s in (1, 2)]
    assert runs[0] != runs[1]
    assert len(set(runs[0])) > 5  # actually random, not stuck on one token


def _reference_penalties(raw: torch.Tensor, states: list[SamplingState]) -> torch.Tensor:
    """Straightforward per-row, per-token penalties (HF/vLLM semantics), in float64."""
    out = raw.double().clone()
    for i, s in enumerate(states):
        p = s.params
        for t in set(s.prompt_token_ids + s.output_token_ids):
            if p.repetition_penalty != 1:
                v = out[i, t].item()
                out[i, t] = v / p.repetition_penalty if v > 0 else v * p.repetition_penalty
        for t, c in Counter(s.output_token_ids).items():
            out[i, t] -= p.frequency_penalty * c + p.presence_penalty
    return out


def test_penalties_change_exactly_the_expected_logits():
    g = torch.Generator().manual_seed(0)
    raw = torch.randn(5, 40, generator=g) * 4  # [B, V]
    states = [
        _state(P(repetition_penalty=1.3), prompt=[1, 2, 2, 30], output=[5, 5, 6]),
        _state(P(frequency_penalty=0.5), prompt=[1, 2], output=[7, 7, 7, 8]),
        _state(P(presence_penalty=-1.25), prompt=[9], output=[7, 7, 8, 39]),
        _state(
            P(repetition_penalty=0.7, frequency_penalty=-0.4, presence_penalty=1.5),
            prompt=[0, 3],
            output=[3, 3, 4],
        ),
        _state(P(), prompt=[1, 2, 3], output=[4, 5]),  # no penalties: untouched
    ]
    got = Sampler().apply_penalties(raw, states)
    want = _reference_penalties(raw, states)
    changed = want != raw.double()
    assert torch.equal(got[~changed], raw[~changed])  # everything else is bit-identical
    torch.testing.assert_close(got.double(), want, rtol=1e-6, atol=1e-6)
    assert changed[0].nonzero().flatten().tolist() == [1, 2, 5, 6, 30]
    assert changed[4].sum() == 0


@pytest.mark.parametrize("use_triton", [False, True], ids=["torch", "triton"])
def test_min_tokens_blocks_eos_and_stop_ids(use_triton):
    vocab = 10
    logits = torch.zeros(4, vocab)
    logits[:, 1] = 50.0  # EOS would always win
    logits[:, 5] = 40.0  # then the stop token
    states = [
        _state(P(temperature=0, min_tokens=3, stop_token_ids=[5]), eos=[1]),
        _state(P(seed=0, min_tokens=3, stop_token_ids=[5]), eos=[1]),
        _state(P(temperature=0, min_tokens=3, stop_token_ids=[5], ignore_eos=True), eos=[1]),
        _state(P(temperature=0, min_tokens=0), eos=[1]),
    ]
    sampler = Sampler(use_triton)
    for _ in range(3):
        res = sampler(logits, states)
        assert res.token_ids[0] not in (1, 5) and res.token_ids[1] not in (1, 5)
        assert res.token_ids[2] == 1  # ignore_eos: EOS ends nothing, so it is not masked (as vLLM)
        assert res.token_ids[3] == 1
    assert sampler(logits, states).token_ids[:2] == [1, 1]  # min_tokens reached


@pytest.mark.parametrize("use_triton", [False, True], ids=["torch", "triton"])
@pytest.mark.parametrize("n", [0, 1, 5])
def test_logprobs_are_of_the_raw_logits(n, use_triton):
    g = torch.Generator().manual_seed(3)
    raw = torch.randn(3, 50, generator=g).to(torch.bfloat16)  # [B, V]
    states = [
        _state(P(logprobs=n, seed=1, repetition_penalty=1.5, temperature=2.0), prompt=[0, 1, 2]),
        _state(P(logprobs=n, temperature=0, frequency_penalty=2.0), output=[int(raw[1].argmax())]),
        _state(P(seed=2)),
    ]
    res = Sampler(use_triton)(raw, states)
    lp = raw.float().log_softmax(dim=-1)  # [B, V]
    for i in range(2):
        d, chosen = res.logprobs[i], res.token_ids[i]
        assert d[chosen].logprob == pytest.approx(lp[i, chosen].item(), abs=1e-6)
        assert d[chosen].rank == int((lp[i] > lp[i, chosen]).sum()) + 1
        top = sorted((x.rank, t, x.logprob) for t, x in d.items() if x.rank <= n)
        assert [r for r, _, _ in top] == list(range(1, n + 1))
        assert [t for _, t, _ in top] == lp[i].topk(n).indices.tolist()
        assert set(d) == {chosen, *(t for _, t, _ in top)}
    assert res.token_ids[1] != int(raw[1].argmax())  # the penalty moved greedy, not the logprobs
    assert res.logprobs[2] is None


def _target(logits: torch.Tensor, p: P) -> torch.Tensor:
    """The distribution the sampler should draw from, computed independently in float64."""
    probs = (logits.double() / p.temperature).softmax(-1)  # [V]
    order = probs.argsort(descending=True)
    keep = torch.zeros_like(probs, dtype=torch.bool)
    k = p.top_k or len(probs)
    keep[order[:k]] = True
    probs = torch.where(keep, probs, 0.0)
    probs = probs / probs.sum()
    if p.top_p < 1:
        mass = 0.0
        for t in order.tolist():
            if mass >= p.top_p:
                keep[t] = False
            else:
                assert abs(mass + probs[t].item() - p.top_p) > 1e-3, "top_p too close to a boundary"
            mass += probs[t].item()
    keep &= probs >= p.min_p * probs.max()
    probs = torch.where(keep, probs, 0.0)
    return probs / probs.sum()


LOGITS = torch.tensor([1.2, -0.3, 2.5, 0.1, -1.0, 1.9, 0.6, -2.2, 0.9, -0.6, 1.5, 0.0])


@pytest.mark.parametrize(
    "params",
    [
        P(),
        P(temperature=0.6),
        P(temperature=1.8),
        P(top_k=4),
        P(top_k=100),
        P(top_p=0.8),
        P(min_p=0.2),
        P(temperature=0.7, top_k=7, top_p=0.85, min_p=0.05),
    ],
    ids=["plain", "t0.6", "t1.8", "top_k4", "top_k_over_vocab", "top_p0.8", "min_p0.2", "all"],
)
def test_sampled_frequencies_match_target_distribution(params):
    """Chi-square goodness of fit over 20k draws; each test fails by chance with prob. ALPHA, but
    the draws are seeded, so the outcome is fixed. Excluded tokens must never appear."""
    draws = 20_000
    g = torch.Generator().manual_seed(2024)
    states = [_state(params, generator=g) for _ in range(draws)]
    res = Sampler()(LOGITS.expand(draws, -1), states)
    counts = torch.bincount(torch.tensor(res.token_ids), minlength=len(LOGITS)).double()
    target = _target(LOGITS, params)
    kept = target > 0
    assert counts[~kept].sum() == 0, f"excluded tokens sampled: {counts}"
    assert kept.sum() >= 2
    p = chisquare(counts[kept].numpy(), (target[kept] * draws).numpy()).pvalue
    assert p > ALPHA, f"p={p:.2e}: counts {counts.tolist()} vs expected {(target * draws).tolist()}"


def test_unseeded_rows_use_the_global_rng():
    logits = torch.zeros(16, 1000)
    torch.manual_seed(5)
    a = Sampler()(logits, [_state(P()) for _ in range(16)]).token_ids
    torch.manual_seed(5)
    b = Sampler()(logits, [_state(P()) for _ in range(16)]).token_ids
    assert a == b and len(set(a)) > 1


def test_rejects_mismatched_batch():
    with pytest.raises(ValueError, match="len\\(states\\)"):
        Sampler()(torch.zeros(2, 5), [_state(P())])


@pytest.mark.parametrize("use_triton", [False, True], ids=["torch", "triton"])
def test_incremental_penalty_counts_equal_a_recount(use_triton):
    """After many steps the kept counts give exactly the penalties of a from-scratch recount."""
    vocab = 30
    params = [P(seed=1, repetition_penalty=1.4, frequency_penalty=0.3),
              P(seed=2, presence_penalty=0.8), P(temperature=0, frequency_penalty=-0.2), P(seed=3)]
    prompts = [[1, 2, 2], [5], [7, 8, 9], [0]]
    states = [_state(p, prompt=pr) for p, pr in zip(params, prompts, strict=True)]
    sampler = Sampler(use_triton)
    tokens = _run_with(sampler, states, steps=25, vocab=vocab)
    sampler.release(states[3])  # releasing a row leaves the others intact
    raw = torch.randn(4, vocab, generator=torch.Generator().manual_seed(9)) * 3  # [B, V]
    got = sampler.apply_penalties(raw, states)
    fresh = [_state(p, prompt=pr, output=t) for p, pr, t in zip(params, prompts, tokens, strict=True)]
    torch.testing.assert_close(got.double(), _reference_penalties(raw, fresh), rtol=1e-6, atol=1e-6)
    assert any(len(set(t)) > 3 for t in tokens)


def _run_with(sampler: Sampler, states: list[SamplingState], steps: int, vocab: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(4)
    tokens: list[list[int]] = [[] for _ in states]
    for _ in range(steps):
        res = sampler(torch.randn(len(states), vocab, generator=g), states)
        for out, t in zip(tokens, res.token_ids, strict=True):
            out.append(t)
    return tokens


def test_uniforms_depend_only_on_seed_and_counter():
    dev = torch.device("cpu")
    a = uniforms([7, 2**40 + 3, 7], [0, 5, 1], dev)
    b = uniforms([7], [1], dev)
    assert a[2] == b[0] and a[0] != a[2]
    u = uniforms([11] * 20_000, list(range(20_000)), dev)
    assert 0 <= u.min() and u.max() < 1
    hist = torch.histc(u, bins=10, min=0, max=1)
    assert chisquare(hist.numpy()).pvalue > ALPHA


@pytest.mark.parametrize("scale", [1.0, 6.0])  # flat: top-p rows fall back; peaked: they fit
def test_candidate_filtering_equals_the_full_sort(scale):
    """Looking at the top CANDIDATES logits picks exactly the token the full sort picks for the
    same uniform, and the rows whose kept set may reach past them are the ones that fall back."""
    g = torch.Generator().manual_seed(5)
    vocab, rows = 5000, 64
    x = torch.randn(rows, vocab, generator=g) * scale  # [R, V]
    u = torch.rand(rows, generator=g)  # [R]
    top_k = torch.tensor([vocab, 40, 700, vocab] * (rows // 4))
    top_p = torch.tensor([0.9, 1.0, 0.95, 1.0] * (rows // 4))
    min_p = torch.tensor([0.0, 0.0, 0.0, 0.05] * (rows // 4))
    want, fits = _draw_top(x, u, top_k, top_p, min_p, vocab)
    assert fits.all()
    got, fits = _draw_top(x, u, top_k, top_p, min_p, CANDIDATES)
    assert torch.equal(got[fits], want[fits])
    assert fits[1::4].all() and fits[2::4].all()  # top-k within the candidates always fits
    assert bool(fits[0::4].all()) == (scale > 1)  # flat top-p 0.9 keeps more than the candidates
    states = [_state(P(top_k=int(k) if k < vocab else 0, top_p=float(p), min_p=float(m), seed=i))
              for i, (k, p, m) in enumerate(zip(top_k, top_p, min_p, strict=True))]
    res = torch.tensor(Sampler()(x, states).token_ids)
    exact, _ = _draw_top(x, uniforms(list(range(rows)), [0] * rows, x.device), top_k, top_p, min_p, vocab)
    assert torch.equal(res[fits], exact[fits])
    # rows that do not fit are drawn by rejection: each token is one the filters keep
    probs = x.softmax(-1)
    for r in (~fits).nonzero().squeeze(1).tolist():
        t = int(res[r])
        above = probs[r][probs[r] > probs[r, t]].sum()
        assert above < top_p[r] and probs[r, t] >= min_p[r] * probs[r].max()


@pytest.mark.parametrize(("top_p", "min_p"), [(0.6, 0.0), (0.97, 0.2)])
def test_rejection_draws_follow_the_filtered_distribution(top_p, min_p):
    """Draws without a sort for wide top-p / min-p rows: the frequencies over many seeds match
    the top-p / min-p filtered, renormalized softmax."""
    g = torch.Generator().manual_seed(9)
    logits = torch.randn(40, generator=g)  # [V]
    n = 20_000
    x = logits.expand(n, -1)  # [N, V]
    states = [_state(P(top_p=top_p, min_p=min_p, seed=i)) for i in range(n)]
    tokens, done = _draw_rejection(x, states, torch.full((n,), top_p), torch.full((n,), min_p))
    assert done.float().mean() > 0.99
    probs = logits.softmax(-1)
    order = probs.argsort(descending=True)
    mass_before = probs[order].cumsum(0) - probs[order]
    keep = torch.zeros_like(probs, dtype=torch.bool)
    keep[order] = (mass_before < top_p) & (probs[order] >= min_p * probs.max())
    want = torch.where(keep, probs, 0.0)
    counts = torch.bincount(tokens[done], minlength=40).double()
    assert counts[~keep].sum() == 0
    w = want.double()[keep]
    expected = w / w.sum() * counts.sum()
    assert chisquare(counts[keep].numpy(), expected.numpy()).pvalue > ALPHA
