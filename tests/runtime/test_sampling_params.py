"""SamplingParams normalizes its inputs and rejects bad ones with a message naming the parameter."""

from __future__ import annotations

import pytest

from kiln.runtime.sampling_params import Logprob, SamplingParams


def test_defaults_match_vllm():
    p = SamplingParams()
    assert (p.n, p.temperature, p.top_p, p.top_k, p.min_p) == (1, 1.0, 1.0, 0, 0.0)
    assert (p.presence_penalty, p.frequency_penalty, p.repetition_penalty) == (0.0, 0.0, 1.0)
    assert (p.seed, p.stop, p.stop_token_ids) == (None, [], [])
    assert (p.include_stop_str_in_output, p.ignore_eos, p.skip_special_tokens) == (
        False,
        False,
        True,
    )
    assert (p.max_tokens, p.min_tokens, p.logprobs) == (16, 0, None)
    assert not p.greedy


def test_normalization():
    assert SamplingParams(stop="END").stop == ["END"]
    assert SamplingParams(stop=("a", "bc")).stop == ["a", "bc"]
    assert SamplingParams(stop_token_ids=(3, 4)).stop_token_ids == [3, 4]
    assert SamplingParams(top_k=-1).top_k == 0
    assert SamplingParams(max_tokens=None, min_tokens=1000).max_tokens is None


@pytest.mark.parametrize(
    ("kwargs", "greedy"),
    [
        ({"temperature": 0}, True),
        ({"temperature": 0.0, "top_p": 0.5}, True),
        ({"top_k": 1}, True),
        ({"temperature": 0.01}, False),
        ({"top_k": 2}, False),
    ],
)
def test_greedy(kwargs, greedy):
    assert SamplingParams(**kwargs).greedy is greedy


@pytest.mark.parametrize(
    ("name", "value", "accepted"),
    [
        ("n", 0, ">= 1"),
        ("n", 1.5, ">= 1"),
        ("temperature", -0.1, ">= 0"),
        ("temperature", float("nan"), ">= 0"),
        ("top_p", 0.0, "(0, 1]"),
        ("top_p", 1.01, "(0, 1]"),
        ("top_k", -2, ">= 0"),
        ("top_k", 2.5, ">= 0"),
        ("min_p", -0.1, "[0, 1]"),
        ("min_p", 1.5, "[0, 1]"),
        ("presence_penalty", 2.5, "[-2, 2]"),
        ("presence_penalty", -2.1, "[-2, 2]"),
        ("frequency_penalty", -3, "[-2, 2]"),
        ("repetition_penalty", 0.0, "> 0"),
        ("repetition_penalty", -1.0, "> 0"),
        ("seed", "1", "integer"),
        ("max_tokens", 0, ">= 1"),
        ("min_tokens", -1, "[0, max_tokens=16]"),
        ("min_tokens", 17, "[0, max_tokens=16]"),
        ("logprobs", -1, "[0, 20]"),
        ("logprobs", 21, "[0, 20]"),
        ("stop", "", "non-empty"),
        ("stop", ["ok", ""], "non-empty"),
        ("stop_token_ids", [-1], ">= 0"),
        ("stop_token_ids", ["x"], ">= 0"),
    ],
)
def test_validation_names_parameter_and_range(name, value, accepted):
    with pytest.raises(ValueError) as e:
        SamplingParams(**{name: value})
    msg = str(e.value)
    assert f"SamplingParams.{name} " in msg
    assert accepted in msg
    bad = value[-1] if isinstance(value, list) else value  # lists name their bad element
    assert f"got {bad!r}" in msg


def test_min_tokens_without_max_tokens():
    with pytest.raises(ValueError, match=r"min_tokens must be an integer >= 0"):
        SamplingParams(max_tokens=None, min_tokens=-1)
    assert SamplingParams(max_tokens=4, min_tokens=4).min_tokens == 4


def test_logprob_fields():
    lp = Logprob(-0.5)
    assert (lp.logprob, lp.rank, lp.decoded_token) == (-0.5, None, None)
    assert Logprob(-1.0, rank=2, decoded_token="a").rank == 2
