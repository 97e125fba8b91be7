"""LoRA adapters over HTTP: the request's `model` picks the adapter and gets the same greedy
text as `LLM.generate` with that LoRARequest; /v1/models lists them; load / unload round trips
(an adapter unloaded under a running request lets it finish, then frees its slot); the API key
guards both endpoints; a name taken, an unknown name, an adapter that does not fit and a server
without LoRA are clear errors."""

from __future__ import annotations

import asyncio
import json
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request

import pytest
import torch
from peft import LoraConfig, get_peft_model

from kiln import LLM, LoRARequest, SamplingParams
from kiln.models.checkpoint import load_reference_model
from kiln.runtime.engine import LLMEngine
from kiln.runtime.server.lora import LoRAModule, parse_lora_module

ADAPTERS = {"sql": (4, ["q_proj", "v_proj", "down_proj"]), "poet": (8, ["k_proj", "o_proj", "up_proj"]),
            "wide": (16, ["q_proj"])}
"""name: (rank, target modules); the engines serve ranks up to 8, so "wide" does not fit."""
LORA_KWARGS = {"enable_lora": True, "max_loras": 2, "max_lora_rank": 8, "num_kv_blocks": 64,
               "max_num_batched_tokens": 256}
PROMPT = [5, 17, 230, 41, 9, 77]
PARAMS = {"temperature": 0, "max_tokens": 8, "ignore_eos": True}
CLIENT_PARAMS = {"temperature": 0, "max_tokens": 8, "extra_body": {"ignore_eos": True}}
KEY = "sk-lora"


@pytest.fixture(scope="module")
def adapters(checkpoint, tmp_path_factory) -> dict[str, str]:
    """PEFT adapter directories with random A and nonzero B."""
    out = {}
    for i, (name, (r, targets)) in enumerate(ADAPTERS.items()):
        model = get_peft_model(load_reference_model(checkpoint("llama")),
                               LoraConfig(r=r, lora_alpha=2 * r, target_modules=targets))
        g = torch.Generator().manual_seed(10 + i)
        with torch.no_grad():
            for pname, p in model.named_parameters():
                if "lora_" in pname:
                    p.copy_(torch.randn(p.shape, generator=g) * 0.3)
        path = tmp_path_factory.mktemp(f"lora-{name}")
        model.save_pretrained(path)
        out[name] = str(path)
    return out


@pytest.fixture(scope="module")
def lora_artifact(artifact):
    return artifact("llama", max_lora_rank=16)


@pytest.fixture(scope="module")
def llm(lora_artifact):
    return LLM(lora_artifact, **LORA_KWARGS)


def _offline(llm: LLM, adapters: dict[str, str], name: str | None, prompt=PROMPT) -> str:
    lora = LoRARequest(name, 1 + list(ADAPTERS).index(name), adapters[name]) if name else None
    out = llm.generate({"prompt_token_ids": prompt}, SamplingParams(**PARAMS), use_tqdm=False, lora_request=lora)
    return out[0].outputs[0].text


@pytest.fixture(scope="module")
def lora_server(start_server, lora_artifact, adapters):
    modules = [LoRAModule("sql", adapters["sql"]), LoRAModule("poet", adapters["poet"], "tiny-llama-base")]
    with start_server(LLMEngine(lora_artifact, **LORA_KWARGS), served_model_name="tiny-llama",
                      lora_modules=modules, api_key=KEY) as s:
        yield s


def _complete(server, model: str, api_key: str = KEY, prompt=PROMPT) -> tuple[int, dict]:
    return server.post("/v1/completions", {"model": model, "prompt": prompt, **PARAMS},
                       {"Authorization": f"Bearer {api_key}"})


def _post(server, path: str, body: dict, api_key: str | None = KEY) -> tuple[int, object]:
    return server.post(path, body, {"Authorization": f"Bearer {api_key}"} if api_key else {})


def test_model_picks_the_adapter(lora_server, llm, adapters):
    texts = {}
    for model in ("tiny-llama", "sql", "poet"):
        status, body = _complete(lora_server, model)
        assert status == 200, body
        assert body["model"] == model
        texts[model] = body["choices"][0]["text"]
        assert texts[model] == _offline(llm, adapters, None if model == "tiny-llama" else model), model
    assert len(set(texts.values())) == 3  # each adapter changes the text
    chat = lora_server.client(KEY).chat.completions.create(
        model="poet", messages=[{"role": "user", "content": "Hi"}], **CLIENT_PARAMS)
    ids = _post(lora_server, "/tokenize", {"model": "poet", "messages": [{"role": "user", "content": "Hi"}]})[1]
    assert chat.model == "poet"
    assert chat.choices[0].message.content == _offline(llm, adapters, "poet", ids["tokens"])
    lora_server.wait_idle()
    status, metrics = lora_server.get("/metrics")
    assert 'kiln_lora_requests_info{max_lora="2",running_lora_adapters="",waiting_lora_adapters=""} 1.0' in metrics


