"""Incremental detokenization with stop strings, for one generated sequence.

Decoding every step's whole output would cost O(n^2); decoding one token alone breaks multi-byte
characters and (for SentencePiece) leading spaces. As vLLM and HF's streamers do, we decode a
short window of recent ids and emit only what it adds beyond the already-read part:

    all ids:  [ ... prompt ... | out0 out1 out2 out3 out4 ]
                        ^prefix_offset    ^read_offset
    prefix_text = decode(ids[prefix_offset:read_offset])     (context, already emitted)
    new_text    = decode(ids[prefix_offset:])                 (context + unread tokens)
    emit new_text[len(prefix_text):] unless new_text ends in U+FFFD (a character still split
    across tokens); then both offsets move forward.

Stop strings are searched in the output text only where a new match can end: the newly added
characters plus len(stop) - 1 before them. Streaming (`take_delta`) holds back the last
len(longest stop) - 1 characters until the sequence finishes, since they may begin a stop string.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from kiln.runtime.sampling_params import SamplingParams

# Prompt tokens decoded as context before the first output token (vLLM uses the same number):
# enough for SentencePiece's leading-space and byte-fallback rules to see a real prefix.
INITIAL_CONTEXT_TOKENS = 5
_REPLACEMENT = "\ufffd"


class Decoder(Protocol):
    """The part of `kiln.runtime.tokenizer.Tokenizer` the detokenizer uses."""

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str: ...


class IncrementalDetokenizer:
    """Output text of one sequence, grown token by token, with vLLM's stop-string rules."""

    def __init__(self, tokenizer: Decoder, prompt_token_ids: list[int], params: SamplingParams):
        self._tok = tokenizer
        self._params = params
        self._stops: list[str] = list(params.stop or [])
        self._hold = max((len(s) for s in self._stops), default=1) - 1
        self._ids = list(prompt_token_ids)
        self._read = len(self._ids)
        self._prefix = max(self._read - INITIAL_CONTEXT_TOKENS, 0)
        if self._decode(self._prefix, self._read).endswith(_REPLACEMENT):
            self._prefix = self._read  # the prompt ends inside a character: no context
        self._text = ""
        self._sent = 0
        self._stop: str | None = None
        self._finished = False

    @property
    def text(self) -> str:
        """The output text so far (truncated at a stop string once one matched)."""
        return self._text

    @property
    def stop_reason(self) -> str | None:
        """The stop string that ended the text, if one did."""
        return self._stop

    def update(self, new_token_ids: Sequence[int]) -> str | None:
        """Append generated tokens; return the stop string that matched (the text is then final)
        or None. Tokens given after a stop string matched or after finish() are ignored."""
        if self._stop is not None or self._finished:
            return None
        ids = self._ids
        ids += new_token_ids
        prefix, read, skip = self._prefix, self._read, self._params.skip_special_tokens
        prefix_text = self._tok.decode(ids[prefix:read], skip) if prefix < read else ""
        new_text = self._tok.decode(ids[prefix:], skip)
        if len(new_text) <= len(prefix_text) or new_text.endswith(_REPLACEMENT):
            return None  # nothing new yet, or a character is still split across tokens
        self._prefix, self._read = read, len(ids)
        if not self._stops:  # the common case: nothing to search
            self._text += new_text[len(prefix_text) :]
            return None
        return self._append(new_text[len(prefix_text) :])

    def take_delta(self) -> str:
        """Text not returned by an earlier take_delta, less what may still start a stop string."""
        end = (
            len(self._text)
            if self._stop is not None or self._finished
            else len(self._text) - self._hold
        )
        if end <= self._sent:
            return ""
        delta = self._text[self._sent : end]
        self._sent = end
        return delta

    def finish(self) -> str:
        """End the sequence: decode what was held back (even a split character) and return all
        text not yet taken by take_delta."""
        if not self._finished and self._stop is None and self._read < len(self._ids):
            prefix_text = self._decode(self._prefix, self._read)
            new_text = self._decode(self._prefix, len(self._ids))
            self._read = len(self._ids)
            self._append(new_text[len(prefix_text) :])
        self._finished = True
        return self.take_delta()

    def _decode(self, start: int, end: int) -> str:
        if start >= end:
            return ""
        return self._tok.decode(
            self._ids[start:end], skip_special_tokens=self._params.skip_special_tokens
        )

    def _append(self, delta: str) -> str | None:
        """Add decoded characters; on a stop string, truncate the text there and return it."""
        old_len = len(self._text)
        self._text += delta
        best: tuple[int, int, str] | None = (
            None  # (end, start, stop) of the first match to complete
        )
        for stop in self._stops:
            start = self._text.find(stop, max(old_len - len(stop) + 1, 0))
            if start != -1 and (best is None or (start + len(stop), start) < best[:2]):
                best = (start + len(stop), start, stop)
        if best is None:
            return None
        end, start, self._stop = best
        self._text = self._text[: end if self._params.include_stop_str_in_output else start]
        return self._stop
