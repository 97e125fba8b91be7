"""Attack inputs from outside checks (issue 9, items 6-10), each refused with a helpful 4xx."""

from __future__ import annotations

import http.client
import json
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request

import pytest

from kiln.runtime.engine import LLMEngine
from kiln.runtime.server.app import default_model_name


def _error(status_body, status, param=None, code=None):
    status_got, body = status_body
    assert status_got == status, body
    err = body["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    assert err["code"] is not None, err
    assert err["param"] == param, err
    if code is not None:
        assert err["code"] == code, err
    return err


# -- 6: lone surrogates --------------------------------------------------------------------------

@pytest.mark.parametrize("path, body, param, where", [
    ("/v1/completions", b'{"prompt": "a\\ud800b", "max_tokens": 2}', "prompt", "prompt"),
    ("/v1/completions", b'{"prompt": ["ok", "a\\udfffb"], "max_tokens": 2}', "prompt", "prompt[1]"),
    ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": "a\\ud800b"}]}', "messages",
     "messages[0].content"),
    ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": [{"type": "text", "text": "\\ud800"}]}]}',
     "messages", "messages[0].content[0].text"),
    ("/tokenize", b'{"prompt": "a\\ud800b"}', "prompt", "prompt"),
    ("/tokenize", b'{"messages": [{"role": "user", "content": "\\udc00"}]}', "messages", "messages[0].content"),
    ("/v1/completions", b'{"prompt": "hi", "model": "\\ud800"}', "model", "model"),
])
def test_lone_surrogate_is_400_naming_the_field(server, path, body, param, where):
    err = _error(server.post(path, body), 400, param, "invalid_value")
    assert err["message"].startswith(where + ":") and "surrogate" in err["message"]


def test_surrogate_pair_is_text(server):
    status, body = server.post("/tokenize", b'{"prompt": "a\\ud83d\\ude00b"}')
    assert status == 200 and body["count"] > 0, body


# -- 7: body-size limit, tokenization off the event loop ----------------------------------------

def test_body_over_limit_is_413(llama, start_server, engine_kwargs):
    with start_server(LLMEngine(llama, **engine_kwargs), artifact=str(llama), max_request_bytes=1000) as s:
        err = _error(s.post("/v1/completions", {"prompt": "x" * 2000}), 413, None, "request_too_large")
        assert "1000 bytes" in err["message"] and "--max-request-bytes" in err["message"]
        # chunked: no Content-Length, refused while reading
        u = urllib.parse.urlparse(s.base_url)
        conn = http.client.HTTPConnection(u.hostname, u.port, timeout=30)
        chunks = (json.dumps({"prompt": "y" * 3000}).encode()[i:i + 500] for i in range(0, 3100, 500))
        conn.request("POST", "/v1/completions", body=chunks, headers={"Content-Type": "application/json"},
                     encode_chunked=True)
        r = conn.getresponse()
        assert r.status == 413 and json.loads(r.read())["error"]["code"] == "request_too_large"
        conn.close()
        status, _ = s.post("/v1/completions", {"prompt": "hi", "max_tokens": 1})
        assert status == 200


def test_default_limit_drains_the_refused_body(server):
    """5 MB (over the default 4 MiB, more than socket buffers hold): the client still reads the
    413 instead of a connection reset."""
    err = _error(server.post("/v1/completions", b"x" * 5_000_000), 413, None, "request_too_large")
    assert "5000000 bytes" in err["message"] and str(4 * 1024 * 1024) in err["message"]


def _get_ms(url: str) -> float:
    t = time.perf_counter()
    with urllib.request.urlopen(url, timeout=30) as r:
        assert r.status == 200
        r.read()
    return (time.perf_counter() - t) * 1000


