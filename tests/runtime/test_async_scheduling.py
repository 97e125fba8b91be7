"""Async scheduling (step n+1 launched before step n's tokens reach the host) gives exactly the
outputs of synchronous stepping: greedy and seeded sampling with penalties, logprobs, stop
strings and stop ids, n > 1, under preemption, chunked prefill and prefix caching, and aborts.
On the CPU the "device" is the CPU, so the placeholder bookkeeping, the input_ids fill from the
previous step's tokens and the dropped rows run exactly as on CUDA."""

from __future__ import annotations

import pytest
from test_engine_parity import MAX_TOKENS, SCENARIOS, _prompts

from kiln import LLM, SamplingParams
from kiln.runtime.engine import LLMEngine
from kiln.runtime.request import PLACEHOLDER
from kiln.runtime.sampling_params import Logprob

ARCHS = ["llama", "gemma2", "gpt2"]
"""A global-attention model, one with sliding windows and soft-caps, one with learned positions."""

SAMPLED = [
    SamplingParams(temperature=0.8, seed=11, max_tokens=MAX_TOKENS, ignore_eos=True),
    SamplingParams(temperature=1.0, top_p=0.9, top_k=20, seed=12, max_tokens=MAX_TOKENS - 3, ignore_eos=True,
                   repetition_penalty=1.3, frequency_penalty=0.5, presence_penalty=0.2),
    SamplingParams(temperature=0, max_tokens=MAX_TOKENS, logprobs=3, ignore_eos=True),
    SamplingParams(temperature=0.7, seed=13, n=3, max_tokens=MAX_TOKENS - 5, ignore_eos=True, logprobs=1),
    SamplingParams(temperature=0.9, seed=14, min_tokens=4, max_tokens=MAX_TOKENS, frequency_penalty=1.0),
]


def _summary(outs) -> list:
    """Everything a caller sees of each completion (logprobs rounded: float32 on the CPU)."""
    def lps(c):
        return None if c.logprobs is None else [{t: (round(v.logprob, 4), v.rank) for t, v in d.items()}
                                                for d in c.logprobs]
    return [[(c.index, c.token_ids, c.text, c.finish_reason, c.stop_reason, lps(c)) for c in o.outputs]
            for o in outs]


def _generate(path, prompts, params, on: bool, **kwargs):
    llm = LLM(path, async_scheduling=on, **kwargs)
    eng = llm.engine
    fills = []
    fill = eng.runner._fill
    eng.runner._fill = lambda ids, feed, rows: (fills.append(len(rows)), fill(ids, feed, rows))
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    assert bool(fills) == on  # async steps took their input ids from the previous step's tokens
    assert eng.pool.num_free == eng.pool.num_blocks and not eng.has_unfinished_requests()
    assert all(PLACEHOLDER not in c.token_ids for o in outs for c in o.outputs)
    return outs, eng


def test_default_follows_the_device(artifact):
    assert LLMEngine(artifact("llama"), num_kv_blocks=32).async_scheduling is False
    assert LLMEngine(artifact("llama"), num_kv_blocks=32, async_scheduling=True).async_scheduling is True


@pytest.mark.parametrize("scenario", sorted(SCENARIOS))
@pytest.mark.parametrize("arch", ARCHS)
def test_greedy_identical(artifact, arch, scenario):
    prompts = _prompts()
    params = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True)
    sync, _ = _generate(artifact(arch), prompts, params, False, **SCENARIOS[scenario])
    got, eng = _generate(artifact(arch), prompts, params, True, **SCENARIOS[scenario])
    assert _summary(got) == _summary(sync)
    if scenario == "preempt":
        assert eng.scheduler_stats()["preemptions"] > 0


@pytest.mark.parametrize("scenario", sorted(SCENARIOS))
def test_sampling_features_identical(artifact, scenario):
    """Seeded draws (the counter), penalties (the counts take each token in order), min_tokens,
    top-k/top-p, logprobs and n > 1, in batches mixing prefill chunks and decodes."""
    prompts = _prompts()[:5]
    sync, _ = _generate(artifact("llama"), prompts, SAMPLED, False, **SCENARIOS[scenario])
    got, eng = _generate(artifact("llama"), prompts, SAMPLED, True, **SCENARIOS[scenario])
    assert _summary(got) == _summary(sync)
    assert eng.num_generated_tokens == sum(len(c.token_ids) for o in got for c in o.outputs)


