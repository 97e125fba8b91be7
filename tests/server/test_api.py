"""The OpenAI API through the official client against a real server: responses equal what
`LLM.generate` gives for the same seed, streams equal whole responses, usage is exact."""

from __future__ import annotations

import math

import pytest

from kiln import LLM, SamplingParams

PROMPT = "The quick brown fox"
MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello there"}]


@pytest.fixture(scope="module")
def llm(llama, engine_kwargs):
    return LLM(llama, **engine_kwargs)


def _reference(llm, prompt, **params):
    return llm.generate(prompt, SamplingParams(**params), use_tqdm=False)[0]


def _chat_ids(server, messages):
    status, body = server.post("/tokenize", {"messages": messages})
    assert status == 200, body
    return body["tokens"]


def _stream_text(chunks):
    """{choice index: (text, finish_reason)} and the usage of a completions stream."""
    texts, finish, usage = {}, {}, None
    for ch in chunks:
        if ch.usage is not None:
            usage = ch.usage
        for c in ch.choices:
            texts[c.index] = texts.get(c.index, "") + c.text
            if c.finish_reason is not None:
                assert c.index not in finish, "finish_reason sent twice"
                finish[c.index] = c.finish_reason
    return texts, finish, usage


def test_models_health_openapi(server):
    models = server.client().models.list()
    assert [m.id for m in models.data] == ["tiny-llama"]
    assert server.get("/health") == (200, {"status": "ok"})
    status, schema = server.get("/openapi.json")
    assert status == 200
    assert {"/v1/completions", "/v1/chat/completions", "/v1/models", "/tokenize", "/detokenize",
            "/health", "/metrics"} <= set(schema["paths"])


@pytest.mark.parametrize("params", [
    {"temperature": 0, "max_tokens": 24},
    {"temperature": 0.9, "seed": 7, "max_tokens": 24},
    {"temperature": 1.2, "top_p": 0.8, "seed": 3, "max_tokens": 20, "presence_penalty": 0.5,
     "frequency_penalty": 0.3},
])
def test_completion_matches_llm(server, llm, params):
    resp = server.client().completions.create(model=server.model, prompt=PROMPT, **params)
    ref = _reference(llm, PROMPT, **params)
    assert resp.choices[0].text == ref.outputs[0].text
    assert resp.choices[0].finish_reason == ref.outputs[0].finish_reason
    assert resp.usage.prompt_tokens == len(ref.prompt_token_ids)
    assert resp.usage.completion_tokens == len(ref.outputs[0].token_ids)
    assert resp.usage.total_tokens == resp.usage.prompt_tokens + resp.usage.completion_tokens


def test_extra_sampling_fields_match_llm(server, llm):
    extra = {"top_k": 5, "min_p": 0.05, "repetition_penalty": 1.3, "min_tokens": 10, "ignore_eos": True}
    resp = server.client().completions.create(model=server.model, prompt=PROMPT, max_tokens=30, seed=11,
                                              temperature=1.0, extra_body=extra)
    ref = _reference(llm, PROMPT, max_tokens=30, seed=11, temperature=1.0, **extra)
    assert resp.choices[0].text == ref.outputs[0].text
    assert resp.usage.completion_tokens == 30


def test_n_completions_match_llm(server, llm):
    resp = server.client().completions.create(model=server.model, prompt=PROMPT, n=3, seed=5, max_tokens=16)
    ref = _reference(llm, PROMPT, n=3, seed=5, max_tokens=16)
    assert [c.index for c in resp.choices] == [0, 1, 2]
    assert [c.text for c in resp.choices] == [o.text for o in ref.outputs]
    assert len({c.text for c in resp.choices}) > 1
    assert resp.usage.completion_tokens == sum(len(o.token_ids) for o in ref.outputs)
    assert resp.usage.prompt_tokens == len(ref.prompt_token_ids)  # once, not once per choice


