"""What a request asks of generation (vLLM's `SamplingParams` names and defaults), and `Logprob`.

Validation happens here, at the boundary where the request enters: a bad value is a
`ValueError` naming the parameter and the accepted range, so the server can return it as is.
"""

from __future__ import annotations

from dataclasses import dataclass

MAX_LOGPROBS = 20
"""The most top logprobs a request may ask for per token (OpenAI's limit)."""


@dataclass
class Logprob:
    """The log-probability of one token at one position (vLLM's names)."""

    logprob: float
    rank: int | None = None
    """1 + the number of tokens with a strictly higher logprob (1 = the most likely token)."""
    decoded_token: str | None = None
    """The token's text, when the engine fills it in."""


@dataclass
class SamplingParams:
    """How to pick each next token and when to stop (vLLM's names and defaults)."""

    n: int = 1
    """Completions per prompt."""
    temperature: float = 1.0
    """0 => greedy."""
    top_p: float = 1.0
    """Keep the smallest set of most likely tokens whose mass reaches top_p."""
    top_k: int = 0
    """Keep the k most likely tokens; 0 (or -1, normalized to 0) => all."""
    min_p: float = 0.0
    """Drop tokens whose probability is below min_p times the most likely token's."""
    presence_penalty: float = 0.0
    """Subtracted from the logit of every token already generated."""
    frequency_penalty: float = 0.0
    """Subtracted from a token's logit once per time it was generated."""
    repetition_penalty: float = 1.0
    """HF-style: logits of prompt and output tokens are divided (> 0) or multiplied (< 0) by it."""
    seed: int | None = None
    """Seeds this request's own generator, so its samples do not depend on the batch."""
    stop: str | list[str] | None = None
    """Strings that end generation when they appear in the output text."""
    stop_token_ids: list[int] | None = None
    """Token ids that end generation (the token is kept in token_ids, not in the text)."""
    include_stop_str_in_output: bool = False
    ignore_eos: bool = False
    """Keep generating past the EOS token(s)."""
    max_tokens: int | None = 16
    """None => up to the model's context length."""
    min_tokens: int = 0
    """EOS and stop_token_ids are forbidden until this many tokens are generated."""
    logprobs: int | None = None
    """Top logprobs to return per token (0 => only the chosen token's); None => none."""
    skip_special_tokens: bool = True

    def __post_init__(self) -> None:
        if self.stop is None:
            self.stop = []
        elif isinstance(self.stop, str):
            self.stop = [self.stop]
        else:
            self.stop = list(self.stop)
        self.stop_token_ids = list(self.stop_token_ids or [])
        if self.top_k == -1:
            self.top_k = 0
        self._validate()

    def _validate(self) -> None:
        _check(_is_int(self.n) and self.n >= 1, "n", "an integer >= 1", self.n)
        _check(
            _is_num(self.temperature) and self.temperature >= 0,
            "temperature",
            ">= 0 (0 => greedy)",
            self.temperature,
        )
        _check(_is_num(self.top_p) and 0 < self.top_p <= 1, "top_p", "in (0, 1]", self.top_p)
        _check(
            _is_int(self.top_k) and self.top_k >= 0,
            "top_k",
            "an integer >= 0, or -1 (0 and -1 disable it)",
            self.top_k,
        )
        _check(_is_num(self.min_p) and 0 <= self.min_p <= 1, "min_p", "in [0, 1]", self.min_p)
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            _check(_is_num(value) and -2 <= value <= 2, name, "in [-2, 2]", value)
        _check(
            _is_num(self.repetition_penalty) and self.repetition_penalty > 0,
            "repetition_penalty",
            "> 0 (1 => none)",
            self.repetition_penalty,
        )
        _check(self.seed is None or _is_int(self.seed), "seed", "an integer or None", self.seed)
        _check(
            self.max_tokens is None or (_is_int(self.max_tokens) and self.max_tokens >= 1),
            "max_tokens",
            "an integer >= 1, or None",
            self.max_tokens,
        )
        limit = self.min_tokens if self.max_tokens is None else self.max_tokens
        accepted = (
            "an integer >= 0"
            if self.max_tokens is None
            else f"an integer in [0, max_tokens={self.max_tokens}]"
        )
        _check(
            _is_int(self.min_tokens) and 0 <= self.min_tokens <= limit,
            "min_tokens",
            accepted,
            self.min_tokens,
        )
        _check(
            self.logprobs is None
            or (_is_int(self.logprobs) and 0 <= self.logprobs <= MAX_LOGPROBS),
            "logprobs",
            f"an integer in [0, {MAX_LOGPROBS}], or None",
            self.logprobs,
        )
        for s in self.stop:
            _check(isinstance(s, str) and s != "", "stop", "non-empty strings", s)
        for t in self.stop_token_ids:
            _check(_is_int(t) and t >= 0, "stop_token_ids", "integer token ids >= 0", t)

    @property
    def greedy(self) -> bool:
        """True when sampling reduces to argmax (temperature 0 or top_k 1)."""
        return self.temperature == 0 or self.top_k == 1


def _check(ok: bool, name: str, accepted: str, value: object) -> None:
    if not ok:
        raise ValueError(f"SamplingParams.{name} must be {accepted}, got {value!r}")


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v: object) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and v == v  # v == v rejects NaN
