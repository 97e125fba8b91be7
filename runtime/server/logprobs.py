"""Per-token logprobs in OpenAI's two shapes: completions' parallel lists and chat's objects."""

from __future__ import annotations

from collections.abc import Sequence

from kiln.runtime.sampling_params import Logprob
from kiln.runtime.server.responses import CompletionLogprobs, TokenLogprob, TopLogprob
from kiln.runtime.tokenizer import Tokenizer


class TokenTexts:
    """The text of single token ids (special tokens kept), decoded once per id."""

    def __init__(self, tokenizer: Tokenizer):
        self._tok = tokenizer
        self._cache: dict[int, str] = {}

    def __call__(self, token_id: int) -> str:
        text = self._cache.get(token_id)
        if text is None:
            text = self._cache[token_id] = self._tok.decode([token_id], skip_special_tokens=False)
        return text


def _ranked(entry: dict[int, Logprob], top: int) -> list[tuple[int, Logprob]]:
    """The top-`top` tokens of one position, most likely first."""
    ranked = [(t, lp) for t, lp in entry.items() if lp.rank is not None and lp.rank <= top]
    return sorted(ranked, key=lambda kv: kv[1].rank)[:top]


def completion_logprobs(texts: TokenTexts, token_ids: Sequence[int], entries: Sequence[dict[int, Logprob]],
                        top: int, offset: int) -> CompletionLogprobs:
    """Completions' logprobs of tokens (with their entries); text offsets count from `offset`.
    As OpenAI's, top_logprobs holds the `top` most likely tokens and the sampled one."""
    out = CompletionLogprobs()
    for tid, entry in zip(token_ids, entries, strict=True):
        text = texts(tid)
        out.tokens.append(text)
        out.token_logprobs.append(entry[tid].logprob)
        tops: dict[str, float] = {}
        for t, lp in _ranked(entry, top):  # tokens with the same text (split characters) share
            tops.setdefault(texts(t), lp.logprob)  # one key: it keeps the most likely one
        tops.setdefault(text, entry[tid].logprob)
        out.top_logprobs.append(tops)
        out.text_offset.append(offset)
        offset += len(text)
    return out


def _top(texts: TokenTexts, tid: int, lp: Logprob) -> TopLogprob:
    text = texts(tid)
    return TopLogprob(token=text, logprob=lp.logprob, bytes=list(text.encode("utf-8")))


def chat_logprobs(texts: TokenTexts, token_ids: Sequence[int], entries: Sequence[dict[int, Logprob]],
                  top: int) -> list[TokenLogprob]:
    """Chat's logprobs content: each sampled token with its `top` most likely alternatives."""
    out = []
    for tid, entry in zip(token_ids, entries, strict=True):
        chosen = _top(texts, tid, entry[tid])
        alts = [_top(texts, t, lp) for t, lp in _ranked(entry, top)]
        out.append(TokenLogprob(**chosen.model_dump(), top_logprobs=alts))
    return out


def delta_entries(token_ids: Sequence[int], delta_token_ids: Sequence[int],
                  entries: Sequence[dict[int, Logprob]] | None) -> tuple[list[int], list[dict[int, Logprob]]]:
    """The tokens new in a streamed output and their logprob entries."""
    if not entries or not delta_token_ids:
        return [], []
    start = len(token_ids) - len(delta_token_ids)
    return list(delta_token_ids), list(entries[start:len(token_ids)])
