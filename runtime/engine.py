"""The generation engine: scheduler + paged KV cache + compiled model + sampler + detokenizer.

Async scheduling (on by default on CUDA, see ASYNC_SCHEDULING_ON_CUDA; `async_scheduling=False`
turns it off) hides the host's work of a step behind the device's:

    host:    schedule n+1 | prepare n+1 | launch n+1 | read tokens of n, append, stop, detok | ...
    device:  ... forward n, sample n  |       forward n+1, sample n+1            | ...

Step n's sampled tokens stay on the device; each is a PLACEHOLDER in its request's tokens,
which the scheduler counts (one more token, its KV slot allocated) and step n+1's input_ids
take from the device. A request that step n finished still has a row in step n+1: its result
is dropped. Without async scheduling a step reads its own tokens before it returns.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import os
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from kiln.ir.step_inputs import DEFAULT_BLOCK_SIZE, LOGITS_INDICES, LORA_SLOTS, token_buckets
from kiln.ir.types import torch_dtype
from kiln.runtime.artifact import read_manifest
from kiln.runtime.block_pool import BlockPool
from kiln.runtime.cuda_graphs import GraphedExecutor
from kiln.runtime.detokenizer import IncrementalDetokenizer
from kiln.runtime.kv_cache_manager import KVCacheManager
from kiln.runtime.lora import LoRARequest
from kiln.runtime.lora_slots import open_slots, register
from kiln.runtime.model import CompiledModel
from kiln.runtime.model_runner import ModelRunner
from kiln.runtime.outputs import CompletionOutput, OutputAccumulator, RequestOutput
from kiln.runtime.pending_sample import PendingSample
from kiln.runtime.request import PLACEHOLDER, Request, Status
from kiln.runtime.sampler import Sampler, SamplingState
from kiln.runtime.sampling_params import Logprob, SamplingParams
from kiln.runtime.scheduler import Scheduler
from kiln.runtime.threads import configure as configure_threads
from kiln.runtime.tokenizer import Tokenizer

log = logging.getLogger(__name__)

Prompt = str | dict

ASYNC_SCHEDULING_ON_CUDA = True
"""What async_scheduling=None means on CUDA (on the CPU it is off: nothing to overlap). Measured
on the H200 (benchmarks/host_overhead.py --decode-shapes llama-3.2-1b): batch-1 decode steps
1.57 -> 1.20 ms, batch 32 1.99 -> 2.05 ms."""


@dataclass(eq=False, slots=True)
class _Track:
    """The engine's bookkeeping for one request."""

    state: SamplingState
    detok: IncrementalDetokenizer
    logprobs: list[dict[int, Logprob]] = field(default_factory=list)
    """Logprob entries not yet reported."""
    cumulative: float = 0.0
    reported: int = 0
    """Output tokens already reported."""


@dataclass(eq=False, slots=True)
class _InFlight:
    """A launched step whose sampled tokens the host has not read yet."""

    requests: list[Request]
    tracks: list[_Track]
    sample: PendingSample
    rows: dict[str, int] | None
    """Request id -> its row of sample.tokens (for the next step's input_ids); None when sync."""


