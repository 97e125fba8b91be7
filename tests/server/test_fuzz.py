"""Property-based fuzz of request bodies: no input gives a 500 or stops the server.

Three sources of bodies: schema-valid ones drawn from the server's own /openapi.json (so every
field and type combination is tried, with values outside the ranges), objects whose known keys
hold arbitrary JSON, and arbitrary bytes. The fuzz server's context is 32 tokens, so even an
accepted request with n=128 runs in milliseconds.
"""

from __future__ import annotations

import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis_jsonschema import from_schema

from kiln.runtime.engine import LLMEngine

ROUTES = {
    "/v1/completions": "CompletionRequest",
    "/v1/chat/completions": "ChatCompletionRequest",
    "/tokenize": "TokenizeRequest",
    "/detokenize": "DetokenizeRequest",
}
FUZZ = settings(max_examples=40, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                       HealthCheck.data_too_large, HealthCheck.filter_too_much])
JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)


@pytest.fixture(scope="module")
def fuzz_server(llama, start_server):
    engine = LLMEngine(llama, num_kv_blocks=512, max_model_len=32)
    with start_server(engine) as s:
        s.schema = s.get("/openapi.json")[1]
        yield s
        assert STATUSES.get(200, 0) >= 20, STATUSES  # the fuzz reaches generation, not only validation
        assert s.get("/health") == (200, {"status": "ok"})
        s.wait_idle()


STATUSES: dict[int, int] = {}
"""How often each status came back (the fuzz must also produce accepted requests)."""


def _check(server, path: str, body) -> None:
    status, reply = server.post(path, body)
    STATUSES[status] = STATUSES.get(status, 0) + 1
    assert status in (200, 400, 404), (path, body, status, reply)
    if status != 200:
        assert set(reply["error"]) == {"message", "type", "param", "code"}, reply
    elif isinstance(reply, str):  # a stream: ends with [DONE], and any error in it is not a 500
        events = [e.removeprefix("data: ") for e in reply.split("\n\n") if e]
        assert events[-1] == "[DONE]", reply[-200:]
        for e in events[:-1]:
            assert "error" not in json.loads(e) or json.loads(e)["error"]["code"] != "engine_error", e


def _schema(server, name: str) -> dict:
    return {"$ref": f"#/components/schemas/{name}", "components": server.schema["components"]}


@pytest.mark.parametrize("path", list(ROUTES))
def test_schema_valid_bodies(fuzz_server, path):
    @FUZZ
    @given(body=from_schema(_schema(fuzz_server, ROUTES[path])))
    def run(body):
        _check(fuzz_server, path, body)

    run()


@pytest.mark.parametrize("path", list(ROUTES))
def test_known_keys_with_any_json(fuzz_server, path):
    props = list(fuzz_server.schema["components"]["schemas"][ROUTES[path]]["properties"])

    @FUZZ
    @given(body=st.dictionaries(st.sampled_from(props), JSON_VALUES, max_size=6))
    def run(body):
        _check(fuzz_server, path, body)

    run()


def _edge(*values):
    return st.sampled_from(values)


SAMPLING = {  # values at and past the edges of every sampling field
    "temperature": _edge(0, 1e-30, 1e-6, 0.7, 1, 2, 1e30, 1e308, -1),
    "top_p": _edge(1e-30, 1e-6, 0.5, 1, 0, 1.5),
    "top_k": _edge(-1, 0, 1, 5, 255, 256, 10**6, 2**31 - 1, -2),
    "min_p": _edge(0, 1e-9, 0.5, 1, 1.5),
    "presence_penalty": _edge(-2, 0, 2, 3), "frequency_penalty": _edge(-2, 0, 2),
    "repetition_penalty": _edge(1e-30, 0.5, 1, 2, 1e30, 0),
    "seed": st.integers(-(2**63), 2**63 - 1), "n": st.integers(1, 8), "max_tokens": st.integers(1, 16),
    "min_tokens": st.integers(0, 12), "stop": st.lists(st.text(min_size=1, max_size=3), max_size=3),
    "stop_token_ids": st.lists(st.integers(0, 300), max_size=3), "ignore_eos": st.booleans(),
    "skip_special_tokens": st.booleans(), "include_stop_str_in_output": st.booleans(),
    "stream": st.booleans(), "stream_options": st.fixed_dictionaries({"include_usage": st.booleans()}),
}
PROMPTS = {
    "/v1/completions": st.fixed_dictionaries({"prompt": st.text(min_size=1, max_size=12)
                                              | st.lists(st.integers(0, 255), min_size=1, max_size=12)},
                                             optional={"logprobs": st.integers(0, 21), "echo": st.booleans(),
                                                       **SAMPLING}),
    "/v1/chat/completions": st.fixed_dictionaries(
        {"messages": st.lists(st.fixed_dictionaries({"role": st.sampled_from(["system", "user", "assistant"]),
                                                     "content": st.text(max_size=8)}), min_size=1, max_size=2)},
        optional={"logprobs": st.booleans(), "top_logprobs": st.integers(0, 21), **SAMPLING}),
}


@pytest.mark.parametrize("path", list(PROMPTS))
def test_plausible_bodies_with_edge_values(fuzz_server, path):
    @settings(FUZZ, max_examples=80)
    @given(body=PROMPTS[path])
    def run(body):
        _check(fuzz_server, path, body)

    run()


@FUZZ
@given(raw=st.binary(max_size=64) | JSON_VALUES.map(lambda v: json.dumps(v).encode()))
def test_any_bytes(fuzz_server, raw):
    for path in ROUTES:
        status, reply = fuzz_server.post(path, raw)
        assert status in (400, 404), (path, raw, status, reply)


def test_pathological_bodies(fuzz_server):
    for raw in (b"[" * 100_000, b'{"prompt": "' + b"\xff" * 10 + b'"}', b"\x00" * 1000):
        for path in ROUTES:
            assert fuzz_server.post(path, raw)[0] == 400, (path, raw[:40])
    for field in (b'"n": 1e999', b'"temperature": NaN', b'"top_p": -Infinity', b'"top_k": 1e400',
                  b'"seed": 99999999999999999999999', b'"max_tokens": 1.0'):
        raw = b'{"prompt": "a", ' + field + b"}"
        assert fuzz_server.post("/v1/completions", raw)[0] == 400, raw