def test_stops_identical(artifact):
    """Stop ids, stop strings (with and without the stop string), EOS: a request that stops at
    step n has a dropped row in step n+1, never reported."""
    prompts = _prompts()[:4]
    base, _ = _generate(artifact("llama"), prompts, SamplingParams(temperature=0, max_tokens=MAX_TOKENS,
                                                                   ignore_eos=True), False, block_size=4)
    ids, text = base[1].outputs[0].token_ids, base[1].outputs[0].text
    stop = text[len(text) // 3 : len(text) // 3 + 2]
    params = [
        SamplingParams(temperature=0, max_tokens=MAX_TOKENS, stop_token_ids=[base[0].outputs[0].token_ids[3]]),
        SamplingParams(temperature=0, max_tokens=MAX_TOKENS, stop=[stop] if stop.strip() else None, ignore_eos=True),
        SamplingParams(temperature=0, max_tokens=MAX_TOKENS, stop_token_ids=[ids[2]], min_tokens=5),
        SamplingParams(temperature=0, max_tokens=MAX_TOKENS, stop=[stop] if stop.strip() else None,
                       include_stop_str_in_output=True, ignore_eos=True),
    ]
    sync, _ = _generate(artifact("llama"), prompts, params, False, block_size=4)
    got, _ = _generate(artifact("llama"), prompts, params, True, block_size=4)
    assert _summary(got) == _summary(sync)
    assert sync[0].outputs[0].finish_reason == "stop"


def test_prefix_hashes_only_known_tokens(artifact):
    """A block completed by a token still on the device is hashed once the token is known: a
    later prompt made of an earlier prompt and its output hits the cache through the output."""
    prompt = _prompts()[3]  # 30 tokens
    params = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True)
    for on in (False, True):
        llm = LLM(artifact("llama"), block_size=4, async_scheduling=on)
        first = llm.generate({"prompt_token_ids": prompt}, params, use_tqdm=False)[0].outputs[0].token_ids
        again = llm.generate({"prompt_token_ids": prompt + first}, params, use_tqdm=False)[0]
        # 42 tokens: 10 full blocks cached (the last token is always computed)
        assert again.num_cached_tokens == 40, on
        ref = LLM(artifact("llama"), block_size=4, enable_prefix_caching=False)
        want = ref.generate({"prompt_token_ids": prompt + first}, params, use_tqdm=False)[0].outputs[0].token_ids
        assert again.outputs[0].token_ids == want


def test_shared_prefix_identical(artifact):
    prompts = _prompts(shared_prefix=40)
    params = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True)
    sync, _ = _generate(artifact("llama"), prompts, params, False, max_num_seqs=2, block_size=4)
    got, eng = _generate(artifact("llama"), prompts, params, True, max_num_seqs=2, block_size=4)
    assert _summary(got) == _summary(sync)
    assert all(o.num_cached_tokens >= 36 for o in got[2:])


def test_abort_mid_run(artifact):
    """An aborted request reports a prefix of its full output (its token in flight dropped) and
    frees its blocks; the others finish as they would have."""
    prompts = _prompts()[:3]
    params = SamplingParams(temperature=0.8, seed=5, max_tokens=MAX_TOKENS, ignore_eos=True, logprobs=1)
    full, _ = _generate(artifact("llama"), prompts, params, False, block_size=4)
    eng = LLMEngine(artifact("llama"), block_size=4, async_scheduling=True)
    ids = [eng.add_request(str(i), {"prompt_token_ids": p}, params) for i, p in enumerate(prompts)]
    streamed: dict[str, list[int]] = {i: [] for i in ids}
    lps: dict[str, list[dict[int, Logprob]]] = {i: [] for i in ids}
    for _ in range(5):
        for out in eng.step():
            streamed[out.request_id] += out.outputs[0].delta_token_ids
            lps[out.request_id] += out.outputs[0].delta_logprobs
    assert eng.groups["1"][0].num_pending == 1  # a token in flight when the abort comes
    aborted = eng.abort_request("1")
    assert aborted.finished and aborted.outputs[0].finish_reason == "abort"
    streamed["1"] += aborted.outputs[0].delta_token_ids
    lps["1"] += aborted.outputs[0].delta_logprobs
    assert streamed["1"] == full[1].outputs[0].token_ids[: len(streamed["1"])] and len(streamed["1"]) == 4
    assert len(lps["1"]) == 4
    while eng.has_unfinished_requests():
        for out in eng.step():
            streamed[out.request_id] += out.outputs[0].delta_token_ids
    assert [streamed[k] for k in ("0", "2")] == [full[0].outputs[0].token_ids, full[2].outputs[0].token_ids]
    assert eng.pool.num_free == eng.pool.num_blocks and not eng.has_unfinished_requests()


