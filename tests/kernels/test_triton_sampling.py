"""The sampler's Triton kernels against its torch path (`Sampler(use_triton=False)`).

Without a CUDA device the kernels run in Triton's interpreter (bf16 is broken there: float32 and
float16 logits, small vocabularies); `gpu` tests compare the two paths on the device at a 128k
vocabulary in bfloat16 and float32. Greedy tokens, penalties and uniforms are exact; a draw's
CDF walk sums in another order than torch.cumsum, so drawn tokens are compared exactly on seeded
random logits (where u lands within rounding of a boundary with probability ~1e-6) and are
otherwise checked to invert the float64 CDF within 1e-4.
"""

from __future__ import annotations

import pytest
import torch
from scipy.stats import chisquare

from kiln.kernels.triton_kernels import sampling as tk
from kiln.runtime.sampler import CANDIDATES, Sampler, SamplingState, _draw_top, uniforms
from kiln.runtime.sampling_params import SamplingParams as P

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
ALPHA = 1e-4
"""False-alarm rate of the goodness-of-fit test (seeded, so its outcome is fixed)."""


def _state(params: P, prompt=(0,), output=(), eos=()) -> SamplingState:
    return SamplingState(params, list(prompt), list(output), list(eos))


def _iparams(seeds: list[int], counters: list[int], modes: list[int]) -> list[list[int]]:
    m = 0xFFFFFFFF
    return [[s & m, (s >> 32) & m, c & m, mode, -1, 0, 0] for s, c, mode in zip(seeds, counters, modes, strict=True)]


def _rows(x: torch.Tensor, temps: list[float], seeds: list[int], counters: list[int], modes: list[int],
          block: int = tk.BLOCK):
    fp, ip = tk.pack_params([[t, 1.0, 0.0, 0.0, 1.0, 0.0] for t in temps], _iparams(seeds, counters, modes), x.device)
    return tk.sample_rows(x, fp, ip, block=block)[:2]


def _check_inverts_cdf(x: torch.Tensor, temps: list[float], u: torch.Tensor, tokens: torch.Tensor) -> None:
    """Each token t has cdf[t - 1] <= u <= cdf[t] (float64 softmax(x / T), 1e-4 slack) and mass."""
    probs = (x.double() / torch.tensor(temps, dtype=torch.float64, device=x.device).unsqueeze(1)).softmax(-1)
    cdf = probs.cumsum(-1)
    for r, t in enumerate(tokens.tolist()):
        lo = cdf[r, t - 1].item() if t > 0 else 0.0
        assert probs[r, t] > 0 and lo - 1e-4 <= u[r].item() <= cdf[r, t].item() + 1e-4, (r, t, u[r].item())


def test_uniforms_are_bit_identical_to_the_torch_ones():
    seeds = [0, 7, 2**40 + 3, 2**62 - 1, 123456789, 5, 2**32, 99]
    counters = [0, 5, 1, 2**31 + 7, 0, 1000, 3, 2**32 - 1]
    x = torch.zeros(len(seeds), 16, device=DEVICE)
    _, u = _rows(x, [1.0] * len(seeds), seeds, counters, [tk.MODE_FILTERED] * len(seeds))
    assert torch.equal(u, uniforms(seeds, counters, DEVICE))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("vocab", [1000, 5003, 2 * tk.ARGMAX_CHUNK + 77])  # the last: a row in parts
