"""What the completion and chat routes share: the app's state, request -> SamplingParams,
prompt checks, queueing with errors mapped to HTTP, disconnect handling and SSE."""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import ctypes.util
import json
import logging
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from fastapi import Request
from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from kiln.runtime.async_engine import (
    AsyncLLMEngine,
    EngineError,
    QueueFullError,
    RequestStream,
    RequestTooLargeError,
    UnknownAdapterError,
)
from kiln.runtime.engine import LLMEngine
from kiln.runtime.lora import LoRARequest
from kiln.runtime.outputs import RequestOutput
from kiln.runtime.sampling_params import SamplingParams
from kiln.runtime.server.chat_template import ChatTemplate
from kiln.runtime.server.errors import APIError, from_value_error, invalid
from kiln.runtime.server.lora import LoRAModules
from kiln.runtime.server.metrics import ServerMetrics
from kiln.runtime.server.protocol import SamplingFields

T = TypeVar("T")
log = logging.getLogger(__name__)


@dataclass
class ServerState:
    """Everything a route needs, kept on `app.state.kiln`."""

    engine: LLMEngine
    async_engine: AsyncLLMEngine
    metrics: ServerMetrics
    model_name: str
    artifact: str
    chat_template: ChatTemplate | None
    loras: LoRAModules

    @property
    def max_model_len(self) -> int:
        return self.engine.max_model_len

    def check_model(self, model: str | None) -> LoRARequest | None:
        """The LoRA adapter the request's `model` names, or None for the served model (or no
        name); 404 for another name."""
        return self.loras.resolve(model)

    def model_of(self, lora: LoRARequest | None) -> str:
        """The `model` a response names: the adapter's name, or the served model's."""
        return lora.lora_name if lora is not None else self.model_name

    @property
    def vocab_size(self) -> int:
        return self.engine.model.vocab_size

    @property
    def max_cache_tokens(self) -> int:
        """The most tokens one sequence can ever hold: the whole KV cache, or no limit with a
        sliding window that fits in it (a sequence then holds only the window's blocks)."""
        return self.engine.kv.max_seq_tokens

    def check_token_ids(self, ids: Sequence[int], param: str) -> None:
        vocab = self.vocab_size
        bad = next((i for i, t in enumerate(ids) if not 0 <= t < vocab), None)
        if bad is not None:
            raise invalid(f"{param}: token id {ids[bad]} (at index {bad}) is outside the vocabulary; token ids "
                          f"are integers in [0, {vocab})", param)

    def check_sequences(self, count: int, param: str) -> None:
        """400 for a request of more sequences (prompts x n) than the server ever accepts at once."""
        limit = self.async_engine.capacity
        if count > limit:
            raise too_large(f"the request asks for {count} sequences (prompts x n), more than this server "
                            f"accepts at once: at most {limit} (--max-num-seqs + --max-waiting); split it", param)


def state_of(request: Request) -> ServerState:
    return request.app.state.kiln


def too_large(message: str, param: str | None) -> APIError:
    """A 400 for a request no amount of waiting would let the server run (unlike 503 queue_full)."""
    return APIError(400, message, param=param, code="request_too_large")


async def encode(state: ServerState, texts: list[str], param: str, add_special_tokens: bool = True,
                 check_context: bool = True) -> list[list[int]]:
    """Token ids of each text, computed in a worker thread so the event loop (other requests,
    /health) goes on meanwhile (see `Tokenizer.encode_batch` for the GIL). With `check_context`, a
    text of max_model_len tokens or more is a 400 (its ids are not even built)."""
    limit = state.max_model_len if check_context else None
    try:
        out = await asyncio.to_thread(state.engine.tokenizer.encode_batch, texts, add_special_tokens, limit)
    except (TypeError, UnicodeError) as e:  # BodyGuard refuses lone surrogates before this
        raise invalid(f"{param} is not text the tokenizer can take ({e})", param) from None
    finally:
        if sum(map(len, texts)) >= TRIM_AFTER_CHARS:
            await asyncio.to_thread(release_free_heap)
    for ids in out:
        if isinstance(ids, int):
            check_prompt_length(state, ids, None, param, "max_tokens")  # raises: too long
    return out  # type: ignore[return-value]


TRIM_AFTER_CHARS = 1 << 20
"""Text size past which tokenizing it leaves enough freed heap to hand back (see below)."""
_malloc_trim = getattr(ctypes.CDLL(ctypes.util.find_library("c")), "malloc_trim", None)  # glibc only


def release_free_heap() -> None:
    """Give freed heap back to the OS. The tokenizer's encodings of a 20 MB prompt take ~3 GB
    in a worker thread's malloc arena; freed, glibc keeps them mapped (resident stays ~3 GB)
    until malloc_trim, which takes ~0.4 s then (a no-op where the libc has none)."""
    if _malloc_trim is not None:
        _malloc_trim(0)


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def check_prompt_length(state: ServerState, num_prompt: int, max_tokens: int | None, param: str,
                        max_tokens_param: str) -> int:
    """The max_tokens to run with: the request's, or what the context (and KV cache) leaves. 400
    when the prompt (plus max_tokens) does not fit the model's context or the whole KV cache (a
    sequence larger than the cache would only preempt itself forever)."""
    limit = state.max_model_len
    cache = state.max_cache_tokens
    if num_prompt == 0:
        raise invalid("the prompt is empty (it encodes to no tokens)", param)
    if num_prompt >= limit:
        raise invalid(f"This model's maximum context length is {limit} tokens; the prompt has "
                      f"{num_prompt} tokens, which leaves none to generate.", param)
    if num_prompt + 1 > cache:
        raise too_large(f"the prompt has {num_prompt} tokens, more than this server accepts: its KV cache holds "
                        f"at most {cache} tokens per sequence (--num-kv-blocks x --block-size)", param)
    if max_tokens is None:  # up to the context, or what one sequence can hold if the cache is smaller
        return min(limit, cache) - num_prompt
    if num_prompt + max_tokens > cache:
        raise too_large(f"the request needs {num_prompt + max_tokens} tokens ({num_prompt} in the prompt, "
                        f"{max_tokens} for the completion), more than this server accepts: its KV cache holds "
                        f"at most {cache} tokens per sequence (--num-kv-blocks x --block-size)", max_tokens_param)
    if num_prompt + max_tokens > limit:
        raise invalid(f"This model's maximum context length is {limit} tokens; you requested "
                      f"{num_prompt + max_tokens} tokens ({num_prompt} in the prompt, {max_tokens} "
                      f"for the completion). Reduce the prompt or {max_tokens_param}.", max_tokens_param)
    return max_tokens


