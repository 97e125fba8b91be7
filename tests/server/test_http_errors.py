"""Every error a client can meet, in OpenAI's format and with the right status."""

from __future__ import annotations

import threading

import openai
import pytest

from kiln.runtime.engine import LLMEngine

POISON = 200
"""A position that makes the patched model step raise (see `failing`): prompts of more than 200
tokens fail, the short prompts (and few generated tokens) of healthy requests never get there."""
LONG = ("x" * 210, "y" * 210, "z" * 210)
"""Distinct: a failed prompt's blocks must not be found in the prefix cache by the next one."""


def _error(status_body, status, param=None, code=None):
    status_got, body = status_body
    assert status_got == status, body
    err = body["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    assert err["param"] == param, err
    if code is not None:
        assert err["code"] == code, err
    return err


def test_malformed_json(server):
    err = _error(server.post("/v1/completions", b'{"prompt": "hi",'), 400)
    assert "not valid JSON" in err["message"]
    _error(server.post("/v1/chat/completions", b"[1, 2]"), 400)
    _error(server.post("/v1/completions", b"", {"Content-Type": "application/json"}), 400)
    err = _error(server.post("/v1/completions", b'{"prompt": "hi"}', {"Content-Type": "text/plain"}), 400)
    assert "application/json" in err["message"]


@pytest.mark.parametrize("path, body, param", [
    ("/v1/completions", {"prompt": "hi", "temperature": -1}, "temperature"),
    ("/v1/completions", {"prompt": "hi", "temperature": "hot"}, "temperature"),
    ("/v1/completions", {"prompt": "hi", "top_p": 1.5}, "top_p"),
    ("/v1/completions", {"prompt": "hi", "top_k": -3}, "top_k"),
    ("/v1/completions", {"prompt": "hi", "min_p": 2}, "min_p"),
    ("/v1/completions", {"prompt": "hi", "n": 0}, "n"),
    ("/v1/completions", {"prompt": "hi", "n": 1000}, "n"),
    ("/v1/completions", {"prompt": "hi", "max_tokens": 0}, "max_tokens"),
    ("/v1/completions", {"prompt": "hi", "max_tokens": 4, "min_tokens": 5}, "min_tokens"),
    ("/v1/completions", {"prompt": "hi", "presence_penalty": 3}, "presence_penalty"),
    ("/v1/completions", {"prompt": "hi", "repetition_penalty": 0}, "repetition_penalty"),
    ("/v1/completions", {"prompt": "hi", "logprobs": 21}, "logprobs"),
    ("/v1/completions", {"prompt": "hi", "stop": [""]}, "stop"),
    ("/v1/completions", {"prompt": "hi", "seed": 2**64}, "seed"),
    ("/v1/completions", {"prompt": "hi", "logit_bias": {"5": 1}}, "logit_bias"),
    ("/v1/completions", {"prompt": "hi", "suffix": "x"}, "suffix"),
    ("/v1/completions", {"prompt": "hi", "best_of": 3}, "best_of"),
    ("/v1/completions", {"prompt": [5, 9999]}, "prompt"),
    ("/v1/completions", {"prompt": []}, "prompt"),
    ("/v1/completions", {"temperature": 0}, "prompt"),
    ("/v1/completions", {"prompt": "hi", "stream_options": {"include_usage": "yes"}}, "stream_options"),
    ("/v1/chat/completions", {"messages": []}, "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "robot", "content": "x"}]}, "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": [{"type": "image_url"}]}]},
     "messages[0].content"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "max_completion_tokens": 0},
     "max_completion_tokens"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "logprobs": True,
                              "top_logprobs": 30}, "top_logprobs"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "top_logprobs": 2},
     "top_logprobs"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "tools": [{"type": "function"}]},
     "tools"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}],
                              "response_format": {"type": "json_object"}}, "response_format"),
    ("/tokenize", {"prompt": "a", "messages": [{"role": "user", "content": "x"}]}, "prompt"),
    ("/detokenize", {"tokens": [-1]}, "tokens"),
])
def test_invalid_parameter_is_named(server, path, body, param):
    err = _error(server.post(path, body), 400, param=param)
    assert err["type"] == "invalid_request_error"


def test_invalid_parameter_through_the_client(server):
    with pytest.raises(openai.BadRequestError) as e:
        server.client().completions.create(model=server.model, prompt="hi", temperature=-0.5)
    assert e.value.status_code == 400 and e.value.param == "temperature"


def test_prompt_longer_than_context(server):
    long = "x" * 300  # one token per byte: past the 256-token context
    err = _error(server.post("/v1/completions", {"prompt": long}), 400, param="prompt")
    assert "256" in err["message"]
    _error(server.post("/v1/chat/completions", {"messages": [{"role": "user", "content": long}]}), 400,
           param="messages")
    err = _error(server.post("/v1/completions", {"prompt": "hello", "max_tokens": 255}), 400, param="max_tokens")
    assert "maximum context length is 256" in err["message"]
    _error(server.post("/v1/completions", {"prompt": list(range(3, 259))}), 400, param="prompt")