def health_during_tokenization(base_url: str, prompt: str, path: str = "/tokenize") -> tuple[float, float, int]:
    """(max /health latency in ms while `prompt` is tokenized, seconds the big request took, its status)."""
    result: dict[str, object] = {}

    def big() -> None:
        req = urllib.request.Request(base_url + path, data=json.dumps({"prompt": prompt}).encode(),
                                     method="POST", headers={"Content-Type": "application/json"})
        t = time.perf_counter()
        try:
            with urllib.request.urlopen(req, timeout=120) as r:
                result["status"] = r.status
                r.read()
        except urllib.error.HTTPError as e:
            result["status"] = e.code
        result["seconds"] = time.perf_counter() - t

    thread = threading.Thread(target=big)
    thread.start()
    time.sleep(0.3)  # the body is read and tokenization has begun
    worst = 0.0
    while thread.is_alive():
        worst = max(worst, _get_ms(base_url + "/health"))
        time.sleep(0.01)
    thread.join()
    return worst, float(result["seconds"]), int(result["status"])


@pytest.mark.parametrize("path", ["/tokenize", "/v1/completions"])
def test_health_answers_while_a_large_prompt_is_tokenized(server, path):
    prompt = ("def fibonacci(n): return n if n < 2 else fibonacci(n - 1) + fibonacci(n - 2)\n" * 40000)[:3_000_000]
    worst, seconds, status = health_during_tokenization(server.base_url, prompt, path)
    assert status == (200 if path == "/tokenize" else 400)
    assert seconds > 0.5, "the prompt is too small to show anything"
    assert worst < 100, f"/health took {worst:.0f} ms while a {len(prompt)}-char prompt was tokenized"


# -- 8: requests that can never fit --------------------------------------------------------------

def test_more_sequences_than_ever_accepted_is_400(server):
    limit = server.state.async_engine.capacity
    err = _error(server.post("/v1/completions", {"prompt": ["x"] * 10000, "n": 128, "max_tokens": 1}), 400,
                 "prompt", "request_too_large")
    assert str(limit) in err["message"] and "more than this server accepts" in err["message"]
    server.wait_idle()


def test_sequence_larger_than_the_kv_cache_is_400(llama, start_server):
    with start_server(LLMEngine(llama, num_kv_blocks=4, max_num_batched_tokens=512), artifact=str(llama),
                      max_waiting=2) as s:
        cache = s.state.max_cache_tokens
        err = _error(s.post("/v1/completions", {"prompt": "hi", "max_tokens": cache + 10}), 400, "max_tokens",
                     "request_too_large")
        assert f"at most {cache} tokens" in err["message"]
        limit = s.state.async_engine.capacity
        err = _error(s.post("/v1/completions", {"prompt": ["a"] * (limit + 1)}), 400, "prompt",
                     "request_too_large")
        assert f"at most {limit}" in err["message"]
        # max_tokens left out: capped by what the cache holds, so it runs to the end
        status, body = s.post("/v1/completions", {"prompt": "hi", "max_tokens": None, "ignore_eos": True,
                                                  "temperature": 0})
        assert status == 200, body
        assert body["usage"]["total_tokens"] <= cache
        s.wait_idle()


# -- 9: unhelpful 400s ---------------------------------------------------------------------------

def test_invalid_utf8_is_400_with_a_code(server):
    err = _error(server.post("/v1/completions", b'{"prompt": "a\xff\xfeb"}'), 400, None, "invalid_encoding")
    assert "UTF-8" in err["message"] and "byte 13" in err["message"]


def test_deep_json_is_400_with_a_code(server):
    err = _error(server.post("/v1/completions", b"[" * 100_000 + b"]" * 100_000), 400, None, "invalid_json")
    assert "nested too deeply" in err["message"]
    err = _error(server.post("/v1/completions", b'{"prompt": "hi",'), 400, None, "invalid_json")


@pytest.mark.parametrize("prompt, where", [
    ([2**63], "prompt"), ([2.0], "prompt[0]"), ([5, 2.5], "prompt[1]"), ([[1, 2], [3, "x"]], "prompt[1][1]"),
    ([-1], "prompt"), ([[2**70]], "prompt"), (["a", 3], "prompt[1]"), ({"a": 1}, "prompt"),
])
def test_bad_prompt_token_ids_name_the_field_and_range(server, prompt, where):
    err = _error(server.post("/v1/completions", {"prompt": prompt, "max_tokens": 1}), 400, "prompt")
    assert err["message"].startswith(where), err
    assert "more errors" not in err["message"] and "prompt.str" not in err["message"]
    if isinstance(prompt, list) and not isinstance(prompt[0], str):
        assert f"[0, {server.state.vocab_size})" in err["message"], err


