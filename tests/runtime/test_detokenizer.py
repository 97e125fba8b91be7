"""Incremental detokenization: streamed text equals a one-shot decode, never shows a split
character, and stops exactly at stop strings (also when they span several tokens)."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kiln.models.tokenizer import EOS_ID, build_tokenizer
from kiln.runtime.detokenizer import IncrementalDetokenizer
from kiln.runtime.sampling_params import SamplingParams
from kiln.runtime.tokenizer import Tokenizer

MULTI_BYTE = ["é", "ß", "€", "中", "𝄞", "😀", "👍🏽", "👨‍👩‍👧", "\u200d", "ñ"]
# U+FFFD itself is left out: streaming reads it as "character not complete yet" (as vLLM does).
TEXT = st.lists(
    st.one_of(st.characters(codec="utf-8", exclude_characters="\ufffd"), st.sampled_from(MULTI_BYTE)),
    max_size=30,
).map("".join)
PROMPTS = ["", "Hello", "héllo wörld 😀", "a compiler"]
SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@pytest.fixture(scope="module")
def tok(tmp_path_factory) -> Tokenizer:
    art = tmp_path_factory.mktemp("detok-artifact")
    build_tokenizer(art / "tokenizer")
    return Tokenizer.from_directory(art)


def _stream(tok, prompt: str, ids: list[int], chunks: list[int], **params):
    """Feed ids in chunks of the given sizes, taking a delta after each; return (detokenizer,
    deltas, stop, (ids fed before the update that stopped, ids fed when it stopped))."""
    detok = IncrementalDetokenizer(tok, tok.encode(prompt), SamplingParams(**params))
    deltas, stop, i, prev = [], None, 0, 0
    sizes = iter(chunks)
    while i < len(ids) and stop is None:
        prev, i = i, i + next(sizes, 1)
        stop = detok.update(ids[prev:i])
        deltas.append(detok.take_delta())
    deltas.append(detok.finish())
    return detok, deltas, stop, (prev, min(i, len(ids)))


@SETTINGS
@given(text=TEXT, prompt=st.sampled_from(PROMPTS), chunks=st.lists(st.integers(1, 4)))
def test_streamed_text_equals_one_shot_decode(tok, text, prompt, chunks):
    ids = tok.encode(text, add_special_tokens=False)
    assert tok.decode(ids) == text  # byte-level BPE round-trips
    detok, deltas, stop, _ = _stream(tok, prompt, ids, chunks)
    assert stop is None
    assert "".join(deltas) == text == detok.text
    assert not any("\ufffd" in d for d in deltas)


@SETTINGS
@given(
    ids=st.lists(st.integers(0, 255), max_size=30),
    skip=st.booleans(),
    chunks=st.lists(st.integers(1, 3)),
)
def test_any_token_sequence_streams_like_one_shot_decode(tok, ids, skip, chunks):
    """Also invalid UTF-8 (stray byte tokens) and special tokens, with and without skipping."""
    _, deltas, _, _ = _stream(tok, "Hello", ids, chunks, skip_special_tokens=skip)
    assert "".join(deltas) == tok.decode(ids, skip_special_tokens=skip)


def _first_stop(text: str, stops: list[str]) -> tuple[int, int, str] | None:
    """(start, end, stop) of the stop string that completes first, the longest on a tie."""
    for end in range(1, len(text) + 1):
        hits = [s for s in stops if text[:end].endswith(s)]
        if hits:
            s = max(hits, key=len)
            return end - len(s), end, s
    return None


@SETTINGS
@given(
    data=st.data(),
    text=TEXT.filter(lambda t: len(t) >= 1),
    include=st.booleans(),
    chunks=st.lists(st.integers(1, 3)),
)
def test_stop_strings_end_the_text_exactly(tok, data, text, include, chunks):
    i = data.draw(st.integers(0, len(text) - 1))
    j = data.draw(st.integers(i + 1, min(len(text), i + 6)))
    stops = [
        text[i:j],
        *data.draw(st.lists(st.sampled_from(["zz", "é€", "the", "😀"]), max_size=2)),
    ]
    ids = tok.encode(text, add_special_tokens=False)
    detok, deltas, stop, (before, at) = _stream(
        tok, "Hello", ids, chunks, stop=stops, include_stop_str_in_output=include
    )
    start, end, want = _first_stop(text, stops)
    expected = text[: end if include else start]
    assert stop == want
    assert detok.text == expected == "".join(deltas)
    # reported by the update that completed it, not later (unless a split character held it back)
    assert tok.decode(ids[:at]).startswith(text[:end])
    earlier = tok.decode(ids[:before])
    assert not earlier.startswith(text[:end]) or earlier.endswith("\ufffd")


@pytest.mark.parametrize("include", [False, True])
def test_stop_string_across_token_boundaries(tok, include):
    text = "Hello world, stop here END and more"
    ids = tok.encode(text, add_special_tokens=False)
    detok = IncrementalDetokenizer(
        tok, [], SamplingParams(stop=["END"], include_stop_str_in_output=include)
    )
    seen = []
    for n, t in enumerate(ids):  # noqa: B007 (n is used after the loop)
        stop = detok.update([t])
        seen.append(detok.take_delta())
        if stop is not None:
            break
    assert stop == "END"
    assert tok.decode(ids[: n + 1]).endswith("END")
    assert len(tok.decode(ids[n : n + 1])) < 3  # "END" really spans several tokens
    assert detok.text == ("Hello world, stop here END" if include else "Hello world, stop here ")
    assert "".join(seen) + detok.finish() == detok.text
    assert detok.update(tok.encode(" more")) is None and detok.text.endswith(("END", " "))


def test_first_completed_stop_wins(tok):
    detok = IncrementalDetokenizer(tok, [], SamplingParams(stop=["abcd", "c"]))
    assert detok.update(tok.encode("xxabcdyy")) == "c"
    assert detok.text == "xxab"


def test_take_delta_holds_back_a_possible_stop_prefix(tok):
    detok = IncrementalDetokenizer(tok, [], SamplingParams(stop=["STOP", "x"]))
    detok.update(tok.encode("abcdef"))
    assert detok.take_delta() == "abc"  # "def" could still become "...STOP"
    assert detok.take_delta() == ""
    detok.update(tok.encode("ST"))
    assert detok.take_delta() == "de"
    assert detok.finish() == "fST"
    assert detok.text == "abcdefST"


def test_split_character_is_held_until_complete(tok):
    ids = tok.encode("a😀", add_special_tokens=False)
    assert len(ids) >= 3  # the emoji is several byte tokens
    assert tok.decode(ids[:1]) == "a"
    detok = IncrementalDetokenizer(tok, [], SamplingParams())
    detok.update(ids[:1])
    assert detok.take_delta() == "a"
    detok.update(ids[1:2])
    assert detok.text == "a" and detok.take_delta() == ""
    detok.update(ids[2:])
    assert detok.take_delta() == "😀"
    # an incomplete character at the end is flushed (as U+FFFD) only by finish()
    detok = IncrementalDetokenizer(tok, [], SamplingParams())
    detok.update(ids[:2])
    assert detok.finish() == tok.decode(ids[:2]) and detok.finish() == ""


@pytest.mark.parametrize(("skip", "text"), [(True, "hi there"), (False, "hi</s> there")])
def test_skip_special_tokens(tok, skip, text):
    ids = (
        tok.encode("hi", add_special_tokens=False)
        + [EOS_ID]
        + tok.encode(" there", add_special_tokens=False)
    )
    detok = IncrementalDetokenizer(tok, [], SamplingParams(skip_special_tokens=skip))
    for t in ids:
        detok.update([t])
    assert detok.text == text


class _SentencePieceLike:
    """A Metaspace tokenizer: decoding strips the first token's leading space."""

    def __init__(self):
        from tokenizers import Tokenizer as Fast
        from tokenizers import decoders, models

        self._tok = Fast(
            models.WordLevel({"<unk>": 0, "▁Hello": 1, "▁world": 2, "!": 3}, unk_token="<unk>")
        )
        self._tok.decoder = decoders.Metaspace()

    def decode(self, ids, skip_special_tokens=True):
        return self._tok.decode(ids, skip_special_tokens=skip_special_tokens)


def test_prompt_context_keeps_the_leading_space():
    tok = _SentencePieceLike()
    detok = IncrementalDetokenizer(tok, [1], SamplingParams())
    detok.update([2])
    detok.update([3])
    assert tok.decode([2, 3]) == "world!"  # decoded alone, the space is lost
    assert detok.text == " world!"


def test_decode_window_stays_short(tok):
    """Each step decodes a few recent tokens, not the whole output (O(n), not O(n^2))."""

    class Recording:
        def __init__(self):
            self.longest = 0

        def decode(self, ids, skip_special_tokens=True):
            self.longest = max(self.longest, len(ids))
            return tok.decode(ids, skip_special_tokens=skip_special_tokens)

    rec = Recording()
    text = "naïve café 😀 " * 20
    ids = tok.encode(text, add_special_tokens=False)
    detok = IncrementalDetokenizer(
        rec, tok.encode("a long prompt of many tokens"), SamplingParams()
    )
    for t in ids:
        detok.update([t])
    assert detok.text == text and len(ids) > 100
    assert rec.longest <= 10