def test_unknown_model_and_route(server):
    with pytest.raises(openai.NotFoundError) as e:
        server.client().completions.create(model="gpt-5", prompt="hi")
    assert e.value.code == "model_not_found" and e.value.param == "model"
    _error(server.post("/v1/chat/completions", {"model": "x", "messages": [{"role": "user", "content": "a"}]}),
           404, param="model")
    _error(server.get("/v1/nothing"), 404)
    _error(server.get("/v1/completions"), 405)


def test_api_key(llama, start_server):
    with start_server(LLMEngine(llama, num_kv_blocks=64), api_key="s3cret") as s:
        with pytest.raises(openai.AuthenticationError):
            s.client(api_key="wrong").models.list()
        _error(s.post("/v1/completions", {"prompt": "hi"}), 401, code="invalid_api_key")
        _error(s.post("/tokenize", {"prompt": "hi"}, {"Authorization": "Bearer s3cre"}), 401)
        _error(s.post("/v1/completions", b"{bad json", {"Authorization": "Basic s3cret"}), 401)
        assert s.client(api_key="s3cret").completions.create(model=s.model, prompt="hi", max_tokens=2).usage
        assert s.get("/health")[0] == 200 and s.get("/metrics")[0] == 200


def test_queue_full_is_503(llama, start_server):
    engine = LLMEngine(llama, num_kv_blocks=64, max_num_seqs=1)
    with start_server(engine, max_waiting=0) as s:
        client = s.client()
        stream = client.completions.create(model=s.model, prompt="hi", max_tokens=200, stream=True,
                                           extra_body={"ignore_eos": True})
        next(iter(stream))  # the first request holds the only sequence slot
        with pytest.raises(openai.InternalServerError) as e:
            client.completions.create(model=s.model, prompt="hello", max_tokens=2)
        assert e.value.status_code == 503 and e.value.code == "queue_full"
        _error(s.post("/v1/chat/completions", {"messages": [{"role": "user", "content": "a"}]}), 503)
        rest = list(stream)
        assert rest[-1].choices[0].finish_reason == "length"
        s.wait_idle()
        assert client.completions.create(model=s.model, prompt="hello", max_tokens=2).usage.completion_tokens == 2


def test_no_chat_template_is_400(llama, start_server):
    engine = LLMEngine(llama, num_kv_blocks=64)
    engine.tokenizer.chat_template = None  # a base model: no template
    with start_server(engine) as s:
        with pytest.raises(openai.BadRequestError) as e:
            s.client().chat.completions.create(model=s.model, messages=[{"role": "user", "content": "hi"}])
        assert e.value.code == "chat_template_missing" and "no chat template" in e.value.message
        assert s.client().completions.create(model=s.model, prompt="hi", max_tokens=2).usage


@pytest.fixture
def failing(llama, start_server):
    """A server whose model step raises whenever it computes the token at position POISON."""
    engine = LLMEngine(llama, num_kv_blocks=64)
    run = engine.model.executor.run

    def poisoned(inputs):
        if (inputs["position_ids"] == POISON).any():
            raise RuntimeError("injected kernel failure")
        return run(inputs)

    engine.model.executor.run = poisoned
    with start_server(engine) as s:
        yield s


def test_engine_failure_fails_only_that_request(failing):
    client = failing.client()
    with pytest.raises(openai.InternalServerError) as e:
        client.completions.create(model=failing.model, prompt=LONG[0], max_tokens=4)
    assert e.value.status_code == 500 and e.value.code == "engine_error"
    with pytest.raises(openai.APIError, match="engine failed"):
        list(client.completions.create(model=failing.model, prompt=LONG[1], max_tokens=4, stream=True))
    with pytest.raises(openai.APIError, match="engine failed"):
        list(client.chat.completions.create(model=failing.model, stream=True, max_tokens=4,
                                            messages=[{"role": "user", "content": LONG[2]}]))
    # The server goes on serving, with nothing left behind.
    assert client.completions.create(model=failing.model, prompt="fine", max_tokens=3).usage.completion_tokens == 3
    assert failing.get("/health")[0] == 200
    stats = failing.wait_idle()
    assert stats["finish_counts"]["error"] == 3


def test_engine_loop_error_fails_requests_in_flight(failing):
    """A step that raises outside the model (an engine bug) fails the requests it held."""
    engine = failing.state.engine
    step = engine.step
    broken = threading.Event()

    def step_once_broken():
        if not broken.is_set():
            broken.set()
            raise RuntimeError("scheduler bug")
        return step()

    engine.step = step_once_broken
    try:
        with pytest.raises(openai.InternalServerError, match="scheduler bug"):
            failing.client().completions.create(model=failing.model, prompt="a", max_tokens=3)
        assert failing.client().completions.create(model=failing.model, prompt="b", max_tokens=3).usage
    finally:
        engine.step = step
    failing.wait_idle()
