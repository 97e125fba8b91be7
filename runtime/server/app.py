"""The FastAPI app: an OpenAI-compatible API over one loaded artifact.

`build_app(engine, ...)` wires the async engine loop (started and stopped with the app's
lifespan), metrics, the API-key middleware, OpenAI-format error handlers and the routes:

    POST /v1/completions        completions.py     POST /tokenize     tokenization.py
    POST /v1/chat/completions   chat.py            POST /detokenize   tokenization.py
    POST /v1/load_lora_adapter  lora.py            POST /v1/unload_lora_adapter  lora.py
    GET  /v1/models   GET /health   GET /metrics   GET /openapi.json  (here / FastAPI)
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST

import kiln
from kiln.runtime.async_engine import AsyncLLMEngine
from kiln.runtime.engine import LLMEngine
from kiln.runtime.server import chat, completions, lora, tokenization
from kiln.runtime.server.auth import APIKeyMiddleware
from kiln.runtime.server.body import DEFAULT_MAX_BYTES, BodyGuard
from kiln.runtime.server.chat_template import ChatTemplate
from kiln.runtime.server.errors import APIError, install_error_handlers
from kiln.runtime.server.lora import LoRAModule, LoRAModules
from kiln.runtime.server.metrics import ServerMetrics
from kiln.runtime.server.responses import ModelCard, ModelList
from kiln.runtime.server.serving import ServerState, state_of

log = logging.getLogger(__name__)


def default_model_name(artifact: str | Path) -> str:
    """The artifact directory's name (never its path, which would leak the server's filesystem)."""
    return Path(artifact).resolve().name if str(artifact) else "kiln"


def build_app(engine: LLMEngine, *, artifact: str = "", served_model_name: str | None = None,
              api_key: str | None = None, max_waiting: int = 1024, max_request_bytes: int = DEFAULT_MAX_BYTES,
              enable_docs: bool = False, lora_modules: Sequence[LoRAModule] = ()) -> FastAPI:
    """An app serving `engine` (loaded from `artifact`) under `served_model_name` (default: the
    artifact directory's name). With `api_key`, /v1/*, /tokenize and /detokenize need it as a
    Bearer token. At most `max_waiting` requests wait beyond the running batch; more get 503.
    Bodies over `max_request_bytes` get 413. `enable_docs` serves /docs and /redoc, whose pages
    load Swagger UI / ReDoc from a CDN (so they are off by default: offline deployments).
    `lora_modules` are served as models of their own (the engine needs enable_lora; each is
    checked against the artifact here: ValueError when one does not fit)."""
    async_engine = AsyncLLMEngine(engine, max_waiting=max_waiting)
    metrics = ServerMetrics(async_engine)
    async_engine.observer = metrics
    template = engine.tokenizer.chat_template
    model_name = served_model_name or default_model_name(artifact)
    if lora_modules and engine.lora is None:
        raise ValueError("--lora-modules needs an engine with enable_lora=True")
    state = ServerState(
        engine=engine, async_engine=async_engine, metrics=metrics, model_name=model_name, artifact=artifact,
        chat_template=ChatTemplate(template, engine.tokenizer.config) if template else None,
        loras=LoRAModules(engine, model_name, lora_modules),
    )

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        async_engine.start()
        log.info("serving '%s' (context %d tokens)", state.model_name, engine.max_model_len)
        try:
            yield
        finally:
            # uvicorn has stopped accepting and waited for in-flight requests (or cancelled
            # them after its graceful timeout): abort what is left and end the engine thread.
            await async_engine.stop()

    app = FastAPI(title="kiln", version=kiln.__version__, lifespan=lifespan,
                  summary="OpenAI-compatible serving of a compiled kiln artifact.",
                  docs_url="/docs" if enable_docs else None, redoc_url="/redoc" if enable_docs else None)
    app.state.kiln = state
    install_error_handlers(app)
    app.add_middleware(BodyGuard, max_bytes=max_request_bytes)  # inside the key check: no body read without it
    if api_key:
        app.add_middleware(APIKeyMiddleware, api_key=api_key)
    app.include_router(completions.router)
    app.include_router(chat.router)
    app.include_router(tokenization.router)
    app.include_router(lora.router)

    @app.get("/v1/models", response_model=ModelList)
    async def list_models(request: Request) -> ModelList:
        """The served model, then its LoRA adapters (each with the model it adapts as `parent`)."""
        s = state_of(request)
        adapters = [ModelCard(id=name, root=str(lora.lora_path), parent=s.loras.parents[name],
                              max_model_len=s.max_model_len) for name, lora in s.loras.by_name.items()]
        return ModelList(data=[ModelCard(id=s.model_name, root=s.model_name, max_model_len=s.max_model_len),
                               *adapters])

    @app.get("/health")
    async def health(request: Request) -> JSONResponse:
        """200 while the engine loop runs, else 503."""
        if not state_of(request).async_engine.is_running:
            raise APIError(503, "the engine loop is not running", code="engine_dead")
        return JSONResponse({"status": "ok"})

    @app.get("/metrics")
    async def prometheus_metrics(request: Request) -> Response:
        """Prometheus text exposition."""
        return Response(state_of(request).metrics.render(), media_type=CONTENT_TYPE_LATEST)

    return app