def test_greedy_is_the_first_index_of_the_max(dtype, vocab):
    g = torch.Generator().manual_seed(vocab)
    x = (torch.randn(6, vocab, generator=g) * 3).to(dtype)  # [B, V]: float16 rounding makes ties
    x[1, [17, 900, vocab - 1]] = 40.0  # a tie across chunks (and parts): the first wins
    x[5, [vocab - 3, vocab // 2]] = 45.0  # a tie across parts, the later part's index lower in its part
    x[2] = float("-inf")  # nothing has mass: index 0, as torch.argmax
    x[3, vocab - 1] = 50.0  # the last, in the masked tail of the last chunk
    x[4, :] = 1.0
    x = x.float().to(DEVICE)
    tokens, _ = _rows(x, [0.0] * 6, list(range(6)), [0] * 6, [tk.MODE_GREEDY] * 6)
    assert tokens.tolist() == x.argmax(-1).tolist()


@pytest.mark.parametrize("vocab", [1000, 5003])
def test_draws_equal_the_torch_path(vocab):
    g = torch.Generator().manual_seed(1)
    rows = 24
    x = torch.randn(rows, vocab, generator=g) * torch.linspace(0.5, 6, rows).unsqueeze(1)  # flat to peaked
    x[5, 300:] = float("-inf")  # mass only at the start
    x[6, : vocab - 3] = float("-inf")  # only at the end
    temps = [0.4, 0.8, 1.0, 1.7] * (rows // 4)
    states = [_state(P(seed=i, temperature=t)) for i, t in enumerate(temps)]
    want = Sampler(use_triton=False)(x, states).token_ids
    for s in states:
        s.num_generated = 0
    got = Sampler(use_triton=True)(x, states).token_ids
    assert got == want
    tokens, u = _rows(x, temps, list(range(rows)), [0] * rows, [tk.MODE_DRAW] * rows)
    assert tokens.tolist() == want
    _check_inverts_cdf(x, temps, u, tokens)
    assert 5 <= min(want[5], 299) and want[5] < 300 and want[6] >= vocab - 3


def test_a_uniform_near_one_stays_on_the_last_token_with_mass():
    u_all = uniforms(list(range(20_000)), [0] * 20_000, torch.device("cpu"))
    seeds = u_all.topk(4).indices.tolist()  # u * total may round past the walk's total
    vocab = 3000
    x = torch.full((4, vocab), float("-inf"))
    x[:, :2100] = torch.randn(4, 2100, generator=torch.Generator().manual_seed(0))
    x[:, 2100] = 30.0  # nearly all the mass on the last token with mass; -inf after it
    tokens, u = _rows(x.to(DEVICE), [1.0] * 4, seeds, [0] * 4, [tk.MODE_DRAW] * 4)
    assert (u > 0.999).all() and tokens.tolist() == [2100] * 4


def test_penalties_and_mask_equal_the_torch_path():
    g = torch.Generator().manual_seed(2)
    vocab = 1500
    params = [
        P(repetition_penalty=1.3, seed=1),
        P(frequency_penalty=0.5, presence_penalty=-0.7, temperature=0),
        P(repetition_penalty=0.8, frequency_penalty=-0.4, min_tokens=5, stop_token_ids=[9, 1400], seed=3),
        P(min_tokens=5, stop_token_ids=[3], temperature=0),  # the mask alone, no penalty row
        P(seed=4),
    ]
    outputs = [[5, 5, 6, 1200], [7, 7, 7, 8], [3, 3, 1499], [1], []]

    def make():
        return [_state(p, prompt=[1, 2, 2, 1100], output=o, eos=[0, 1400]) for p, o in zip(params, outputs, strict=True)]

    raw = torch.randn(len(params), vocab, generator=g) * 4
    raw[:, [0, 3, 9, 1400]] = 60.0  # masked ids would win
    ref, tri = Sampler(use_triton=False), Sampler(use_triton=True)
    a, b = make(), make()
    want = ref.apply_penalties(raw, a)
    want[2, [0, 9, 1400]] = float("-inf")
    want[3, [0, 3, 1400]] = float("-inf")
    slots = {i: tri._slot_of(b[i], vocab, raw.device) for i in range(3)}
    iparams = [[0, 0, 0, tk.MODE_GREEDY, slots.get(i, -1), 0, 0] for i in range(5)]
    iparams[2][5:] = [3, 0, 0, 9, 1400]
    iparams[3][5:] = [3, 0, 0, 3, 1400]
    fp, ip = tk.pack_params([[1.0, p.repetition_penalty, p.frequency_penalty, p.presence_penalty, 1.0, 0.0]
                             for p in params],
                            iparams, raw.device)
    got = raw.clone()
    tk.penalize_(got, tri._counts, tri._prompt_seen, fp, ip)
    assert torch.equal(got, want)
    # and through the samplers, for several steps: greedy rows exact, drawn rows seeded alike
    a, b = make(), make()
    for step in range(6):
        logits = (raw + torch.randn(raw.shape, generator=g)).to(torch.float16 if step % 2 else torch.float32)
        assert ref(logits, a).token_ids == tri(logits, b).token_ids


@pytest.mark.parametrize("scale", [1.0, 6.0])  # flat: top-p rows reach past the candidates; peaked: fit
def test_candidate_draws_equal_the_torch_ones(scale):
    """draw_candidates picks _draw_top's token over the same candidates and uniforms, and flags
    the same rows as reaching past them; the sampler then gives the torch path's tokens."""
    g = torch.Generator().manual_seed(5)
    vocab, rows = 5000, 16
    x = torch.randn(rows, vocab, generator=g) * scale  # [R, V]
    params = [P(seed=i, **kw) for i, kw in enumerate([
        dict(top_p=0.9), dict(top_k=40), dict(top_k=700, top_p=0.95, temperature=0.7), dict(min_p=0.05),
        dict(top_k=3000, min_p=0.01), dict(top_p=0.5, min_p=0.3, temperature=1.4), dict(top_k=2), dict(top_p=0.99),
    ] * 2)]
    temps = torch.tensor([p.temperature for p in params]).unsqueeze(1)  # [R, 1]
    u = uniforms(list(range(rows)), [0] * rows, x.device)  # [R]
    top_k = torch.tensor([min(p.top_k or vocab, vocab) for p in params])
    top_p = torch.tensor([p.top_p for p in params])
    min_p = torch.tensor([p.min_p for p in params])
    k = max(CANDIDATES, 3000)
    want, want_fits = _draw_top(x / temps, u, top_k, top_p, min_p, k)
    fp, ip = tk.pack_params(
        [[p.temperature, 1.0, 0.0, 0.0, p.top_p, p.min_p] for p in params],
        [[i, 0, 0, tk.MODE_FILTERED, -1, 0, p.top_k] for i, p in enumerate(params)], x.device)
    x, fp, ip = x.to(DEVICE), fp.to(DEVICE), ip.to(DEVICE)
    tokens, u_k, lse = tk.sample_rows(x, fp, ip)
    vals, order = x.topk(k, dim=-1)
    fits = tk.draw_candidates(vals / temps.to(DEVICE), order, torch.arange(rows, device=DEVICE), fp, ip, u_k, lse,
                              tokens, vocab)
    assert fits.tolist() == want_fits.tolist()
    assert bool(fits.all()) == (scale > 1)
    assert tokens.cpu()[want_fits].tolist() == want[want_fits].tolist()
    states = [_state(p) for p in params]
    ref = Sampler(use_triton=False)(x.cpu(), states).token_ids
    for s in states:
        s.num_generated = 0
    assert Sampler(use_triton=True)(x, states).token_ids == ref


def test_a_new_vocabulary_with_only_masked_rows():
    """The penalty pool of an earlier vocabulary is neither read nor checked by mask-only steps."""
    sampler = Sampler(use_triton=True)
    sampler(torch.randn(1, 100), [_state(P(temperature=0, presence_penalty=1.0))])
    logits = torch.zeros(2, 200)
    logits[:, 150] = 9.0
    states = [_state(P(temperature=0, min_tokens=2), eos=[150]), _state(P(seed=0, min_tokens=2), eos=[150])]
    assert 150 not in sampler(logits, states).token_ids


def test_seeded_rows_do_not_depend_on_the_batch():
    vocab = 777
    probe = P(seed=11, temperature=0.9, presence_penalty=0.4, repetition_penalty=1.2)
    logits = torch.randn(12, vocab, generator=torch.Generator().manual_seed(3))  # row 0: the probe's
    alone, mixed = [_state(probe)], [_state(P(temperature=0)), _state(P(seed=2, top_k=5)), _state(probe)]
    tri_a, tri_m = Sampler(use_triton=True), Sampler(use_triton=True)
    for step in range(4):
        x = logits[step : step + 3].flip(0).contiguous()  # the probe's logits sit last in the batch
        got_a = tri_a(x[2:], alone).token_ids[0]
        assert tri_m(x, mixed).token_ids[2] == got_a


@pytest.mark.parametrize("temperature", [1.0, 0.6])
def test_draw_frequencies_match_the_softmax(temperature):
    """A small goodness-of-fit check (the interpreter runs one program per draw); the exact
    checks above already pin the walk to the CDF and u to the tested uniforms."""
    logits = torch.tensor([1.2, -0.3, 0.5, float("-inf"), 0.9, -0.6, 0.2])
    n = 500
    x = logits.expand(n, -1).contiguous()
    # 2-token chunks: the walk crosses chunks
    tokens, _ = _rows(x.to(DEVICE), [temperature] * n, list(range(n)), [7] * n, [tk.MODE_DRAW] * n, block=2)
    counts = torch.bincount(tokens.cpu(), minlength=len(logits)).double()
    probs = (logits.double() / temperature).softmax(-1)
    kept = probs > 0
    assert counts[~kept].sum() == 0
    assert chisquare(counts[kept].numpy(), (probs[kept] * n).numpy()).pvalue > ALPHA


def test_launchers_check_their_inputs():
    fp, ip = tk.pack_params([[1.0, 1.0, 0.0, 0.0, 1.0, 0.0]], _iparams([1], [0], [tk.MODE_DRAW]), DEVICE)
    with pytest.raises(ValueError, match="float32"):
        tk.sample_rows(torch.zeros(1, 8, dtype=torch.float16, device=DEVICE), fp, ip)
    with pytest.raises(ValueError, match="params"):
        tk.sample_rows(torch.zeros(2, 8, device=DEVICE), fp, ip)


# -- on the device, at serving sizes ---------------------------------------------------------------

GPU_PARAMS = [P(temperature=0), P(seed=1), P(seed=2, temperature=0.8), P(seed=3, temperature=0.8, top_p=0.9),
              P(seed=4, top_k=50, repetition_penalty=1.2), P(temperature=0, frequency_penalty=0.5, presence_penalty=0.5),
              P(seed=5, min_tokens=4, stop_token_ids=[7], min_p=0.05), P(seed=6, temperature=1.3)]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("batch", [1, 64])
def test_triton_path_equals_torch_path_gpu(dtype, batch):
    vocab = 128256
    g = torch.Generator(device="cuda").manual_seed(batch)
    params = [GPU_PARAMS[i % len(GPU_PARAMS)] for i in range(batch)]

    def make():
        return [_state(p, prompt=[1, 2, 3, 500], output=[9, 9, 100_000], eos=[128001]) for p in params]

    a, b = make(), make()
    ref, tri = Sampler(use_triton=False), Sampler()  # the default on CUDA logits: Triton
    mismatched = 0
    for _ in range(4):
        logits = (torch.randn(batch, vocab, device="cuda", generator=g) * 4).to(dtype)
        want, got = ref(logits, a).token_ids, tri(logits, b).token_ids
        for w, t, p in zip(want, got, params, strict=True):
            if p.greedy:
                assert w == t
            mismatched += w != t
    assert mismatched <= max(1, 4 * batch // 100)  # only where u lands within rounding of a boundary
    # the unfiltered draws invert the float64 CDF at their uniforms
    x = (torch.randn(batch, vocab, device="cuda", generator=g) * 2).float()
    temps = [0.8] * batch
    tokens, u = _rows(x, temps, list(range(batch)), [0] * batch, [tk.MODE_DRAW] * batch)
    _check_inverts_cdf(x, temps, u, tokens)