def default_cache_bytes(device: torch.device) -> int:
    """KV-cache budget when none is given: 90% of free GPU memory after the weights, or on the
    CPU a quarter of available RAM capped at 4 GiB."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free * 0.9)
    avail = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    return min(avail // 4, 4 << 30)


class LLMEngine:
    """Adds requests, steps the model, returns outputs. Not thread-safe: one caller drives it."""

    def __init__(
        self,
        model: str | Path,
        *,
        max_num_batched_tokens: int = 2048,
        max_num_seqs: int = 256,
        block_size: int = DEFAULT_BLOCK_SIZE,
        enable_prefix_caching: bool = True,
        kv_cache_memory_bytes: int | None = None,
        num_kv_blocks: int | None = None,
        max_model_len: int | None = None,
        device: str | None = None,
        verify: bool = True,
        enforce_eager: bool = False,
        async_scheduling: bool | None = None,
        threads: int | None = None,
        enable_lora: bool = False, max_loras: int = 1, max_lora_rank: int = 16,  # kiln.runtime.lora_slots
    ):
        if block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {block_size}")
        target = read_manifest(model).get("target")
        if device is None:  # where the artifact's kernels run: a cuda artifact on the GPU when there is one
            device = "cuda" if target == "cuda" and torch.cuda.is_available() else "cpu"
        # On the CPU: `threads` (default: this process's cores) split between torch and TVM.
        self.threads = configure_threads(threads, target if torch.device(device).type == "cpu" else None)
        self.model = CompiledModel(model, device=device, verify=verify)  # verify: check content hashes
        self.model.check_block_size(block_size)
        self.tokenizer = Tokenizer(model, verify=verify)
        self.device = torch.device(device)
        if async_scheduling is None:
            async_scheduling = self.device.type == "cuda" and ASYNC_SCHEDULING_ON_CUDA
        self.async_scheduling = bool(async_scheduling)
        """Launch step n+1 before step n's tokens reach the host."""
        self._inflight: _InFlight | None = None
        caches = self.model.cache_types
        bytes_per_block = sum(
            block_size * int(t.shape[2]) * int(t.shape[3]) * t.itemsize
            for t in caches.values()
        )
        self.long_rope_after: int | None = self.model.manifest["model"].get("long_rope_after")
        limit = self.model.manifest["model"].get("max_position_embeddings")
        if max_model_len is not None and limit and max_model_len > limit:
            raise ValueError(
                f"max_model_len {max_model_len} exceeds the model's max_position_embeddings {limit} "
                "(its position tables hold that many positions)"
            )
        self.max_model_len = max_model_len or limit or 2048
        if num_kv_blocks is None:
            budget = kv_cache_memory_bytes if kv_cache_memory_bytes is not None else default_cache_bytes(self.device)
            num_kv_blocks = int(budget // max(bytes_per_block, 1))  # itemsize is a float (packed dtypes)
            if kv_cache_memory_bytes is None:
                # No more than every sequence slot at full context could use, twice over (the
                # rest keeps cached prefixes): a small model would otherwise get millions.
                full = max_num_seqs * -(-self.max_model_len // block_size)
                num_kv_blocks = min(num_kv_blocks, 2 * full)
        if num_kv_blocks < 1:
            raise ValueError(
                f"the KV cache budget holds no block (one block of {block_size} tokens needs {bytes_per_block} bytes)"
            )
        self.kv_caches = {
            name: torch.zeros(num_kv_blocks, block_size, int(t.shape[2]), int(t.shape[3]),
                              dtype=torch_dtype(t.dtype), device=self.device)
            for name, t in caches.items()
        }
        self.pool = BlockPool(num_kv_blocks, enable_caching=enable_prefix_caching)
        # With sliding windows only, blocks behind every layer's window are released as it moves.
        self.kv = KVCacheManager(self.pool, block_size, window=self.model.plan.attention_window)
        self.lora, self.lora_stacks = open_slots(self.model, enable_lora, max_loras, max_lora_rank, self.device)
        self.scheduler = Scheduler(self.kv, max_num_batched_tokens, max_num_seqs,
                                   admit=self.lora.admit if self.lora is not None else None)
        self.runner = ModelRunner(self.kv, max_num_batched_tokens, max_num_seqs, self.max_model_len, self.device)
        # The largest step there can be: the executor's arena is laid out for it now, once.
        self.model.executor.reserve({
            "T": max_num_batched_tokens, "S": max_num_seqs, "R": max_num_seqs, "NB": num_kv_blocks,
            "BS": block_size, "MB": self.runner.width, LORA_SLOTS: max_loras,
        })
        self.graphs = GraphedExecutor(self.model.executor)
        if self.device.type == "cuda" and not enforce_eager:  # decode buckets as CUDA graphs
            sizes = [b for b in token_buckets(max_num_seqs) if b <= max_num_batched_tokens]
            self.graphs.capture(sizes, lambda b: {**self.runner.decode_inputs(b), **self.kv_caches, **self.lora_stacks})
        self.sampler = Sampler()
        self.groups: dict[str, list[Request]] = {}
        self._prompts: dict[str, str | None] = {}
        self._track: dict[str, _Track] = {}
        self._ids = itertools.count()
        self.finish_counts: Counter[str] = Counter()
        self.num_generated_tokens = 0

    # -- requests ----------------------------------------------------------------------------

    def tokenize(self, prompt: Prompt) -> tuple[str | None, list[int]]:
        """(text, token ids) of a prompt given as text or {"prompt_token_ids": [...]}."""
        if isinstance(prompt, str):
            ids = self.tokenizer.encode(prompt)
            text: str | None = prompt
        elif isinstance(prompt, dict) and "prompt_token_ids" in prompt:
            ids, text = list(map(int, prompt["prompt_token_ids"])), prompt.get("prompt")
        else:
            raise ValueError("a prompt is a string or a dict with 'prompt_token_ids'")
        if not ids:
            raise ValueError("the prompt is empty (it encodes to no tokens)")
        vocab = self.model.vocab_size
        if min(ids) < 0 or max(ids) >= vocab:
            raise ValueError(f"prompt token ids must lie in [0, {vocab})")
        if len(ids) >= self.max_model_len:
            raise ValueError(
                f"the prompt has {len(ids)} tokens; the model's context is {self.max_model_len} tokens"
            )
        if self.kv.peak_blocks(len(ids) + 1) > self.pool.num_blocks:
            raise ValueError(
                f"the prompt needs {self.kv.peak_blocks(len(ids) + 1)} KV blocks; the cache has "
                f"{self.pool.num_blocks} (raise kv_cache_memory_bytes or num_kv_blocks)"
            )
        return text, ids

    def add_request(self, request_id: str | None, prompt: Prompt, params: SamplingParams | None = None,
                    lora_request: LoRARequest | None = None) -> str:
        """Queue a prompt (lora_request None: the base model); its id. ValueError if it cannot run."""
        params = params or SamplingParams()
        adapter_id = register(self.lora, lora_request)
        request_id = request_id if request_id is not None else str(next(self._ids))
        if request_id in self.groups:
            raise ValueError(f"request id '{request_id}' is already in use")
        text, ids = self.tokenize(prompt)
        children = []
        for i in range(params.n):
            child_params = params
            if params.n > 1 and params.seed is not None:
                child_params = dataclasses.replace(params, seed=params.seed + i)
            req = Request(f"{request_id}#{i}", ids, child_params, prompt=text, index=i, group_id=request_id,
                          long_rope=self.long_rope_after is not None and len(ids) > self.long_rope_after,
                          adapter_id=adapter_id)
            self._track[req.request_id] = _Track(
                SamplingState(child_params, req.prompt_token_ids, eos_token_ids=self.tokenizer.eos_token_ids),
                IncrementalDetokenizer(self.tokenizer, ids, child_params),
            )
            children.append(req)
            self.scheduler.add(req)
        self.groups[request_id] = children
        self._prompts[request_id] = text
        return request_id

    def abort_request(self, request_id: str) -> RequestOutput | None:
        """Stop a request (all its completions) and free its blocks at once; its final output
        (a delta, as step's are), or None for an unknown or already finished id."""
        if request_id not in self.groups:
            return None
        for req in self.groups[request_id]:
            if not req.finished:
                self._finish(req, "abort")
        return self._output(request_id)

    def scheduler_stats(self) -> dict[str, float]:
        """Gauges and counters for metrics: queue sizes, cache usage, prefix hits, preemptions."""
        return {
            "running": len(self.scheduler.running),
            "waiting": len(self.scheduler.waiting),
            "kv_cache_usage": self.pool.usage(),
            "prefix_cache_hit_rate": self.kv.stats.hit_rate,
            "prefix_cache_hits": self.kv.stats.hits,
            "prefix_cache_queries": self.kv.stats.queries,
            "preemptions": self.scheduler.num_preemptions,
            "generated_tokens": self.num_generated_tokens,
        }

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_work()

    def _finish(self, req: Request, reason: str, stop_reason: int | str | None = None) -> None:
        if req.num_pending:  # tokens in flight after its end: never reported
            del req.all_token_ids[-req.num_pending :]
            req.num_pending = 0
        self.scheduler.finish(req, reason)
        self.runner.release(req)
        if req.lora_slot >= 0:
            self.lora.release(req)
        self.sampler.release(self._track[req.request_id].state)
        req.stop_reason = stop_reason
        self.finish_counts[reason] += 1

    # -- stepping ----------------------------------------------------------------------------

    def step(self, final_only: bool = False) -> list[RequestOutput]:
        """Run one scheduled batch; outputs for every request that progressed or finished.
        They carry what is new since the request's previous output (delta_token_ids,
        delta_logprobs, delta_text; text is the whole text so far): fold them into whole
        outputs with `OutputAccumulator`. With async scheduling the tokens reported are those
        of the previous step, read after this one was launched. final_only=True (offline
        generation; vLLM's FINAL_ONLY output kind) builds outputs only for requests that
        finished, each then carrying all of its tokens, logprobs and text as its delta: no
        output object per running request per step."""
        touched: set[str] = set()
        limit = self.kv.max_seq_tokens
        too_long = [r for r in self.scheduler.running if len(r.all_token_ids) > limit]
        # A token in flight that decides the request's fate (its last one, or a longrope switch
        # that computes the request again) is read first: the outcome is the synchronous one.
        if self._inflight is not None and (any(r.num_pending for r in too_long) or self._crosses_long_rope()):
            touched |= self._drain()
            too_long = [r for r in self.scheduler.running if len(r.all_token_ids) > limit]
        for req in too_long:
            self._finish(req, "length")  # the whole cache cannot hold it any more
            touched.add(req.group_id)
        step = self.scheduler.schedule()
        if not step.requests:
            touched |= self._drain()
            return self._outputs(touched, final_only)
        prev = self._inflight
        batch = self.runner.prepare(step, *((prev.sample.tokens, prev.rows) if prev is not None else ()))
        sampled = batch.sampled
        inputs = {**batch.inputs, **self.kv_caches, **self.lora_stacks}
        try:
            logits = self.graphs.run(inputs)[0]
            if LOGITS_INDICES.name not in self.model.plan.inputs:  # compiled without last-token-logits
                logits = logits[inputs[LOGITS_INDICES.name]]
            logits = logits[: len(sampled)]
        except Exception:
            log.exception("model step failed; failing the %d requests in it", len(step.requests))
            touched |= self._drain()
            for req in step.requests:
                if not req.finished:
                    self.kv.forget_uncomputed(req)
                    self._finish(req, "error")
                    touched.add(req.group_id)
            return self._outputs(touched, final_only)
        for req, n in zip(step.requests, step.num_new_tokens, strict=True):
            req.num_computed_tokens += n
        self._inflight = None
        if sampled:
            tracks = [self._track[r.request_id] for r in sampled]
            sample = self.sampler.launch(logits, [t.state for t in tracks])
            rows = None
            if self.async_scheduling:  # the tokens count before they are known
                rows = {}
                for i, req in enumerate(sampled):
                    req.all_token_ids.append(PLACEHOLDER)
                    req.num_pending += 1
                    rows[req.request_id] = i
            self._inflight = _InFlight(sampled, tracks, sample, rows)
        if prev is not None:
            touched |= self._process(prev)
        if not self.async_scheduling:
            touched |= self._drain()
        return self._outputs(touched, final_only)

    def _outputs(self, touched: set[str], final_only: bool) -> list[RequestOutput]:
        if final_only:
            finished = Status.FINISHED
            touched = {g for g in touched if all(r.status is finished for r in self.groups[g])}
        return [self._output(g) for g in touched]

    def _crosses_long_rope(self) -> bool:
        """Whether a token in flight takes its request past a longrope model's switch."""
        after = self.long_rope_after
        return after is not None and any(
            r.num_pending and not r.long_rope and len(r.all_token_ids) > after for r in self._inflight.requests)

    def _drain(self) -> set[str]:
        """Read and process the step in flight, if any; the groups it touched."""
        prev, self._inflight = self._inflight, None
        return self._process(prev) if prev is not None else set()

    def _process(self, step: _InFlight) -> set[str]:
        """Append a launched step's tokens (waiting for them), run the stop checks and
        detokenize; the groups touched. A request finished or aborted since its row was
        launched has no placeholder left: its token is dropped."""
        result = step.sample.result()
        touched: set[str] = set()
        finished = Status.FINISHED
        n = 0
        for req, track, token, lp in zip(step.requests, step.tracks, result.token_ids, result.logprobs, strict=True):
            if req.status is not finished:
                self._append(req, track, token, lp)
                touched.add(req.group_id)
                n += 1
        self.num_generated_tokens += n
        return touched

    def _append(self, req: Request, track: _Track, token: int, logprobs: dict[int, Logprob] | None) -> None:
        """Put a sampled token in its placeholder (the oldest), if it has one, and apply the
        stop rules."""
        if req.num_pending:
            num_tokens = len(req.all_token_ids) - req.num_pending + 1  # up to and with this token
            req.all_token_ids[num_tokens - 1] = token
            req.num_pending -= 1
        else:
            req.all_token_ids.append(token)
            num_tokens = len(req.all_token_ids)
        if logprobs is not None:
            track.logprobs.append(logprobs)
            track.cumulative += logprobs[token].logprob
        p = req.params
        stop_str = track.detok.update((token,))
        num_out = num_tokens - req.prompt_len
        done_min = num_out >= p.min_tokens
        if done_min and token in p.stop_token_ids:
            self._finish(req, "stop", token)
        elif done_min and not p.ignore_eos and token in self.tokenizer.eos_token_ids:
            self._finish(req, "stop")
        elif stop_str is not None:
            self._finish(req, "stop", stop_str)
        elif p.max_tokens is not None and num_out >= p.max_tokens:
            self._finish(req, "length")
        elif num_out + req.prompt_len >= self.max_model_len:
            self._finish(req, "length")
        elif not req.long_rope and self.long_rope_after is not None and num_tokens > self.long_rope_after:
            # Past a longrope model's switch every token runs on the long factors, the cached
            # ones too (transformers drops its cache there): compute the sequence again.
            req.long_rope = True
            self.scheduler.recompute(req)

    def _output(self, group_id: str) -> RequestOutput:
        reqs = self.groups[group_id]
        outs = []
        finished = True
        cached = 0
        for req in reqs:
            track = self._track[req.request_id]
            detok = track.detok
            done = req.status is Status.FINISHED
            delta = detok.take_delta() + detok.finish() if done else detok.take_delta()
            tokens = req.all_token_ids
            known = len(tokens) - req.num_pending
            reported, track.reported = track.reported, known - req.prompt_len
            if req.params.logprobs is None:
                cumulative = delta_lp = None
            else:
                cumulative, delta_lp, track.logprobs = track.cumulative, track.logprobs, []
            outs.append(CompletionOutput(
                req.index, detok.text, [], cumulative, None, req.finish_reason,
                req.stop_reason, delta, tokens[req.prompt_len + reported : known], delta_lp,
            ))
            finished = finished and done
            cached += req.num_cached_tokens
        out = RequestOutput(group_id, self._prompts[group_id], reqs[0].prompt_token_ids, outs, finished, cached)
        if finished:
            self._release(group_id)
        return out

    def _release(self, group_id: str) -> None:
        for req in self.groups.pop(group_id):
            self._track.pop(req.request_id, None)
        self._prompts.pop(group_id, None)

    def run(self, request_ids: Iterable[str]) -> dict[str, RequestOutput]:
        """Step until the given requests finish; their final (whole) outputs by id."""
        pending = set(request_ids)
        final: dict[str, RequestOutput] = {}
        acc = OutputAccumulator()
        while pending:
            if not self.has_unfinished_requests():
                raise RuntimeError(f"requests {sorted(pending)} are lost: nothing left to run")
            for out in map(acc.add, self.step()):
                if out.finished and out.request_id in pending:
                    final[out.request_id] = out
                    pending.discard(out.request_id)
        return final