def test_stream_deltas_one_token_each(artifact):
    """Streaming under async scheduling: one output per token, the last one finished."""
    llm = LLM(artifact("llama"), async_scheduling=True)
    outs = list(llm.generate_stream({"prompt_token_ids": [5, 6, 7]},
                                    SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)))
    assert [len(o.outputs[0].token_ids) for o in outs] == [1, 2, 3, 4, 5, 6] and outs[-1].finished


def test_failed_step_fails_its_requests(artifact):
    """A forward that raises: the step in flight is read first, then the step's requests fail."""
    eng = LLMEngine(artifact("llama"), block_size=4, async_scheduling=True)
    real_run = eng.model.executor.run
    calls = {"n": 0}

    def flaky(inputs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("injected")
        return real_run(inputs)

    eng.model.executor.run = flaky
    rid = eng.add_request(None, {"prompt_token_ids": [5, 6, 7]}, SamplingParams(temperature=0, max_tokens=8))
    final = eng.run([rid])[rid].outputs[0]
    assert final.finish_reason == "error" and len(final.token_ids) == 2 and PLACEHOLDER not in final.token_ids
    assert eng.pool.num_free == eng.pool.num_blocks


def test_longrope_switch_identical(tmp_path):
    """A token in flight that crosses a longrope model's switch is read before the next step
    is scheduled: the sequence is computed again, its next token on the long factors."""
    import kiln
    from kiln.models.checkpoint import build_checkpoint

    rope = {"rope_theta": 10000.0, "rope_type": "longrope", "partial_rotary_factor": 1.0,
            "original_max_position_embeddings": 64, "short_factor": [1.0 + 0.1 * i for i in range(8)],
            "long_factor": [2.0 + 0.3 * i for i in range(8)]}
    ckpt = build_checkpoint("phi3", tmp_path / "ckpt", config_overrides={"rope_parameters": rope,
                                                                          "original_max_position_embeddings": 64})
    path = kiln.compile(ckpt, tmp_path / "art")
    prompts = [list(range(3, 3 + n)) for n in (58, 20)]
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    sync, _ = _generate(path, prompts, params, False, num_kv_blocks=64, block_size=4)
    got, _ = _generate(path, prompts, params, True, num_kv_blocks=64, block_size=4)
    assert _summary(got) == _summary(sync)


def test_too_long_for_the_cache_identical(artifact):
    """A sequence that outgrows the whole pool ends with "length" after the same tokens."""
    prompts = [list(range(3, 13)), list(range(20, 25))]
    params = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    sync, _ = _generate(artifact("llama"), prompts, params, False, num_kv_blocks=5, block_size=4)
    got, _ = _generate(artifact("llama"), prompts, params, True, num_kv_blocks=5, block_size=4)
    assert _summary(got) == _summary(sync)
    assert {o.outputs[0].finish_reason for o in got} == {"length"}
    assert max(len(o.outputs[0].token_ids) for o in got) < 40


@pytest.mark.gpu
@pytest.mark.parametrize("scenario", sorted(SCENARIOS))
def test_cuda_identical(artifact, scenario):
    """On a GPU (CUDA graphs for the decode buckets, pinned token copies, the device-side
    input_ids fill): the same tokens with async scheduling on and off."""
    prompts = _prompts()[:5]
    kwargs = {"device": "cuda", "max_num_seqs": 8, **SCENARIOS[scenario]}
    kwargs.setdefault("num_kv_blocks", 64)
    sync, _ = _generate(artifact("llama", "float32"), prompts, SAMPLED, False, **kwargs)
    got, _ = _generate(artifact("llama", "float32"), prompts, SAMPLED, True, **kwargs)
    assert [[(c.token_ids, c.finish_reason) for c in o.outputs] for o in got] == \
        [[(c.token_ids, c.finish_reason) for c in o.outputs] for o in sync]


def test_no_row_for_a_token_past_max_tokens(artifact):
    """A request whose token in flight is its max_tokens-th is not given another row: async
    runs as many forward passes as sync does."""
    counts = []
    for on in (False, True):
        eng = LLMEngine(artifact("llama"), block_size=4, async_scheduling=on)
        run, calls = eng.model.executor.run, []
        eng.model.executor.run = lambda inputs, run=run, calls=calls: (calls.append(1), run(inputs))[1]
        rid = eng.add_request(None, {"prompt_token_ids": [5, 6, 7]}, SamplingParams(max_tokens=MAX_TOKENS,
                                                                                     ignore_eos=True))
        assert len(eng.run([rid])[rid].outputs[0].token_ids) == MAX_TOKENS
        counts.append(len(calls))
    assert counts == [MAX_TOKENS, MAX_TOKENS]
