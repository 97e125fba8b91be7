"""fused-add-rms-norm: the residual add and the RMSNorm of its sum become one two-result op."""

from __future__ import annotations

import pytest
from pass_harness import assert_equivalent, rewrite

from kiln.passes import get_pass
from kiln.passes.fused_add_rms_norm import FusedAddRmsNorm

RESIDUAL_BEFORE = """graph {
  %input_ids = input : i64[T]
  @embed = param : bf16[16,8]
  %0 = embedding(@embed, %input_ids) : bf16[T,8]
  @proj = param : bf16[8,8]
  %1 = linear(%0, @proj) : bf16[T,8]
  %2 = add(%0, %1) : bf16[T,8]
  @norm = param : bf16[8]
  %3 = rms_norm(%2, @norm) {"normalized_shape": [8], "eps": 1e-06, "offset": 0.0, "weight_fp32": false} : bf16[T,8]
  @mlp = param : bf16[8,8]
  %4 = linear(%3, @mlp) : bf16[T,8]
  %5 = add(%2, %4) : bf16[T,8]
  return %5
}"""
RESIDUAL_AFTER = """graph {
  %input_ids = input : i64[T]
  @embed = param : bf16[16,8]
  %0 = embedding(@embed, %input_ids) : bf16[T,8]
  @proj = param : bf16[8,8]
  %1 = linear(%0, @proj) : bf16[T,8]
  @norm = param : bf16[8]
  %2 = fused_add_rms_norm(%0, %1, @norm) {"eps": 1e-06, "offset": 0.0, "weight_fp32": false} : (bf16[T,8], bf16[T,8])
  %3 = get_result(%2) {"index": 1} : bf16[T,8]
  %4 = get_result(%2) {"index": 0} : bf16[T,8]
  @mlp = param : bf16[8,8]
  %5 = linear(%4, @mlp) : bf16[T,8]
  %6 = add(%3, %5) : bf16[T,8]
  return %6
}"""

NORMED_TWICE_BEFORE = """graph {
  %input_ids = input : i64[T]
  @embed = param : f32[16,8]
  %0 = embedding(@embed, %input_ids) : f32[T,8]
  %1 = exp(%0) : f32[T,8]
  %2 = add(%1, %0) : f32[T,8]
  @a = param : f32[8]
  %3 = rms_norm(%2, @a) {"normalized_shape": [8], "eps": 1e-06, "offset": 1.0, "weight_fp32": true} : f32[T,8]
  %4 = rms_norm(%2) {"normalized_shape": [8], "eps": 1e-05, "offset": 0.0, "weight_fp32": false} : f32[T,8]
  %5 = sub(%3, %4) : f32[T,8]
  return %5
}"""
NORMED_TWICE_AFTER = """graph {
  %input_ids = input : i64[T]
  @embed = param : f32[16,8]
  %0 = embedding(@embed, %input_ids) : f32[T,8]
  %1 = exp(%0) : f32[T,8]
  @a = param : f32[8]
  %2 = fused_add_rms_norm(%1, %0, @a) {"eps": 1e-06, "offset": 1.0, "weight_fp32": true} : (f32[T,8], f32[T,8])
  %3 = get_result(%2) {"index": 0} : f32[T,8]
  %4 = get_result(%2) {"index": 1} : f32[T,8]
  %5 = rms_norm(%4) {"normalized_shape": [8], "eps": 1e-05, "offset": 0.0, "weight_fp32": false} : f32[T,8]
  %6 = sub(%3, %5) : f32[T,8]
  return %6
}"""

REWRITTEN = {
    "residual_read_by_the_next_add": (RESIDUAL_BEFORE, RESIDUAL_AFTER),
    "sum_normed_twice_fuses_once": (NORMED_TWICE_BEFORE, NORMED_TWICE_AFTER),
}


@pytest.mark.parametrize("case", sorted(REWRITTEN))
def test_rewrites_bit_exact(case):
    before, after = REWRITTEN[case]
    graph, result = rewrite("fused-add-rms-norm", before, after)
    assert_equivalent("fused-add-rms-norm", graph, result, tol=0.0)


UNCHANGED = {
    "rms_norm_as_torch_computes_it": """graph {
  %input_ids = input : i64[T]
  @embed = param : f32[16,8]
  %0 = embedding(@embed, %input_ids) : f32[T,8]
  %1 = exp(%0) : f32[T,8]
  %2 = add(%1, %0) : f32[T,8]
  @a = param : f32[8]
  %3 = rms_norm(%2, @a) {"normalized_shape": [8], "eps": 1e-06} : f32[T,8]
  return %3
}""",
    "bias_add_broadcasts": """graph {
  %input_ids = input : i64[T]
  @embed = param : f32[16,8]
  %0 = embedding(@embed, %input_ids) : f32[T,8]
  @b = param : f32[8]
  %1 = add(%0, @b) : f32[T,8]
  %2 = rms_norm(%1) {"normalized_shape": [8], "eps": 1e-06, "offset": 0.0, "weight_fp32": false} : f32[T,8]
  return %2
}""",
    "no_add": """graph {
  %input_ids = input : i64[T]
  @embed = param : f32[16,8]
  %0 = embedding(@embed, %input_ids) : f32[T,8]
  %1 = mul(%0, %0) : f32[T,8]
  %2 = rms_norm(%1) {"normalized_shape": [8], "eps": 1e-06, "offset": 0.0, "weight_fp32": false} : f32[T,8]
  return %2
}""",
}


@pytest.mark.parametrize("case", sorted(UNCHANGED))
def test_pattern_does_not_match(case):
    graph, result = rewrite("fused-add-rms-norm", UNCHANGED[case], UNCHANGED[case])
    assert result is graph


def test_pass_is_registered_under_its_name():
    assert isinstance(get_pass("fused-add-rms-norm"), FusedAddRmsNorm)
