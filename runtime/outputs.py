"""What generation returns, with vLLM's names."""

from __future__ import annotations

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
