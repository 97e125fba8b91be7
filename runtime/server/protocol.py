"""Request bodies as OpenAI defines them, plus the sampling fields the engine supports.

Types are strict (a string is not a number, 1.0 is not an integer, NaN and infinities are
refused) and unknown fields are ignored, as vLLM does. Ranges are checked once, by
`SamplingParams`; the bounds here only keep numbers within what the sampler's tensors hold.
Response bodies are in `responses.py`.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidatorFunctionWrapHandler,
    field_validator,
)

Int32 = Annotated[int, Field(ge=-(2**31), le=2**31 - 1)]
Int64 = Annotated[int, Field(ge=-(2**63), le=2**63 - 1)]
TokenId = int
"""Any JSON integer: the route checks it against the vocabulary (naming the range [0, vocab))."""
MAX_N = 128
"""The most completions one request may ask for (OpenAI's limit)."""


class Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore", allow_inf_nan=False)


class StreamOptions(Strict):
    include_usage: bool | None = False
    """Send a last chunk with `usage` (and `"usage": null` in every other chunk)."""


class SamplingFields(Strict):
    """Fields shared by completions and chat completions."""

    model: str | None = None
    """The served model name; None => the only model served."""
    n: Annotated[int, Field(ge=1, le=MAX_N)] | None = 1
    temperature: float | None = None
    """None => 1.0; 0 => greedy."""
    top_p: float | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    seed: Int64 | None = None
    stop: str | list[str] | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    logit_bias: dict[str, float] | None = None
    """Not supported: refused unless empty."""
    # Extra sampling fields (vLLM's names)
    top_k: Int32 | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    min_tokens: Int32 | None = None
    ignore_eos: bool | None = None
    stop_token_ids: list[TokenId] | None = None
    skip_special_tokens: bool | None = None
    include_stop_str_in_output: bool | None = None


class CompletionRequest(SamplingFields):
    """POST /v1/completions."""

    prompt: str | list[str] | list[TokenId] | list[list[TokenId]]
    """Text, texts, token ids, or lists of token ids; each prompt gets n completions."""
    max_tokens: Int32 | None = 16
    """None => up to the model's context."""
    logprobs: Int32 | None = None
    """Top logprobs per token (0..20); None => none."""
    echo: bool | None = False
    """Return the prompt text before the completion."""
    suffix: str | None = None
    """Not supported: refused unless None."""
    best_of: Int32 | None = None
    """Only best_of == n (or None) is supported."""

    @field_validator("prompt", mode="wrap")
    @classmethod
    def _prompt(cls, value: Any, handler: ValidatorFunctionWrapHandler) -> Any:
        try:
            return handler(value)
        except ValidationError:
            raise ValueError(prompt_problem(value)) from None


PROMPT_FORMS = "a string, a list of strings, a list of token ids, or a list of lists of token ids"


def _token_problem(value: Any, where: str) -> str | None:
    if isinstance(value, int) and not isinstance(value, bool):
        return None
    return f"{where} is {value!r:.40}, not a token id (an integer)"


def prompt_problem(value: Any) -> str:
    """Why a prompt matches none of its forms, naming the first element that is wrong."""
    if not isinstance(value, list) or not value:
        return f"must be {PROMPT_FORMS}; got {type(value).__name__}"
    first = value[0]
    for i, item in enumerate(value):
        where = f"prompt[{i}]"
        if isinstance(first, str):
            if not isinstance(item, str):
                return f"{where} is {item!r:.40}, not a string like prompt[0] (a list of prompts holds one kind)"
        elif isinstance(first, list):
            if not isinstance(item, list):
                return f"{where} is {item!r:.40}, not a list of token ids like prompt[0]"
            for j, t in enumerate(item):
                if (problem := _token_problem(t, f"{where}[{j}]")) is not None:
                    return problem
        elif (problem := _token_problem(item, where)) is not None:
            return problem
    return f"must be {PROMPT_FORMS}"


class ContentPart(Strict):
    type: str
    text: str | None = None


class ChatMessage(Strict):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None
    name: str | None = None


class ResponseFormat(Strict):
    type: str


class ChatCompletionRequest(SamplingFields):
    """POST /v1/chat/completions."""

    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    max_tokens: Int32 | None = None
    """Deprecated by OpenAI for max_completion_tokens; None => up to the model's context."""
    max_completion_tokens: Int32 | None = None
    logprobs: bool | None = False
    top_logprobs: Int32 | None = None
    """0..20, with logprobs=true."""
    response_format: ResponseFormat | None = None
    """Only {"type": "text"} is supported."""
    tools: list[dict] | None = None
    """Not supported: refused unless empty."""
    tool_choice: str | dict | None = None
    add_generation_prompt: bool | None = True
    """Render the template's assistant header after the messages (vLLM's extra field)."""


class TokenizeRequest(Strict):
    """POST /tokenize: either a prompt or chat messages."""

    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool | None = True
    """For a prompt: add the tokenizer's special tokens (BOS...) as generation would."""
    add_generation_prompt: bool | None = True


class DetokenizeRequest(Strict):
    """POST /detokenize."""

    model: str | None = None
    tokens: list[TokenId]


class LoadLoRAAdapterRequest(Strict):
    """POST /v1/load_lora_adapter (vLLM's body)."""

    lora_name: Annotated[str, Field(min_length=1)]
    lora_path: Annotated[str, Field(min_length=1)]
    """A PEFT adapter directory on the server's filesystem."""


class UnloadLoRAAdapterRequest(Strict):
    """POST /v1/unload_lora_adapter: the adapter by name or by id (vLLM's body)."""

    lora_name: str | None = None
    lora_int_id: int | None = None