def test_chat_matches_llm(server, llm):
    ids = _chat_ids(server, MESSAGES)
    resp = server.client().chat.completions.create(model=server.model, messages=MESSAGES, seed=2,
                                                   temperature=0.8, max_completion_tokens=20)
    ref = _reference(llm, {"prompt_token_ids": ids}, seed=2, temperature=0.8, max_tokens=20)
    assert resp.choices[0].message.role == "assistant"
    assert resp.choices[0].message.content == ref.outputs[0].text
    assert resp.usage.prompt_tokens == len(ids)
    assert resp.usage.completion_tokens == len(ref.outputs[0].token_ids)


def test_completion_stream_equals_whole_at_temperature_0(server, llm):
    client = server.client()
    whole = client.completions.create(model=server.model, prompt=PROMPT, temperature=0, max_tokens=40)
    chunks = list(client.completions.create(model=server.model, prompt=PROMPT, temperature=0, max_tokens=40,
                                            stream=True, stream_options={"include_usage": True}))
    texts, finish, usage = _stream_text(chunks)
    assert texts == {0: whole.choices[0].text}
    assert finish == {0: whole.choices[0].finish_reason}
    assert chunks[-1].choices == [] and usage == whole.usage
    ref = _reference(llm, PROMPT, temperature=0, max_tokens=40)
    assert usage.completion_tokens == len(ref.outputs[0].token_ids)
    assert usage.prompt_tokens == len(ref.prompt_token_ids)


