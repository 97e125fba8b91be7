"""The offline LLM API end to end on a compiled tiny model: sampling features, n > 1,
streaming, stop conditions, logprobs, aborts and errors."""

from __future__ import annotations

import pytest
import torch

from kiln import LLM, SamplingParams
from kiln.models.checkpoint import load_reference_model


@pytest.fixture(scope="module")
def llm(artifact):
    return LLM(artifact("llama"), block_size=4)


PROMPTS = [{"prompt_token_ids": list(range(3, 3 + n))} for n in (5, 19, 2, 11)]


def _tokens(outs):
    return [[c.token_ids for c in o.outputs] for o in outs]


def test_outputs_in_order_with_vllm_fields(llm):
    outs = llm.generate(["def f(x):", *PROMPTS[:2]], SamplingParams(temperature=0, max_tokens=4), use_tqdm=False)
    assert outs[0].prompt == "def f(x):" and outs[0].prompt_token_ids == llm.get_tokenizer().encode("def f(x):")
    assert outs[1].prompt_token_ids == PROMPTS[0]["prompt_token_ids"]
    for o in outs:
        c = o.outputs[0]
        assert o.finished and c.index == 0 and len(c.token_ids) == 4 and c.finish_reason == "length"
        assert c.text == llm.get_tokenizer().decode(c.token_ids)


def test_seed_reproducible_whatever_the_batch(llm):
    p = SamplingParams(temperature=1.0, top_p=0.9, seed=1234, max_tokens=10, ignore_eos=True)
    alone = llm.generate(PROMPTS[1], p, use_tqdm=False)[0].outputs[0].token_ids
    others = [SamplingParams(temperature=0.7, seed=i, max_tokens=3 + i) for i in range(3)]
    mixed = llm.generate(PROMPTS, [others[0], p, others[1], others[2]], use_tqdm=False)
    assert mixed[1].outputs[0].token_ids == alone
    other_seed = llm.generate(PROMPTS[1], SamplingParams(temperature=1.0, top_p=0.9, seed=99, max_tokens=10,
                                                         ignore_eos=True), use_tqdm=False)
    assert other_seed[0].outputs[0].token_ids != alone


def test_n_samples_differ_and_share_prompt_blocks(artifact):
    llm = LLM(artifact("llama"), block_size=4)
    eng = llm.engine
    prompt = {"prompt_token_ids": list(range(3, 23))}  # 20 tokens: 5 full blocks
    eng.add_request("r", prompt, SamplingParams(n=4, temperature=1.0, seed=0, max_tokens=8, ignore_eos=True))
    eng.step()
    tables = [eng.kv.block_ids(r) for r in eng.groups["r"]]
    assert all(t[:4] == tables[0][:4] for t in tables)  # the full prompt blocks are shared
    assert eng.kv.stats.hits >= 3 * 16
    final = eng.run(["r"])["r"]
    seqs = [c.token_ids for c in final.outputs]
    assert [c.index for c in final.outputs] == [0, 1, 2, 3]
    assert len({tuple(s) for s in seqs}) > 1
    assert eng.pool.num_free == eng.pool.num_blocks


