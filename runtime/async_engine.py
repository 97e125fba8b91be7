"""Drives the synchronous `LLMEngine` from asyncio, for the server.

The engine is not thread-safe, so one thread owns it and every engine call happens there:

    event loop (HTTP handlers)               engine thread
    add_requests() ──("add", reqs, fut)──>   commands drained before each step:
    RequestStream.abort() ──("abort", id)─>    engine.add_request / abort_request
                                             engine.step()
    stream queues  <──call_soon_threadsafe── outputs of the step (one call per step)

A request's outputs go to the asyncio queue of the `RequestStream` that added it; the stream
aborts its requests (freeing their KV blocks at the engine's next turn, within one step) when
its consumer stops early. Waiting is bounded: an add that would leave more than `max_waiting`
requests queued beyond the free sequence slots fails with `QueueFullError`. A step that raises
outside the model (the engine itself already fails the requests of a failed model step with
finish_reason "error") fails the requests in flight with `EngineError`, and the loop goes on.

LoRA: an add carries its requests' `LoRARequest`; `add_lora` checks and registers an adapter;
`remove_lora` refuses new requests for one at once while those queued or running finish with it.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import itertools
import logging
import queue
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from kiln.runtime.engine import LLMEngine, Prompt
from kiln.runtime.lora import LoRARequest
from kiln.runtime.lora_slots import register
from kiln.runtime.outputs import OutputAccumulator, RequestOutput
from kiln.runtime.sampling_params import SamplingParams

log = logging.getLogger(__name__)


class QueueFullError(RuntimeError):
    """The bounded waiting queue is full: retry later (HTTP 503)."""


class RequestTooLargeError(ValueError):
    """More sequences in one add than the engine ever accepts at once (running + waiting): no
    amount of waiting helps (HTTP 400, unlike QueueFullError)."""


class EngineError(RuntimeError):
    """The engine failed while running this request (HTTP 500); other requests go on."""


class UnknownAdapterError(LookupError):
    """The request names a LoRA adapter that was removed (HTTP 404)."""


class RequestObserver(Protocol):
    """Receives per-request latencies (the server's metrics implement it)."""

    def on_first_token(self, seconds: float) -> None: ...

    def on_inter_token(self, seconds: float) -> None: ...

    def on_finished(self, output: RequestOutput, seconds: float) -> None: ...


@dataclass
class _Add:
    requests: list[tuple[str, Prompt, SamplingParams]]
    lora_request: LoRARequest | None = None
    done: concurrent.futures.Future = field(default_factory=concurrent.futures.Future)


@dataclass
class _Call:
    """Run fn() on the engine thread between steps; its result or exception goes to done."""

    fn: Callable[[], Any]
    done: concurrent.futures.Future = field(default_factory=concurrent.futures.Future)


@dataclass
class _Abort:
    request_ids: list[str]


class _Stop:
    pass


@dataclass
class _Timing:
    arrival: float
    last_token: float | None = None


class RequestStream:
    """Outputs of the engine requests one `add_requests` call queued, in the order the engine
    produced them, until all have finished. Use `async with` (or call `abort()`): leaving early
    aborts the requests that are still running."""

    def __init__(self, engine: AsyncLLMEngine, request_ids: list[str]):
        self._engine = engine
        self.request_ids = request_ids
        self._items: deque[RequestOutput | BaseException] = deque()
        self._ready = asyncio.Event()
        self._unfinished = set(request_ids)
        now = time.monotonic()
        self._timing = {rid: _Timing(now) for rid in request_ids}
        self._whole = OutputAccumulator()

    def __aiter__(self) -> RequestStream:
        return self

    async def __anext__(self) -> RequestOutput:
        if not self._unfinished:
            raise StopAsyncIteration
        while not self._items:
            self._ready.clear()
            await self._ready.wait()
        item = self._items.popleft()
        if isinstance(item, BaseException):
            self.abort()
            raise item
        item = self._whole.add(self._coalesce(item))
        self._observe(item)
        if item.finished:
            self._unfinished.discard(item.request_id)
        return item

    async def __aenter__(self) -> RequestStream:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.abort()

    @property
    def finished(self) -> bool:
        return not self._unfinished

    def abort(self) -> None:
        """Stop every request of this stream that has not finished; idempotent, never blocks."""
        self._engine._detach(self)
        if self._unfinished:
            self._engine._commands.put(_Abort(sorted(self._unfinished)))
            self._unfinished.clear()

    def _push(self, item: RequestOutput | BaseException) -> None:
        self._items.append(item)
        self._ready.set()

    def _coalesce(self, item: RequestOutput) -> RequestOutput:
        """When the reader lags behind the engine, merge the outputs already queued for the same
        request into the newest one (deltas joined), so a slow client gets fewer, larger chunks
        instead of falling further behind. The engine's outputs carry deltas only, so merging
        joins them; `__anext__` then folds the result into the request's whole output."""
        while self._items and not item.finished:
            nxt = self._items[0]
            if not isinstance(nxt, RequestOutput) or nxt.request_id != item.request_id:
                break
            self._items.popleft()
            for old, new in zip(item.outputs, nxt.outputs, strict=True):
                new.delta_text = old.delta_text + new.delta_text
                new.delta_token_ids = old.delta_token_ids + new.delta_token_ids
                if old.delta_logprobs is not None and new.delta_logprobs is not None:
                    new.delta_logprobs = old.delta_logprobs + new.delta_logprobs
            item = nxt
        return item

    def _observe(self, out: RequestOutput) -> None:
        obs = self._engine.observer
        timing = self._timing[out.request_id]
        now = time.monotonic()
        if obs is not None and any(c.delta_token_ids for c in out.outputs):
            if timing.last_token is None:
                obs.on_first_token(now - timing.arrival)
            else:
                obs.on_inter_token(now - timing.last_token)
        if any(c.delta_token_ids for c in out.outputs):
            timing.last_token = now
        if obs is not None and out.finished:
            obs.on_finished(out, now - timing.arrival)


class AsyncLLMEngine:
    """An `LLMEngine` owned by a background thread; async callers add requests and read their
    outputs as they are produced. Call `start()` inside the event loop, `stop()` to finish."""

    def __init__(self, engine: LLMEngine, max_waiting: int = 1024,
                 observer: RequestObserver | None = None):
        if max_waiting < 0:
            raise ValueError(f"max_waiting must be >= 0, got {max_waiting}")
        self.engine = engine
        self.max_waiting = max_waiting
        self.observer = observer
        self._commands: queue.SimpleQueue[_Add | _Abort | _Call | _Stop] = queue.SimpleQueue()
        self._streams: dict[str, RequestStream] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._removed: set[int] = set()
        """Ids of removed LoRA adapters (never served again; ids are not reused)."""
        self._unloading: set[int] = set()
        """Removed adapters whose requests still run or wait: their slots are freed after them."""
        self.stats: dict[str, Any] = self._snapshot()
        """Scheduler stats and finish counts, refreshed by the engine thread after every turn."""

    # -- lifecycle ------------------------------------------------------------------------------

    def start(self) -> None:
        """Start the engine thread; outputs are delivered on the running event loop."""
        if self._thread is not None:
            raise RuntimeError("the engine loop is already started")
        self._loop = asyncio.get_running_loop()
        self._thread = threading.Thread(target=self._run, name="kiln-engine", daemon=True)
        self._thread.start()

    @property
    def is_running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    async def stop(self, timeout: float = 10.0) -> None:
        """Abort whatever is still running and end the engine thread."""
        if self._thread is None:
            return
        self._commands.put(_Stop())
        await asyncio.to_thread(self._thread.join, timeout)

    def abort_all(self) -> int:
        """Abort every request that has a reader (their streams end with finish_reason "abort");
        returns how many. Call on the event loop, e.g. when a shutdown grace period ends."""
        ids = sorted(self._streams)
        if ids:
            self._commands.put(_Abort(ids))
        return len(ids)

    @property
    def num_streams(self) -> int:
        """Requests that have a reader (0 once every HTTP request is done)."""
        return len(self._streams)

    # -- requests -------------------------------------------------------------------------------

    @property
    def capacity(self) -> int:
        """The most sequences that can be running or waiting together; a larger add never fits."""
        return self.engine.scheduler.max_num_seqs + self.max_waiting

    async def add_requests(self, requests: Sequence[tuple[str, Prompt, SamplingParams]],
                           lora_request: LoRARequest | None = None) -> RequestStream:
        """Queue (request_id, prompt, params) triples together (all or none), all with one LoRA
        adapter (None: the base model): ValueError for a prompt, id or adapter the engine rejects
        (RequestTooLargeError, a ValueError, for more sequences than `capacity`), QueueFullError
        when the waiting queue is full, UnknownAdapterError for a removed adapter."""
        if not self.is_running:
            raise EngineError("the engine loop is not running")
        new = sum(params.n for _, _, params in requests)
        if new > self.capacity:
            raise RequestTooLargeError(
                f"the request has {new} sequences, more than the engine ever accepts at once: at most "
                f"{self.capacity} ({self.engine.scheduler.max_num_seqs} running + {self.max_waiting} waiting)")
        ids = [rid for rid, _, _ in requests]
        if len(set(ids)) != len(ids) or any(rid in self._streams for rid in ids):
            raise ValueError(f"request ids {ids} are already in use")
        stream = RequestStream(self, ids)
        for rid in ids:
            self._streams[rid] = stream
        cmd = _Add(list(requests), lora_request)
        self._commands.put(cmd)
        try:
            await asyncio.wrap_future(cmd.done)
        except BaseException:
            # Rejected (nothing was queued) or cancelled (the abort follows the add in order).
            stream.abort()
            raise
        return stream

    async def generate(self, prompt: Prompt, params: SamplingParams, request_id: str,
                       lora_request: LoRARequest | None = None) -> AsyncIterator[RequestOutput]:
        """Outputs of one request as they come. Leaving early aborts it once the generator is
        closed: at once under `contextlib.aclosing(...)` or on cancellation, else when it is
        garbage-collected. (The server uses `add_requests` and `RequestStream` directly.)"""
        stream = await self.add_requests([(request_id, prompt, params)], lora_request)
        async with stream:
            async for out in stream:
                yield out

    async def add_lora(self, lora_request: LoRARequest) -> None:
        """Check an adapter against the artifact and register it for requests: ValueError when
        it does not fit, its id names another adapter, or the engine has no LoRA slots."""
        await self._call(lambda: register(self.engine.lora, lora_request))

    async def remove_lora(self, lora_int_id: int) -> None:
        """Remove an adapter: adding a request for it fails from now on (UnknownAdapterError);
        requests already queued or running finish with it, then its slot is freed."""
        def remove() -> None:
            self._removed.add(lora_int_id)
            self._unloading.add(lora_int_id)
            self._free_unloaded()
        await self._call(remove)

    async def _call(self, fn: Callable[[], Any]) -> Any:
        if not self.is_running:
            raise EngineError("the engine loop is not running")
        cmd = _Call(fn)
        self._commands.put(cmd)
        return await asyncio.wrap_future(cmd.done)

    def _detach(self, stream: RequestStream) -> None:
        for rid in stream.request_ids:
            if self._streams.get(rid) is stream:
                del self._streams[rid]

    def _dispatch(self, outputs: list[RequestOutput | tuple[str, BaseException]]) -> None:
        """On the event loop: hand each output (or failure) to the stream that reads it."""
        for item in outputs:
            rid = item[0] if isinstance(item, tuple) else item.request_id
            stream = self._streams.get(rid)
            if stream is not None:
                stream._push(item[1] if isinstance(item, tuple) else item)

    # -- the engine thread ----------------------------------------------------------------------

    def _snapshot(self) -> dict[str, Any]:
        stats: dict[str, Any] = dict(self.engine.scheduler_stats())
        stats["finish_counts"] = dict(self.engine.finish_counts)
        stats["num_kv_blocks"] = self.engine.pool.num_blocks
        stats["num_free_kv_blocks"] = self.engine.pool.num_free
        slots = self.engine.lora
        if slots is not None:  # the adapters' names per queue (a removed one stays until its requests end)
            stats["lora"] = {"max_lora": len(slots.held)} | {
                key: sorted({slots.adapters[r.adapter_id].request.lora_name for r in reqs if r.adapter_id is not None})
                for key, reqs in (("running", self.engine.scheduler.running), ("waiting", self.engine.scheduler.waiting))}
        return stats

    def _run(self) -> None:
        try:
            self._loop_forever()
        except BaseException as e:  # a bug in the loop itself: fail every reader, do not hang them
            log.exception("the engine loop died")
            dead = EngineError(f"the engine loop died: {e}")
            self._publish([(rid, dead) for rid in list(self._streams)])

    def _publish(self, out: list[RequestOutput | tuple[str, BaseException]]) -> None:
        try:
            self._loop.call_soon_threadsafe(self._dispatch, out)
        except RuntimeError:  # the event loop is closed: nobody is left to read
            pass

    def _loop_forever(self) -> None:
        engine = self.engine
        stopping = False
        while not stopping:
            out: list[RequestOutput | tuple[str, BaseException]] = []
            idle = not engine.has_unfinished_requests()
            for cmd in self._drain(block=idle):
                if isinstance(cmd, _Stop):
                    stopping = True
                elif isinstance(cmd, _Add):
                    self._add(cmd)
                elif isinstance(cmd, _Call):
                    self._call_now(cmd)
                else:
                    out += [o for rid in cmd.request_ids if (o := engine.abort_request(rid))]
            if stopping:
                out += [o for rid in list(engine.groups) if (o := engine.abort_request(rid))]
            elif engine.has_unfinished_requests():
                try:
                    out += engine.step()
                except Exception as e:
                    log.exception("engine step failed; failing the requests in flight")
                    out += self._fail_all(e)
            if self._unloading:
                self._free_unloaded()
            self.stats = self._snapshot()
            if out:
                self._publish(out)

    def _drain(self, block: bool) -> list[_Add | _Abort | _Call | _Stop]:
        cmds = [self._commands.get()] if block else []
        while True:
            try:
                cmds.append(self._commands.get_nowait())
            except queue.Empty:
                return cmds

    def _add(self, cmd: _Add) -> None:
        if not cmd.done.set_running_or_notify_cancel():
            return  # the caller went away before its turn
        engine, sched = self.engine, self.engine.scheduler
        free_slots = max(sched.max_num_seqs - len(sched.running), 0)
        new = sum(params.n for _, _, params in cmd.requests)
        if len(sched.waiting) + new - free_slots > self.max_waiting:
            cmd.done.set_exception(QueueFullError(
                f"the server is busy: {len(sched.waiting)} requests are waiting "
                f"(limit {self.max_waiting}); retry later"))
            return
        lora = cmd.lora_request
        if lora is not None and lora.lora_int_id in self._removed:
            cmd.done.set_exception(UnknownAdapterError(f"the LoRA adapter '{lora.lora_name}' was removed"))
            return
        added: list[str] = []
        try:
            for rid, prompt, params in cmd.requests:
                added.append(engine.add_request(rid, prompt, params, lora))
        except Exception as e:
            for rid in added:
                engine.abort_request(rid)
            cmd.done.set_exception(e)
            return
        cmd.done.set_result(None)

    def _call_now(self, cmd: _Call) -> None:
        if not cmd.done.set_running_or_notify_cancel():
            return
        try:
            cmd.done.set_result(cmd.fn())
        except Exception as e:
            cmd.done.set_exception(e)

    def _free_unloaded(self) -> None:
        """Free the slots of removed adapters that no queued or running request uses any more."""
        sched = self.engine.scheduler
        used = {r.adapter_id for r in itertools.chain(sched.running, sched.waiting)}
        for adapter_id in self._unloading - used:
            self.engine.lora.remove(adapter_id)
        self._unloading &= used

    def _fail_all(self, error: Exception) -> list[tuple[str, BaseException]]:
        """Abort every request after a failed step (frees their blocks) and fail their streams."""
        failed = []
        for rid in list(self.engine.groups):
            try:
                self.engine.abort_request(rid)
            except Exception:
                log.exception("could not abort request %s", rid)
                self.engine.groups.pop(rid, None)
            failed.append((rid, EngineError(f"the engine failed while running this request: {error}")))
        return failed