def sampling_params(state: ServerState, body: SamplingFields, *, max_tokens: int, logprobs: int | None,
                    renames: dict[str, str]) -> SamplingParams:
    """SamplingParams of a request; a rejected value is a 400 naming the request's field."""
    if body.logit_bias:
        raise invalid("logit_bias is not supported", "logit_bias")
    given = {
        "n": body.n, "temperature": body.temperature, "top_p": body.top_p, "top_k": body.top_k,
        "min_p": body.min_p, "presence_penalty": body.presence_penalty,
        "frequency_penalty": body.frequency_penalty, "repetition_penalty": body.repetition_penalty,
        "seed": body.seed, "stop": body.stop, "stop_token_ids": body.stop_token_ids,
        "include_stop_str_in_output": body.include_stop_str_in_output, "ignore_eos": body.ignore_eos,
        "min_tokens": body.min_tokens, "skip_special_tokens": body.skip_special_tokens,
    }
    kwargs = {k: v for k, v in given.items() if v is not None}
    if body.stop_token_ids:
        state.check_token_ids(body.stop_token_ids, "stop_token_ids")
    try:
        params = SamplingParams(max_tokens=max_tokens, logprobs=logprobs, **kwargs)
    except ValueError as e:
        raise from_value_error(e, None, renames) from None
    return params


async def add(state: ServerState, requests: list[tuple[str, Any, SamplingParams]], param: str,
              lora: LoRARequest | None = None) -> RequestStream:
    """Queue a request's prompts (with its LoRA adapter); errors become 400 (prompt), 404 (an
    adapter unloaded meanwhile), 503 (queue full), 500 (engine)."""
    try:
        return await state.async_engine.add_requests(requests, lora)
    except UnknownAdapterError as e:
        raise APIError(404, f"{e}; GET /v1/models lists the models served", param="model",
                       code="model_not_found") from None
    except RequestTooLargeError as e:
        raise too_large(str(e), param) from None
    except QueueFullError as e:
        raise APIError(503, str(e), code="queue_full") from None
    except EngineError as e:
        raise APIError(500, str(e), code="engine_error") from None
    except ValueError as e:
        raise from_value_error(e, param) from None


async def collect(stream: RequestStream) -> dict[str, RequestOutput]:
    """The final output of every request of a stream, by request id."""
    try:
        return {out.request_id: out async for out in stream if out.finished}
    except EngineError as e:
        raise APIError(500, str(e), code="engine_error") from None


def finish_error(finish_reason: str | None) -> APIError | None:
    """The error a completion's finish reason stands for: the engine failed (500), or the
    request was aborted while the server shuts down (503)."""
    if finish_reason == "error":
        return APIError(500, "the engine failed while generating this request; retry it",
                        code="engine_error")
    if finish_reason == "abort":
        return APIError(503, "the request was aborted (the server is shutting down)", code="aborted")
    return None


async def _wait_disconnect(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def unless_disconnected(request: Request, work: Awaitable[T]) -> T:
    """Run a non-streaming handler's work, cancelling it when the client goes away (so its
    requests are aborted and their KV blocks freed instead of running to the end)."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_wait_disconnect(request))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
    if task.cancelled():
        raise APIError(499, "the client closed the connection", code="client_closed")
    return task.result()


def sse(payload: Any) -> str:
    """One Server-Sent Event carrying a JSON body (a pydantic model or plain data)."""
    data = payload.model_dump_json() if hasattr(payload, "model_dump_json") else json.dumps(payload)
    return f"data: {data}\n\n"


SSE_DONE = "data: [DONE]\n\n"


class EventStream(StreamingResponse):
    """An SSE response that aborts its engine requests whenever it ends: finished, failed, or
    cancelled because the client disconnected."""

    def __init__(self, events: AsyncIterator[str], stream: RequestStream):
        super().__init__(events, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self._stream = stream

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._stream.abort()


async def guarded(events: Callable[[], AsyncIterator[str]]) -> AsyncIterator[str]:
    """SSE text of `events`, with a failure after the stream started sent as an error event;
    always ends with `data: [DONE]`."""
    try:
        async for event in events():
            yield event
    except APIError as e:
        yield e.sse()
    except EngineError as e:
        yield APIError(500, str(e), code="engine_error").sse()
    except Exception as e:  # a bug here: end the stream well-formed rather than cut it
        log.exception("streaming response failed")
        yield APIError(500, f"internal server error ({type(e).__name__})", code="internal_error").sse()
    yield SSE_DONE