def test_models_lists_adapters(lora_server, adapters):
    cards = {m.id: m for m in lora_server.client(KEY).models.list().data}
    assert list(cards) == ["tiny-llama", "sql", "poet"]
    assert cards["sql"].root == adapters["sql"] and cards["sql"].parent == "tiny-llama"
    assert cards["poet"].parent == "tiny-llama-base"
    assert cards["tiny-llama"].parent is None


def test_unknown_model_is_404(lora_server):
    status, body = _complete(lora_server, "nope")
    assert status == 404
    assert body["error"]["code"] == "model_not_found" and body["error"]["param"] == "model"
    assert "'nope' does not exist" in body["error"]["message"]


def test_load_unload_round_trip(lora_server, llm, adapters):
    sql_id = lora_server.state.loras.by_name["sql"].lora_int_id
    assert _post(lora_server, "/v1/unload_lora_adapter", {"lora_name": "sql"}) == \
        (200, "Success: LoRA adapter 'sql' removed successfully.")
    assert _complete(lora_server, "sql")[0] == 404
    assert "sql" not in {m.id for m in lora_server.client(KEY).models.list().data}
    lora_server.wait_idle()
    assert sql_id not in lora_server.state.engine.lora.adapters  # forgotten, its slot free
    assert sql_id not in lora_server.state.engine.lora.held
    status, text = _post(lora_server, "/v1/load_lora_adapter", {"lora_name": "sql", "lora_path": adapters["sql"]})
    assert (status, text) == (200, "Success: LoRA adapter 'sql' added successfully.")
    assert lora_server.state.loras.by_name["sql"].lora_int_id > sql_id  # ids are never reused
    status, body = _complete(lora_server, "sql")
    assert status == 200 and body["choices"][0]["text"] == _offline(llm, adapters, "sql")
    # by id, too
    status, _ = _post(lora_server, "/v1/load_lora_adapter", {"lora_name": "sql2", "lora_path": adapters["sql"]})
    assert status == 200
    sql2 = lora_server.state.loras.by_name["sql2"].lora_int_id
    assert _post(lora_server, "/v1/unload_lora_adapter", {"lora_int_id": sql2})[0] == 200
    assert _complete(lora_server, "sql2")[0] == 404


def test_unload_while_running_lets_the_request_finish(lora_server, llm, adapters, monkeypatch):
    """The adapter is unloaded while its request runs (held after its first step until the
    unload is done): the request ends with the adapter's text, and only then is the slot freed."""
    engine = lora_server.state.engine
    step = engine.step
    unloaded = threading.Event()

    def held_step(*args, **kwargs):
        if not unloaded.is_set() and any(r.adapter_id == lora_id for r in engine.scheduler.running):
            time.sleep(0.002)  # no step, but the engine loop still takes commands (the unload)
            return []
        return step(*args, **kwargs)

    assert _post(lora_server, "/v1/load_lora_adapter", {"lora_name": "tmp", "lora_path": adapters["poet"]})[0] == 200
    lora_id = lora_server.state.loras.by_name["tmp"].lora_int_id
    monkeypatch.setattr(engine, "step", held_step)

    async def run() -> tuple[str, bool]:
        client = lora_server.async_client(KEY)
        task = asyncio.create_task(client.completions.create(model="tmp", prompt=PROMPT, **CLIENT_PARAMS))
        while not any(r.adapter_id == lora_id for r in engine.scheduler.running):
            await asyncio.sleep(0.005)
        status, _ = await asyncio.to_thread(_post, lora_server, "/v1/unload_lora_adapter", {"lora_name": "tmp"})
        assert status == 200
        assert _complete(lora_server, "tmp")[0] == 404
        still_held = lora_id in engine.lora.adapters and not task.done()
        unloaded.set()
        return (await task).choices[0].text, still_held

    text, still_held = asyncio.run(run())
    assert still_held
    assert text == _offline(llm, adapters, "poet")
    lora_server.wait_idle()
    assert lora_id not in engine.lora.adapters and lora_id not in engine.lora.held


