"""expert-linear: the batched-experts GEMV of traced MoE layers becomes one expert_linear."""

from __future__ import annotations

import pytest
from pass_harness import assert_equivalent, rewrite

from kiln.passes import get_pass
from kiln.passes.expert_linear import ExpertLinear

MIXTRAL_BEFORE = """graph {
  %input_ids = input : i64[T]
  @embed = param : bf16[16,8]
  %0 = embedding(@embed, %input_ids) : bf16[T,8]
  @router = param : bf16[4,8]
  %1 = linear(%0, @router) : bf16[T,4]
  %2 = topk(%1) {"k": 2, "dim": 1, "largest": true, "sorted": true, "output": 1} : i64[T,2]
  %3 = reshape(%2) {"shape": [-1]} : i64[2*T]
  @experts.gate_up = param : bf16[4,6,8]
  %4 = index(@experts.gate_up, %3) {"axes": [0]} : bf16[2*T,6,8]
  %5 = repeat_interleave(%0) {"repeats": 2, "dim": 0} : bf16[2*T,8]
  %6 = reshape(%5) {"shape": ["2*T", 8, 1]} : bf16[2*T,8,1]
  %7 = matmul(%4, %6) : bf16[2*T,6,1]
  %8 = reshape(%7) {"shape": ["2*T", 6]} : bf16[2*T,6]
  return %8
}"""
MIXTRAL_AFTER = """graph {
  %input_ids = input : i64[T]
  @embed = param : bf16[16,8]
  %0 = embedding(@embed, %input_ids) : bf16[T,8]
  %1 = repeat_interleave(%0) {"repeats": 2, "dim": 0} : bf16[2*T,8]
  @experts.gate_up = param : bf16[4,6,8]
  @router = param : bf16[4,8]
  %2 = linear(%0, @router) : bf16[T,4]
  %3 = topk(%2) {"k": 2, "dim": 1, "largest": true, "sorted": true, "output": 1} : i64[T,2]
  %4 = reshape(%3) {"shape": [-1]} : i64[2*T]
  %5 = expert_linear(%1, @experts.gate_up, %4) : bf16[2*T,6]
  return %5
}"""

GPT_OSS_BEFORE = """graph {
  %input_ids = input : i64[T]
  @embed = param : bf16[16,8]
  %0 = embedding(@embed, %input_ids) : bf16[T,8]
  %1 = repeat_interleave(%0) {"repeats": 2, "dim": 0} : bf16[2*T,8]
  %2 = reshape(%1) {"shape": ["2*T", 1, 8]} : bf16[2*T,1,8]
  @router = param : bf16[4,8]
  %3 = linear(%0, @router) : bf16[T,4]
  %4 = topk(%3) {"k": 2, "dim": 1, "largest": true, "sorted": true, "output": 1} : i64[T,2]
  %5 = reshape(%4) {"shape": [-1]} : i64[2*T]
  @experts.gate_up = param : bf16[4,8,6]
  %6 = index(@experts.gate_up, %5) {"axes": [0]} : bf16[2*T,8,6]
  %7 = matmul(%2, %6) : bf16[2*T,1,6]
  %8 = reshape(%7) {"shape": ["2*T", 6]} : bf16[2*T,6]
  @experts.gate_up_bias = param : bf16[4,6]
  %9 = index(@experts.gate_up_bias, %5) {"axes": [0]} : bf16[2*T,6]
  %10 = add(%8, %9) : bf16[2*T,6]
  return %10
}"""
GPT_OSS_AFTER = """graph {
  %input_ids = input : i64[T]
  @embed = param : bf16[16,8]
  %0 = embedding(@embed, %input_ids) : bf16[T,8]
  %1 = repeat_interleave(%0) {"repeats": 2, "dim": 0} : bf16[2*T,8]
  @experts.gate_up = param : bf16[4,8,6]
  %2 = permute(@experts.gate_up) {"dims": [0, 2, 1]} : bf16[4,6,8]
  @router = param : bf16[4,8]
  %3 = linear(%0, @router) : bf16[T,4]
  %4 = topk(%3) {"k": 2, "dim": 1, "largest": true, "sorted": true, "output": 1} : i64[T,2]
  %5 = reshape(%4) {"shape": [-1]} : i64[2*T]
  %6 = expert_linear(%1, %2, %5) : bf16[2*T,6]
  @experts.gate_up_bias = param : bf16[4,6]
  %7 = index(@experts.gate_up_bias, %5) {"axes": [0]} : bf16[2*T,6]
  %8 = add(%6, %7) : bf16[2*T,6]
  return %8
}"""

REWRITTEN = {
    "mixtral_weight_times_column": (MIXTRAL_BEFORE, MIXTRAL_AFTER),
    "gpt_oss_row_times_transposed_weight_with_bias": (GPT_OSS_BEFORE, GPT_OSS_AFTER),
}


@pytest.mark.parametrize("case", sorted(REWRITTEN))
def test_rewrites_bit_exact(case):
    before, after = REWRITTEN[case]
    graph, result = rewrite("expert-linear", before, after)
    assert_equivalent("expert-linear", graph, result, tol=0.0)


UNCHANGED = {
    "weights_from_activations": """graph {
  %input_ids = input : i64[T]
  @embed = param : f32[16,8]
  %0 = embedding(@embed, %input_ids) : f32[T,8]
  %1 = reshape(%0) {"shape": ["T", 2, 4]} : f32[T,2,4]
  %2 = index(%1, %input_ids) {"axes": [0]} : f32[T,2,4]
  %3 = reshape(%0) {"shape": ["T", 4, 2]} : f32[T,4,2]
  %4 = matmul(%2, %3) : f32[T,2,2]
  %5 = reshape(%4) {"shape": ["T", 4]} : f32[T,4]
  return %5
}""",
    "matrix_not_vector_per_row": """graph {
  %input_ids = input : i64[T]
  @embed = param : f32[16,8]
  %0 = embedding(@embed, %input_ids) : f32[T,8]
  @w = param : f32[16,6,4]
  %1 = index(@w, %input_ids) {"axes": [0]} : f32[T,6,4]
  %2 = reshape(%0) {"shape": ["T", 4, 2]} : f32[T,4,2]
  %3 = matmul(%1, %2) : f32[T,6,2]
  %4 = reshape(%3) {"shape": ["T", 12]} : f32[T,12]
  return %4
}""",
    "gathered_on_another_axis": """graph {
  %input_ids = input : i64[T]
  @embed = param : f32[16,8]
  %0 = embedding(@embed, %input_ids) : f32[T,8]
  @w = param : f32[6,16,8]
  %1 = index(@w, %input_ids) {"axes": [1]} : f32[6,T,8]
  %2 = permute(%1) {"dims": [1, 0, 2]} : f32[T,6,8]
  %3 = reshape(%0) {"shape": ["T", 8, 1]} : f32[T,8,1]
  %4 = matmul(%2, %3) : f32[T,6,1]
  %5 = reshape(%4) {"shape": ["T", 6]} : f32[T,6]
  return %5
}""",
}


@pytest.mark.parametrize("case", sorted(UNCHANGED))
def test_pattern_does_not_match(case):
    graph, result = rewrite("expert-linear", UNCHANGED[case], UNCHANGED[case])
    assert result is graph


def test_pass_is_registered_under_its_name():
    assert isinstance(get_pass("expert-linear"), ExpertLinear)
