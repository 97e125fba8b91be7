"""`kiln serve`: load an artifact, then run the app under uvicorn until SIGTERM or SIGINT."""

from __future__ import annotations

import asyncio
import logging
import signal
import socket
import time
from pathlib import Path
from typing import Any

import uvicorn

from kiln.runtime.async_engine import AsyncLLMEngine
from kiln.runtime.engine import LLMEngine
from kiln.runtime.server.app import build_app
from kiln.runtime.server.body import DEFAULT_MAX_BYTES
from kiln.runtime.server.lora import LoRAModule

log = logging.getLogger(__name__)

BACKSTOP_S = 5
"""After the grace period's aborts, how long uvicorn still waits before cancelling handlers."""


class GracefulServer(uvicorn.Server):
    """uvicorn's server with kiln's shutdown: stop accepting (close the listening sockets and
    idle keep-alive connections), let in-flight requests finish for `grace` seconds, then abort
    what is left in the engine, so each of those clients still gets a well-formed answer (503,
    or an error event and [DONE] in a stream) instead of a cut connection."""

    def __init__(self, config: uvicorn.Config, engine: AsyncLLMEngine, grace: float):
        super().__init__(config)
        self.engine = engine
        self.grace = grace

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        for server in self.servers:
            server.close()
        for connection in list(self.server_state.connections):
            connection.shutdown()  # idle: closed now; busy: closed after its response
        deadline = time.monotonic() + self.grace
        while self.server_state.tasks and time.monotonic() < deadline and not self.force_exit:
            await asyncio.sleep(0.05)
        if self.server_state.tasks and (n := self.engine.abort_all()):
            log.warning("shutdown: aborted %d requests still running after %.0f s", n, self.grace)
        await super().shutdown(sockets)


def serve(artifact: str | Path, *, host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None,
          served_model_name: str | None = None, max_waiting: int = 1024, shutdown_timeout: float = 30.0,
          log_level: str = "info", engine_kwargs: dict[str, Any] | None = None,
          max_request_bytes: int = DEFAULT_MAX_BYTES, enable_docs: bool = False,
          lora_modules: list[LoRAModule] | None = None) -> int:
    """Serve until SIGTERM/SIGINT, then shut down gracefully (see GracefulServer); returns the
    exit status: 0 after a graceful shutdown."""
    if max_request_bytes < 1:
        raise ValueError(f"--max-request-bytes must be >= 1, got {max_request_bytes}")
    engine = LLMEngine(artifact, **(engine_kwargs or {}))  # load before binding: fail fast
    app = build_app(engine, artifact=str(artifact), served_model_name=served_model_name, api_key=api_key,
                    max_waiting=max_waiting, max_request_bytes=max_request_bytes, enable_docs=enable_docs,
                    lora_modules=lora_modules or ())
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, access_log=False,
                            timeout_graceful_shutdown=BACKSTOP_S, lifespan="on")
    server = GracefulServer(config, app.state.kiln.async_engine, shutdown_timeout)
    # After its shutdown uvicorn re-raises the signal it caught on the handler that was installed
    # before it; with a no-op handler the process then exits 0 instead of dying by the signal.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: None)
    server.run()
    return 0 if server.started else 1
