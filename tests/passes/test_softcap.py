"""softcap: tanh(x / c) * c becomes one softcap op."""

from __future__ import annotations

import pytest
from pass_harness import assert_equivalent, rewrite

from kiln.passes import get_pass
from kiln.passes.softcap import Softcap

FINAL_LOGITS_BF16_BEFORE = """graph {
  %input_ids = input : i64[T]
  @embed = param : bf16[16,8]
  %0 = embedding(@embed, %input_ids) : bf16[T,8]
  @lm_head = param : bf16[16,8]
  %1 = linear(%0, @lm_head) : bf16[T,16]
  %2 = div(%1, 30.0) : bf16[T,16]
  %3 = tanh(%2) : bf16[T,16]
  %4 = mul(%3, 30.0) : bf16[T,16]
  return %4
}"""
FINAL_LOGITS_BF16_AFTER = """graph {
  %input_ids = input : i64[T]
  @embed = param : bf16[16,8]
  %0 = embedding(@embed, %input_ids) : bf16[T,8]
  @lm_head = param : bf16[16,8]
  %1 = linear(%0, @lm_head) : bf16[T,16]
  %2 = softcap(%1) {"cap": 30.0} : bf16[T,16]
  return %2
}"""

RECIPROCAL_BEFORE = """graph {
  %input_ids = input : i64[T]
  @embed = param : f32[16,8]
  %0 = embedding(@embed, %input_ids) : f32[T,8]
  %1 = mul(0.125, %0) : f32[T,8]
  %2 = tanh(%1) : f32[T,8]
  %3 = mul(8.0, %2) : f32[T,8]
  return %3
}"""
RECIPROCAL_AFTER = """graph {
  %input_ids = input : i64[T]
  @embed = param : f32[16,8]
  %0 = embedding(@embed, %input_ids) : f32[T,8]
  %1 = softcap(%0) {"cap": 8.0} : f32[T,8]
  return %1
}"""

REWRITTEN = {
    "gemma2_final_logits_bf16": (FINAL_LOGITS_BF16_BEFORE, FINAL_LOGITS_BF16_AFTER),
    "times_the_reciprocal": (RECIPROCAL_BEFORE, RECIPROCAL_AFTER),
}


@pytest.mark.parametrize("case", sorted(REWRITTEN))
def test_rewrites_bit_exact(case):
    before, after = REWRITTEN[case]
    graph, result = rewrite("softcap", before, after)
    assert_equivalent("softcap", graph, result, tol=0.0)


UNCHANGED = {
    "different_constants": """graph {
  %input_ids = input : i64[T]
  @embed = param : f32[16,8]
  %0 = embedding(@embed, %input_ids) : f32[T,8]
  %1 = div(%0, 30.0) : f32[T,8]
  %2 = tanh(%1) : f32[T,8]
  %3 = mul(%2, 50.0) : f32[T,8]
  return %3
}""",
    "constant_divided_by_x": """graph {
  %input_ids = input : i64[T]
  @embed = param : f32[16,8]
  %0 = embedding(@embed, %input_ids) : f32[T,8]
  %1 = div(30.0, %0) : f32[T,8]
  %2 = tanh(%1) : f32[T,8]
  %3 = mul(%2, 30.0) : f32[T,8]
  return %3
}""",
    "cap_is_a_param": """graph {
  %input_ids = input : i64[T]
  @embed = param : f32[16,8]
  %0 = embedding(@embed, %input_ids) : f32[T,8]
  @cap = param : f32[]
  %1 = div(%0, @cap) : f32[T,8]
  %2 = tanh(%1) : f32[T,8]
  %3 = mul(%2, @cap) : f32[T,8]
  return %3
}""",
}


@pytest.mark.parametrize("case", sorted(UNCHANGED))
def test_pattern_does_not_match(case):
    graph, result = rewrite("softcap", UNCHANGED[case], UNCHANGED[case])
    assert result is graph


def test_pass_is_registered_under_its_name():
    assert isinstance(get_pass("softcap"), Softcap)