def test_load_errors(lora_server, adapters, tmp_path):
    def load(name, path):
        return _post(lora_server, "/v1/load_lora_adapter", {"lora_name": name, "lora_path": path})

    for name, message in (("poet", "already been loaded"), ("tiny-llama", "the served model's name")):
        status, body = load(name, adapters["poet"])
        assert status == 400 and message in body["error"]["message"] and body["error"]["param"] == "lora_name", body
    status, body = load("wide", adapters["wide"])
    assert status == 400 and "rank 16, above max_lora_rank=8" in body["error"]["message"]
    assert body["error"]["param"] == "lora_path"
    status, body = load("empty", str(tmp_path))
    assert status == 400 and "is not a PEFT adapter directory" in body["error"]["message"]
    assert load("no-path", "")[0] == 400
    status, body = _post(lora_server, "/v1/unload_lora_adapter", {"lora_name": "ghost"})
    assert status == 404 and body["error"]["message"] == "The lora adapter 'ghost' cannot be found."
    assert _post(lora_server, "/v1/unload_lora_adapter", {})[0] == 400
    assert {m.id for m in lora_server.client(KEY).models.list().data} >= {"poet"}
    assert not {"wide", "empty", "no-path"} & set(lora_server.state.loras.by_name)


def test_api_key_guards_the_endpoints(lora_server, adapters):
    body = {"lora_name": "keyless", "lora_path": adapters["sql"]}
    for api_key in (None, "wrong"):
        assert _post(lora_server, "/v1/load_lora_adapter", body, api_key)[0] == 401
        assert _post(lora_server, "/v1/unload_lora_adapter", {"lora_name": "poet"}, api_key)[0] == 401
    assert "keyless" not in lora_server.state.loras.by_name
    assert "poet" in lora_server.state.loras.by_name


def test_server_without_lora(server, adapters):
    status, body = server.post("/v1/load_lora_adapter", {"lora_name": "sql", "lora_path": adapters["sql"]})
    assert status == 400 and "--enable-lora" in body["error"]["message"]
    assert server.post("/v1/unload_lora_adapter", {"lora_name": "sql"})[0] == 400


def test_startup_modules_are_checked(lora_artifact, adapters, llama):
    from kiln.runtime.server.app import build_app

    engine = LLMEngine(lora_artifact, **LORA_KWARGS)
    with pytest.raises(ValueError, match="above max_lora_rank=8"):
        build_app(engine, lora_modules=[LoRAModule("wide", adapters["wide"])])
    with pytest.raises(ValueError, match="given twice"):
        build_app(engine, lora_modules=[LoRAModule("a", adapters["sql"]), LoRAModule("a", adapters["poet"])])
    with pytest.raises(ValueError, match="enable_lora"):
        build_app(LLMEngine(llama, num_kv_blocks=16), lora_modules=[LoRAModule("a", adapters["sql"])])


def test_parse_lora_modules():
    assert parse_lora_module("sql=/a/b") == LoRAModule("sql", "/a/b")
    assert parse_lora_module('{"name": "sql", "path": "/a", "base_model_name": "m"}') == LoRAModule("sql", "/a", "m")
    for bad in ("sql", "=/a", '{"name": "sql"}', "{oops"):
        with pytest.raises(ValueError, match="--lora-modules"):
            parse_lora_module(bad)


def _kiln_serve(artifact, *args: str) -> tuple[subprocess.Popen, str]:
    """`kiln serve ARTIFACT ARGS` on a free port; (process, base url) once it answers, or the
    process after it exited."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    cmd = [sys.executable, "-m", "kiln.cli", "serve", str(artifact), "--port", str(port), "--num-kv-blocks", "64",
           "--served-model-name", "tiny", *args]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 90
    while proc.poll() is None and time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url + "/health", timeout=1):
                return proc, url
        except OSError:
            time.sleep(0.1)
    proc.kill()
    return proc, url


def test_kiln_serve_lora_flags(lora_artifact, adapters, llm):
    poet = json.dumps({"name": "poet", "path": adapters["poet"], "base_model_name": "tiny"})
    proc, url = _kiln_serve(lora_artifact, "--max-loras", "2", "--max-lora-rank", "8", "--lora-modules",
                            f"sql={adapters['sql']}", poet)
    try:
        assert proc.poll() is None, proc.communicate()[0]
        with urllib.request.urlopen(url + "/v1/models", timeout=10) as r:
            assert [m["id"] for m in json.load(r)["data"]] == ["tiny", "sql", "poet"]
        req = urllib.request.Request(url + "/v1/completions", data=json.dumps({"model": "sql", "prompt": PROMPT,
                                     **PARAMS}).encode(), headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=60) as r:
            assert json.load(r)["choices"][0]["text"] == _offline(llm, adapters, "sql")
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0
    proc, _ = _kiln_serve(lora_artifact, "--max-lora-rank", "8", "--lora-modules", f"wide={adapters['wide']}")
    out = proc.communicate(timeout=60)[0]
    assert proc.returncode == 2 and "rank 16, above max_lora_rank=8" in out, out