def test_stop_strings_and_stop_tokens(llm):
    base = llm.generate(PROMPTS[0], SamplingParams(temperature=0, max_tokens=12, ignore_eos=True), use_tqdm=False)[0]
    text, ids = base.outputs[0].text, base.outputs[0].token_ids
    stop_tok = ids[5]
    out = llm.generate(PROMPTS[0], SamplingParams(temperature=0, max_tokens=12, stop_token_ids=[stop_tok],
                                                  ignore_eos=True), use_tqdm=False)[0].outputs[0]
    assert out.finish_reason == "stop" and out.stop_reason == stop_tok and out.token_ids == ids[: ids.index(stop_tok) + 1]
    stop = text[len(text) // 2 : len(text) // 2 + 2]
    if stop and "\ufffd" not in stop:
        for include in (False, True):
            o = llm.generate(PROMPTS[0], SamplingParams(temperature=0, max_tokens=12, stop=[stop], ignore_eos=True,
                                                        include_stop_str_in_output=include), use_tqdm=False)[0].outputs[0]
            cut = text.index(stop) + (len(stop) if include else 0)
            assert o.finish_reason == "stop" and o.stop_reason == stop and o.text == text[:cut]


def test_min_tokens_and_eos(llm):
    eos = llm.get_tokenizer().eos_token_ids[0]
    p = SamplingParams(temperature=0, max_tokens=6, min_tokens=6, stop_token_ids=[eos])
    assert len(llm.generate(PROMPTS[2], p, use_tqdm=False)[0].outputs[0].token_ids) == 6


def test_logprobs_match_model(llm, checkpoint):
    ref = load_reference_model(checkpoint("llama"))
    p = SamplingParams(temperature=0, max_tokens=3, logprobs=2, ignore_eos=True)
    c = llm.generate(PROMPTS[0], p, use_tqdm=False)[0].outputs[0]
    ids = PROMPTS[0]["prompt_token_ids"] + c.token_ids
    with torch.no_grad():
        lp = torch.log_softmax(ref(torch.tensor([ids])).logits[0].float(), -1)
    total = 0.0
    for k, tok in enumerate(c.token_ids):
        entry = c.logprobs[k]
        row = lp[len(PROMPTS[0]["prompt_token_ids"]) - 1 + k]
        assert entry[tok].logprob == pytest.approx(row[tok].item(), abs=1e-4) and entry[tok].rank == 1
        assert len(entry) == 2 and sorted(e.rank for e in entry.values()) == [1, 2]
        total += entry[tok].logprob
    assert c.cumulative_logprob == pytest.approx(total, abs=1e-4)


def test_stream_deltas_add_up(llm):
    p = SamplingParams(temperature=0.8, seed=3, max_tokens=10, ignore_eos=True)
    final = llm.generate(PROMPTS, p, use_tqdm=False)
    pieces: dict[str, list[str]] = {}
    toks: dict[str, list[int]] = {}
    last = {}
    for out in llm.generate_stream(PROMPTS, p):
        pieces.setdefault(out.request_id, []).append(out.outputs[0].delta_text)
        toks.setdefault(out.request_id, []).extend(out.outputs[0].delta_token_ids)
        last[out.request_id] = out
    assert all(o.finished for o in last.values())
    streamed = sorted(("".join(pieces[k]), tuple(toks[k])) for k in pieces)
    assert streamed == sorted((o.outputs[0].text, tuple(o.outputs[0].token_ids)) for o in final)


def test_final_only_steps_report_each_request_once_with_everything(llm):
    p = SamplingParams(temperature=0.8, seed=5, max_tokens=7, ignore_eos=True, logprobs=2)
    streamed = {o.request_id: o for o in llm.generate_stream(PROMPTS[:3], p)}  # accumulated snapshots
    eng = llm.engine
    ids = [eng.add_request(None, q, p) for q in PROMPTS[:3]]
    seen: list = []
    while eng.has_unfinished_requests():
        seen += eng.step(final_only=True)
    assert sorted(o.request_id for o in seen) == sorted(ids) and all(o.finished for o in seen)
    for o in seen:  # the one output carries the whole completion as its delta
        c = o.outputs[0]
        assert len(c.delta_token_ids) == 7 and len(c.delta_logprobs) == 7 and c.delta_text == c.text
    got = sorted((o.outputs[0].text, tuple(o.outputs[0].delta_token_ids)) for o in seen)
    assert got == sorted((o.outputs[0].text, tuple(o.outputs[0].token_ids)) for o in streamed.values())


def test_abort_frees_blocks(artifact):
    llm = LLM(artifact("llama"), block_size=4)
    eng = llm.engine
    eng.add_request("a", PROMPTS[1], SamplingParams(max_tokens=50, ignore_eos=True))
    eng.step()
    assert eng.pool.num_free < eng.pool.num_blocks
    out = eng.abort_request("a")
    assert out.finished and out.outputs[0].finish_reason == "abort"
    assert eng.pool.num_free == eng.pool.num_blocks and not eng.has_unfinished_requests()
    assert eng.abort_request("a") is None


def test_bad_requests(llm):
    with pytest.raises(ValueError, match="context"):
        llm.generate({"prompt_token_ids": [5] * 400}, use_tqdm=False)
    with pytest.raises(ValueError, match=r"\[0, 256\)"):
        llm.generate({"prompt_token_ids": [999]}, use_tqdm=False)
    with pytest.raises(ValueError, match="empty"):
        llm.generate({"prompt_token_ids": []}, use_tqdm=False)
    with pytest.raises(ValueError, match="temperature"):
        SamplingParams(temperature=-1)
    with pytest.raises(ValueError, match="2 sampling_params for 1 prompts"):
        llm.generate(PROMPTS[:1], [SamplingParams(), SamplingParams()], use_tqdm=False)
    assert not llm.engine.has_unfinished_requests()


def test_cache_too_small_for_prompt(artifact):
    with pytest.raises(ValueError, match="KV blocks"):
        LLM(artifact("llama"), num_kv_blocks=2, block_size=4).generate(PROMPTS[1], use_tqdm=False)
    with pytest.raises(ValueError, match="holds no block"):
        LLM(artifact("llama"), kv_cache_memory_bytes=10)


def test_failed_step_leaves_no_cached_garbage(artifact):
    """A prompt whose step raised must not be served from blocks that were never computed."""
    llm = LLM(artifact("llama"), block_size=4)
    p = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
    healthy = llm.generate(PROMPTS[1], p, use_tqdm=False)[0].outputs[0].token_ids
    fresh = LLM(artifact("llama"), block_size=4)
    real_run = fresh.engine.model.executor.run
    calls = {"n": 0}

    def flaky(inputs):
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("injected")
        return real_run(inputs)

    fresh.engine.model.executor.run = flaky
    failed = fresh.generate(PROMPTS[1], p, use_tqdm=False)[0]
    assert failed.outputs[0].finish_reason == "error"
    retry = fresh.generate(PROMPTS[1], p, use_tqdm=False)[0]
    assert retry.num_cached_tokens == 0 and retry.outputs[0].token_ids == healthy
    assert fresh.engine.pool.num_free == fresh.engine.pool.num_blocks



def test_stream_outputs_are_snapshots(llm):
    """Collected stream outputs keep each step's own delta and token list."""
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    outs = list(llm.generate_stream({"prompt_token_ids": [5, 6, 7]}, params))
    assert len(outs) == 6 and len({id(o) for o in outs}) == 6
    assert [len(o.outputs[0].token_ids) for o in outs] == [1, 2, 3, 4, 5, 6]
    assert [t for o in outs for t in o.outputs[0].delta_token_ids] == outs[-1].outputs[0].token_ids
    assert "".join(o.outputs[0].delta_text for o in outs) == outs[-1].outputs[0].text
