"""Real servers on loopback ports: uvicorn in a background thread over a compiled tiny llama.

The test keeps a handle on the app, so it can look at the engine (KV pool, queues) after the
HTTP traffic is done; `tests/server/test_process.py` runs `kiln serve` as a subprocess instead.
"""

from __future__ import annotations

import json
import socket
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import pytest
import uvicorn
from fastapi import FastAPI
from openai import AsyncOpenAI, OpenAI

from kiln.runtime.engine import LLMEngine
from kiln.runtime.server.app import build_app
from kiln.runtime.server.serving import ServerState

ENGINE_KWARGS = {"num_kv_blocks": 256, "max_num_batched_tokens": 512}
"""256 blocks of 16 tokens: room for ~16 full-context sequences, so heavy load preempts."""


@dataclass
class Server:
    base_url: str
    app: FastAPI
    uvicorn: uvicorn.Server
    thread: threading.Thread

    @property
    def state(self) -> ServerState:
        return self.app.state.kiln

    @property
    def model(self) -> str:
        return self.state.model_name

    def client(self, api_key: str = "unused") -> OpenAI:
        return OpenAI(base_url=f"{self.base_url}/v1", api_key=api_key, max_retries=0, timeout=60)

    def async_client(self, api_key: str = "unused") -> AsyncOpenAI:
        return AsyncOpenAI(base_url=f"{self.base_url}/v1", api_key=api_key, max_retries=0, timeout=60)

    def post(self, path: str, body: Any, headers: dict[str, str] | None = None) -> tuple[int, Any]:
        """(status, parsed JSON or text) of a raw POST; body is bytes or JSON-able data."""
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        req = urllib.request.Request(self.base_url + path, data=data, method="POST",
                                     headers={"Content-Type": "application/json", **(headers or {})})
        return _send(req)

    def get(self, path: str, headers: dict[str, str] | None = None) -> tuple[int, Any]:
        return _send(urllib.request.Request(self.base_url + path, headers=headers or {}))

    def wait_idle(self, timeout: float = 20.0) -> dict[str, Any]:
        """Wait (bounded) until no request runs, waits or is read, and every KV block is free."""
        deadline = time.monotonic() + timeout
        eng = self.state.async_engine
        while time.monotonic() < deadline:
            s = eng.stats
            if (s["running"] == 0 and s["waiting"] == 0 and eng.num_streams == 0
                    and s["num_free_kv_blocks"] == s["num_kv_blocks"]):
                return s
            time.sleep(0.02)
        raise AssertionError(f"server not idle after {timeout}s: {eng.stats}, {eng.num_streams} streams")


def _send(req: urllib.request.Request) -> tuple[int, Any]:
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            status, raw = r.status, r.read()
    except urllib.error.HTTPError as e:
        status, raw = e.code, e.read()
    try:
        return status, json.loads(raw)
    except ValueError:
        return status, raw.decode("utf-8", "replace")


@contextmanager
def serve(engine: LLMEngine, **app_kwargs: Any) -> Iterator[Server]:
    """Run build_app(engine, **app_kwargs) on a free 127.0.0.1 port until the block exits."""
    app = build_app(engine, **app_kwargs)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))  # bound here, so no other process can take the port meanwhile
    port = sock.getsockname()[1]
    config = uvicorn.Config(app, log_level="warning", lifespan="on", timeout_graceful_shutdown=5)
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the test server did not start")
        time.sleep(0.01)
    try:
        yield Server(f"http://127.0.0.1:{port}", app, server, thread)
    finally:
        server.should_exit = True
        thread.join(30)
        sock.close()


@pytest.fixture(scope="session")
def engine_kwargs() -> dict[str, int]:
    return dict(ENGINE_KWARGS)


@pytest.fixture(scope="session")
def start_server():
    """start_server(engine, **build_app_kwargs): a context manager running a server."""
    return serve


@pytest.fixture(scope="session")
def llama(artifact):
    """The compiled tiny llama (its tokenizer has a chat template)."""
    return artifact("llama")


@pytest.fixture(scope="session")
def server(llama) -> Iterator[Server]:
    """One shared server; tests leave it idle."""
    with serve(LLMEngine(llama, **ENGINE_KWARGS), artifact=str(llama), served_model_name="tiny-llama") as s:
        yield s
