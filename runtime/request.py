"""A request as the scheduler and engine see it."""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field

from kiln.runtime.sampling_params import SamplingParams

PLACEHOLDER = -1
"""The id held in all_token_ids for a token sampled on the device and not yet read."""


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False)
class Request:
    """One generated sequence (a prompt with n > 1 becomes n requests sharing its blocks).

    Its tokens live in one growing list, `all_token_ids` (prompt, then output): appending is
    O(1) and nothing on the step path copies the history."""

    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    prompt: str | None = None
    index: int = 0
    """Which of the n completions of its prompt this is."""
    group_id: str = ""
    """The id the caller gave; requests of one prompt share it."""
    adapter_id: int | None = None
    """The LoRA adapter (LoRARequest.lora_int_id) it runs with; None: the base model."""
    lora_slot: int = -1
    """The adapter slot the engine holds for it while it runs (-1: the base model)."""
    long_rope: bool = False
    """Computed with a longrope model's long factors (set once it is longer than the switch)."""
    arrival_time: float = field(default_factory=time.monotonic)
    num_computed_tokens: int = 0
    """Tokens whose K/V are in the cache; catches up with num_tokens step by step."""
    status: Status = Status.WAITING
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    num_preemptions: int = 0
    num_cached_tokens: int = 0
    """Prompt tokens found in the prefix cache when first admitted."""
    num_pending: int = 0
    """Sampled tokens still on the device (async scheduling): the last num_pending entries of
    all_token_ids are PLACEHOLDER until the engine reads them; the scheduler counts them."""
    all_token_ids: list[int] = field(init=False)
    """Prompt then output token ids; only ever appended to."""
    prompt_len: int = field(init=False)

    def __post_init__(self) -> None:
        self.all_token_ids = list(self.prompt_token_ids)
        self.prompt_len = len(self.prompt_token_ids)

    def append_token(self, token: int) -> None:
        """Record one generated token (O(1))."""
        self.all_token_ids.append(token)

    @property
    def output_token_ids(self) -> list[int]:
        """A copy of the generated tokens (not for the step path: it copies the output)."""
        return self.all_token_ids[self.prompt_len :]

    @property
    def num_output_tokens(self) -> int:
        """Tokens generated so far."""
        return len(self.all_token_ids) - self.prompt_len

    @property
    def num_known_tokens(self) -> int:
        """Prompt plus generated tokens whose ids the host has (not placeholders)."""
        return len(self.all_token_ids) - self.num_pending

    @property
    def num_tokens(self) -> int:
        """Prompt plus generated tokens."""
        return len(self.all_token_ids)

    @property
    def cache_key(self) -> tuple[int | None, bool]:
        """What besides the tokens decides a KV block's content (prefix-cache hash key)."""
        return self.adapter_id, self.long_rope

    @property
    def finished(self) -> bool:
        return self.status is Status.FINISHED
