"""Continuous batching under a token budget.

One rule: each running request's computed-token count catches up with its token count (prompt
+ output), at most `max_num_batched_tokens` tokens per step over all requests. Decodes (one
token behind) go first, then prefill chunks of running requests, then waiting requests are
admitted while blocks and sequence slots last; a prompt longer than the remaining budget is
chunked across steps. When blocks run out, the newest running request is preempted: its blocks
are freed and it goes back to the front of the queue to be recomputed (its output so far is
kept, and prefix caching usually makes the recompute cheap).

Async scheduling needs nothing else: a token sampled on the device and not yet read is a
placeholder in the request's tokens (`Request.num_pending`), so the request is one token behind
(a decode) the step after it was sampled, and the next step computes it. Only a request whose
in-flight token is surely its last (max_tokens) is left out, not given a row it would waste.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from kiln.runtime.kv_cache_manager import KVCacheManager
from kiln.runtime.request import Request, Status


@dataclass
class SchedulerOutput:
    """What to run this step."""

    requests: list[Request] = field(default_factory=list)
    num_new_tokens: list[int] = field(default_factory=list)
    preempted: list[Request] = field(default_factory=list)

    @property
    def total_tokens(self) -> int:
        return sum(self.num_new_tokens)


class Scheduler:
    def __init__(self, kv: KVCacheManager, max_num_batched_tokens: int, max_num_seqs: int,
                 admit: Callable[[Request], bool] | None = None):
        if max_num_batched_tokens < 1 or max_num_seqs < 1:
            raise ValueError("max_num_batched_tokens and max_num_seqs must be >= 1")
        self.kv = kv
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_num_seqs = max_num_seqs
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.num_preemptions = 0
        self.admit = admit
        """Asked before a waiting request starts (the LoRA slots: False while its adapter can
        have none); the queue waits behind a request it refuses. None admits every request."""

    def add(self, req: Request) -> None:
        self.waiting.append(req)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def finish(self, req: Request, reason: str) -> None:
        """Retire a request (done, aborted or failed) and free its blocks."""
        if req.status is Status.RUNNING:
            self.running.remove(req)
        elif req.status is Status.WAITING and req in self.waiting:
            self.waiting.remove(req)
        self.kv.free(req)
        req.status = Status.FINISHED
        req.finish_reason = reason

    def recompute(self, req: Request) -> None:
        """Drop a running request's KV blocks and queue it first, to compute all its tokens
        again (they are kept)."""
        self.running.remove(req)
        self.kv.free(req)
        req.num_computed_tokens = 0
        req.status = Status.WAITING
        self.waiting.appendleft(req)

    def _preempt(self, victim: Request, out: SchedulerOutput) -> None:
        self.recompute(victim)
        victim.num_preemptions += 1
        self.num_preemptions += 1
        out.preempted.append(victim)

    def _reserve(self, req: Request, n: int, out: SchedulerOutput) -> bool:
        """Blocks for a running request's next n tokens, preempting the newest running requests
        until they fit; False when the request itself was preempted."""
        allocate = self.kv.allocate
        while not allocate(req, n):
            victim = max((r for r in self.running if r not in out.requests), key=lambda r: r.arrival_time)
            self._preempt(victim, out)
            if victim is req:
                return False
        return True

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self.max_num_batched_tokens
        chunk = self.kv.max_chunk or budget  # with a window: what the whole pool can hold
        # Running requests: decodes are one token behind, chunked prefills further.
        decodes, chunks = [], []
        for r in self.running:
            (decodes if len(r.all_token_ids) - r.num_computed_tokens == 1 else chunks).append(r)
        chunks.sort(key=lambda r: r.num_tokens - r.num_computed_tokens)
        # Most decodes write into a block they already hold: checked for all of them at once.
        for req, room in zip(decodes, self.kv.has_room_for_one(decodes), strict=True):
            if budget == 0:
                break
            if req.status is not Status.RUNNING:
                continue  # preempted earlier in this loop
            if req.num_pending and req.params.max_tokens is not None and req.num_output_tokens >= req.params.max_tokens:
                continue  # its token in flight is its last
            if room or self._reserve(req, 1, out):
                out.requests.append(req)
                out.num_new_tokens.append(1)
                budget -= 1
        for req in chunks:
            if budget == 0:
                break
            if req.status is not Status.RUNNING:
                continue
            n = min(len(req.all_token_ids) - req.num_computed_tokens, budget, chunk)
            if self._reserve(req, n, out):
                out.requests.append(req)
                out.num_new_tokens.append(n)
                budget -= n
        # Waiting requests, oldest first, while blocks and sequence slots last.
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs and not out.preempted:
            req = self.waiting[0]
            if self.admit is not None and not self.admit(req):
                break
            prefix = self.kv.computed_prefix(req)
            computed = len(prefix) * self.kv.block_size
            n = min(req.num_tokens - computed, budget, chunk)
            if not self.kv.allocate(req, n, prefix):
                break
            self.waiting.popleft()
            if req.num_preemptions == 0:
                req.num_cached_tokens = computed
            req.num_computed_tokens = computed
            req.status = Status.RUNNING
            self.running.append(req)
            out.requests.append(req)
            out.num_new_tokens.append(n)
            budget -= n
        return out