@pytest.mark.parametrize("ids", [[10**9], [-1], [2**64]])
def test_stop_token_ids_outside_the_vocabulary_are_400(server, ids):
    for path, extra in (("/v1/completions", {"prompt": "hi"}),
                        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]})):
        err = _error(server.post(path, {**extra, "stop_token_ids": ids, "max_tokens": 1}), 400, "stop_token_ids")
        assert f"[0, {server.state.vocab_size})" in err["message"]
    err = _error(server.post("/v1/completions", b'{"prompt": "hi", "stop_token_ids": [1e9]}'), 400, "stop_token_ids")
    assert f"[0, {server.state.vocab_size})" in err["message"]


def test_union_errors_say_which_forms_are_accepted(server):
    err = _error(server.post("/v1/completions", {"prompt": "hi", "stop": [1]}), 400, "stop")
    assert err["message"].startswith("stop: must be a string or a list of strings"), err


def test_detokenize_out_of_range_names_the_range(server):
    err = _error(server.post("/detokenize", {"tokens": [2**63]}), 400, "tokens")
    assert f"[0, {server.state.vocab_size})" in err["message"]


# -- 10: model id and /docs ----------------------------------------------------------------------

def test_default_model_id_is_the_directory_name(llama, start_server, engine_kwargs):
    assert default_model_name(f"{llama}/") == llama.name
    with start_server(LLMEngine(llama, **engine_kwargs), artifact=str(llama)) as s:
        assert s.model == llama.name
        status, models = s.get("/v1/models")
        assert status == 200 and str(llama.parent) not in json.dumps(models)
        assert [m["id"] for m in models["data"]] == [llama.name]
        status, body = s.post("/v1/completions", {"model": "nope", "prompt": "hi"})
        assert status == 404 and str(llama.parent) not in body["error"]["message"]
        assert llama.name in body["error"]["message"]
        # /docs and /redoc would load Swagger UI / ReDoc from a CDN: off unless asked for
        assert s.get("/docs")[0] == 404 and s.get("/redoc")[0] == 404
        assert s.get("/openapi.json")[0] == 200


def test_docs_on_request(llama, start_server, engine_kwargs):
    with start_server(LLMEngine(llama, **engine_kwargs), artifact=str(llama), enable_docs=True) as s:
        status, page = s.get("/docs")
        assert status == 200 and "openapi.json" in page


def test_kiln_serve_options(kiln_serve_options):
    """`kiln serve --max-request-bytes N --enable-docs`, and the default model id, in a real process."""
    url, artifact = kiln_serve_options("--max-request-bytes", "2000", "--enable-docs")
    req = urllib.request.Request(url + "/v1/completions", data=json.dumps({"prompt": "x" * 3000}).encode(),
                                 method="POST", headers={"Content-Type": "application/json"})
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(req, timeout=30)
    assert e.value.code == 413 and "at most 2000 bytes" in json.loads(e.value.read())["error"]["message"]
    with urllib.request.urlopen(url + "/docs", timeout=30) as r:
        assert r.status == 200
    with urllib.request.urlopen(url + "/v1/models", timeout=30) as r:
        assert [m["id"] for m in json.loads(r.read())["data"]] == [artifact.name]


@pytest.fixture
def kiln_serve_options(llama):
    procs = []

    def start(*extra: str):
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
        sock.close()
        proc = subprocess.Popen([sys.executable, "-m", "kiln.cli", "serve", str(llama), "--port", str(port),
                                 "--num-kv-blocks", "256", *extra],
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        procs.append(proc)
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while True:
            try:
                with urllib.request.urlopen(url + "/health", timeout=2):
                    return url, llama
            except (urllib.error.URLError, ConnectionError):
                if proc.poll() is not None or time.monotonic() > deadline:
                    proc.kill()
                    pytest.fail(f"kiln serve did not start:\n{proc.communicate()[0]}")
                time.sleep(0.1)

    yield start
    for p in procs:
        p.kill()
        p.wait()
