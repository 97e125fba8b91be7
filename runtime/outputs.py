"""What generation returns, with vLLM's names.

The engine's per-step outputs carry only what is new (delta_token_ids, delta_logprobs,
delta_text; text is the whole text, a reference to the detokenizer's string), so a step costs
the same however long its requests have run. `OutputAccumulator` folds them into whole outputs
(token_ids, logprobs) for the callers that want those: `LLM.generate`, `generate_stream`, the
async engine's streams and `LLMEngine.run`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from kiln.runtime.sampling_params import Logprob


@dataclass
class CompletionOutput:
    """One completion of a prompt."""

    index: int
    text: str
    token_ids: list[int]
    cumulative_logprob: float | None = None
    logprobs: list[dict[int, Logprob]] | None = None
    """Per generated token: the chosen token's and the top-N tokens' Logprob (when requested)."""
    finish_reason: str | None = None
    """"stop", "length", "abort" or "error"; None while running."""
    stop_reason: int | str | None = None
    """The stop string or stop token id that ended it, if any."""
    delta_text: str = ""
    """Text released since the previous output for this request (for streaming)."""
    delta_token_ids: list[int] = field(default_factory=list)
    """Tokens generated since the previous output for this request."""
    delta_logprobs: list[dict[int, Logprob]] | None = None
    """The logprob entries of delta_token_ids (when requested)."""

    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class RequestOutput:
    """A prompt and its completions."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    num_cached_tokens: int = 0
    """Prompt tokens served from the prefix cache (summed over the n completions)."""

    def snapshot(self) -> RequestOutput:
        """A copy that later steps do not change (its completions and their lists copied)."""
        outs = [
            dataclasses.replace(c, token_ids=list(c.token_ids), delta_token_ids=list(c.delta_token_ids),
                                logprobs=None if c.logprobs is None else list(c.logprobs))
            for c in self.outputs
        ]
        return dataclasses.replace(self, outputs=outs)


class OutputAccumulator:
    """Folds a request's delta outputs into one whole output per request, in O(new tokens).

    `add` returns the request's accumulated output: the same object every time, whose
    token_ids and logprobs lists grow as later deltas arrive (copy them to keep a snapshot);
    its delta_* fields are those of the latest delta. A finished request is forgotten."""

    def __init__(self) -> None:
        self._outputs: dict[str, RequestOutput] = {}

    def add(self, delta: RequestOutput) -> RequestOutput:
        """Fold one engine output in; the request's whole output so far."""
        acc = self._outputs.get(delta.request_id)
        if acc is None:
            acc = RequestOutput(delta.request_id, delta.prompt, delta.prompt_token_ids,
                                [CompletionOutput(c.index, "", [], logprobs=None if c.delta_logprobs is None else [])
                                 for c in delta.outputs], False)
            self._outputs[delta.request_id] = acc
        for whole, c in zip(acc.outputs, delta.outputs, strict=True):
            whole.text = c.text
            whole.token_ids.extend(c.delta_token_ids)
            if c.delta_logprobs is not None and whole.logprobs is not None:
                whole.logprobs.extend(c.delta_logprobs)
            whole.cumulative_logprob = c.cumulative_logprob
            whole.finish_reason, whole.stop_reason = c.finish_reason, c.stop_reason
            whole.delta_text, whole.delta_token_ids, whole.delta_logprobs = (
                c.delta_text, c.delta_token_ids, c.delta_logprobs)
        acc.finished, acc.num_cached_tokens = delta.finished, delta.num_cached_tokens
        if delta.finished:
            del self._outputs[delta.request_id]
        return acc