def test_chat_stream_equals_whole_at_temperature_0(server):
    client = server.client()
    whole = client.chat.completions.create(model=server.model, messages=MESSAGES, temperature=0, max_tokens=30)
    chunks = list(client.chat.completions.create(model=server.model, messages=MESSAGES, temperature=0,
                                                 max_tokens=30, stream=True,
                                                 stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == [whole.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage == whole.usage


def test_stream_without_usage_has_none(server):
    chunks = list(server.client().completions.create(model=server.model, prompt=PROMPT, max_tokens=5, stream=True))
    assert chunks and all(c.usage is None for c in chunks)


def test_stream_n_seeded(server, llm):
    stream = server.client().completions.create(model=server.model, prompt=PROMPT, n=3, seed=9, max_tokens=12,
                                                stream=True, stream_options={"include_usage": True})
    texts, finish, usage = _stream_text(list(stream))
    ref = _reference(llm, PROMPT, n=3, seed=9, max_tokens=12)
    assert texts == {i: o.text for i, o in enumerate(ref.outputs)}
    assert set(finish) == {0, 1, 2}
    assert usage.completion_tokens == sum(len(o.token_ids) for o in ref.outputs)


def test_stop_string_matches_llm(server, llm):
    greedy = _reference(llm, PROMPT, temperature=0, max_tokens=40).outputs[0].text
    start = next(i for i in range(4, len(greedy) - 2) if greedy[i:i + 2].isprintable()
                 and "\ufffd" not in greedy[i:i + 2])
    stop = greedy[start:start + 2]
    client = server.client()
    resp = client.completions.create(model=server.model, prompt=PROMPT, temperature=0, max_tokens=40, stop=[stop])
    ref = _reference(llm, PROMPT, temperature=0, max_tokens=40, stop=[stop])
    assert resp.choices[0].finish_reason == "stop"
    assert resp.choices[0].text == ref.outputs[0].text == greedy[:greedy.index(stop)]
    assert resp.usage.completion_tokens == len(ref.outputs[0].token_ids)
    chunks = list(client.completions.create(model=server.model, prompt=PROMPT, temperature=0, max_tokens=40,
                                            stop=stop, stream=True))
    assert _stream_text(chunks)[0] == {0: resp.choices[0].text}


def test_completion_logprobs_match_llm(server, llm):
    resp = server.client().completions.create(model=server.model, prompt=PROMPT, temperature=0, max_tokens=8,
                                              logprobs=3)
    ref = _reference(llm, PROMPT, temperature=0, max_tokens=8, logprobs=3).outputs[0]
    lp = resp.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(ref.token_ids)
    for got, tid, entry in zip(lp.token_logprobs, ref.token_ids, ref.logprobs, strict=True):
        assert math.isclose(got, entry[tid].logprob, abs_tol=1e-5)
    for tops, got in zip(lp.top_logprobs, lp.token_logprobs, strict=True):
        assert 1 <= len(tops) <= 4
        assert max(tops.values()) >= got - 1e-6  # greedy: the chosen token is the most likely
    assert lp.text_offset[0] == 0


def test_chat_logprobs(server):
    resp = server.client().chat.completions.create(model=server.model, messages=MESSAGES, max_tokens=6, seed=1,
                                                   logprobs=True, top_logprobs=2)
    content = resp.choices[0].logprobs.content
    assert len(content) == resp.usage.completion_tokens == 6
    for tok in content:
        assert len(tok.top_logprobs) == 2
        assert tok.top_logprobs[0].logprob >= tok.top_logprobs[1].logprob
        assert tok.bytes == list(tok.token.encode())
    chunks = list(server.client().chat.completions.create(
        model=server.model, messages=MESSAGES, max_tokens=6, seed=1, logprobs=True, top_logprobs=2, stream=True))
    streamed = [t for c in chunks if c.choices and c.choices[0].logprobs for t in c.choices[0].logprobs.content]
    assert [t.logprob for t in streamed] == pytest.approx([t.logprob for t in content], abs=1e-6)


def test_multiple_prompts_and_echo(server, llm):
    prompts = ["abc", "hello world"]
    resp = server.client().completions.create(model=server.model, prompt=prompts, n=2, temperature=0,
                                              max_tokens=5, echo=True)
    assert [c.index for c in resp.choices] == [0, 1, 2, 3]
    for i, p in enumerate(prompts):
        ref = _reference(llm, p, temperature=0, max_tokens=5).outputs[0].text
        assert resp.choices[2 * i].text == resp.choices[2 * i + 1].text == p + ref
    ids = server.post("/tokenize", {"prompt": "abc"})[1]["tokens"]
    by_ids = server.client().completions.create(model=server.model, prompt=[ids, ids], temperature=0, max_tokens=5)
    assert [c.text for c in by_ids.choices] == [resp.choices[0].text[3:]] * 2
    assert by_ids.usage.prompt_tokens == 2 * len(ids)


def test_tokenize_detokenize(server):
    status, body = server.post("/tokenize", {"prompt": "Hello there"})
    assert status == 200 and body["count"] == len(body["tokens"]) and body["max_model_len"] == 256
    status, back = server.post("/detokenize", {"tokens": body["tokens"]})
    assert (status, back) == (200, {"prompt": "Hello there"})
    rendered = server.post("/detokenize", {"tokens": _chat_ids(server, MESSAGES)})[1]["prompt"]
    assert rendered.startswith("<s><|system|>\nBe brief.</s>") and rendered.endswith("<|assistant|>\n")


def test_non_streaming_disconnect_aborts(server):
    before = server.state.async_engine.stats["finish_counts"].get("abort", 0)
    client = server.client().with_options(timeout=0.3)
    with pytest.raises(Exception, match="(?i)timed? ?out"):
        client.completions.create(model=server.model, prompt=PROMPT, n=16, max_tokens=230,
                                  extra_body={"ignore_eos": True})
    stats = server.wait_idle()
    assert stats["finish_counts"]["abort"] == before + 16


def test_metrics(server, engine_kwargs):
    server.client().completions.create(model=server.model, prompt=PROMPT, max_tokens=4)
    server.wait_idle()
    status, text = server.get("/metrics")
    assert status == 200
    values = {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1])
              for line in text.splitlines() if line and not line.startswith("#")}
    for name in ("kiln_time_to_first_token_seconds_count", "kiln_inter_token_latency_seconds_count",
                 "kiln_e2e_request_latency_seconds_count", "kiln_generation_tokens_total",
                 'kiln_request_success_total{finish_reason="length"}', "kiln_prompt_tokens_total"):
        assert values[name] > 0, name
    assert values["kiln_num_requests_running"] == values["kiln_num_requests_waiting"] == 0
    assert values["kiln_kv_cache_usage_ratio"] == 0
    assert 0 <= values["kiln_prefix_cache_hit_rate"] <= 1
    assert values["kiln_kv_cache_free_blocks"] == engine_kwargs["num_kv_blocks"]
