"""gated-activation: act(gate) * up on the halves of the merged gate/up GEMM becomes one op."""

from __future__ import annotations

import pytest
from pass_harness import assert_equivalent, rewrite

from kiln.passes import get_pass
from kiln.passes.gated_activation import GatedActivation

MERGED_SILU_BEFORE = """graph {
  %input_ids = input : i64[T]
  @embed = param : f32[16,8]
  %0 = embedding(@embed, %input_ids) : f32[T,8]
  @gate_up = param : f32[24,8]
  %1 = linear(%0, @gate_up) : f32[T,24]
  %2 = slice(%1) {"dim": 1, "start": 0, "end": 12, "step": 1} : f32[T,12]
  %3 = silu(%2) : f32[T,12]
  %4 = slice(%1) {"dim": 1, "start": 12, "end": 24, "step": 1} : f32[T,12]
  %5 = mul(%3, %4) : f32[T,12]
  @down = param : f32[8,12]
  %6 = linear(%5, @down) : f32[T,8]
  return %6
}"""
MERGED_SILU_AFTER = """graph {
  %input_ids = input : i64[T]
  @embed = param : f32[16,8]
  %0 = embedding(@embed, %input_ids) : f32[T,8]
  @gate_up = param : f32[24,8]
  %1 = linear(%0, @gate_up) : f32[T,24]
  %2 = silu_and_mul(%1) : f32[T,12]
  @down = param : f32[8,12]
  %3 = linear(%2, @down) : f32[T,8]
  return %3
}"""

PHI3_CHUNK_BEFORE = """graph {
  %input_ids = input : i64[T]
  @embed = param : bf16[16,8]
  %0 = embedding(@embed, %input_ids) : bf16[T,8]
  @gate_up = param : bf16[24,8]
  %1 = linear(%0, @gate_up) : bf16[T,24]
  %2 = slice(%1) {"dim": 1, "start": 12, "end": 24, "step": 1} : bf16[T,12]
  %3 = slice(%1) {"dim": 1, "start": 0, "end": 12, "step": 1} : bf16[T,12]
  %4 = silu(%3) : bf16[T,12]
  %5 = mul(%2, %4) : bf16[T,12]
  return %5
}"""
PHI3_CHUNK_AFTER = """graph {
  %input_ids = input : i64[T]
  @embed = param : bf16[16,8]
  %0 = embedding(@embed, %input_ids) : bf16[T,8]
  @gate_up = param : bf16[24,8]
  %1 = linear(%0, @gate_up) : bf16[T,24]
  %2 = silu_and_mul(%1) : bf16[T,12]
  return %2
}"""

GELU_TANH_BEFORE = """graph {
  %input_ids = input : i64[T]
  @embed = param : bf16[16,8]
  %0 = embedding(@embed, %input_ids) : bf16[T,8]
  @gate_up = param : bf16[24,8]
  %1 = linear(%0, @gate_up) : bf16[T,24]
  %2 = slice(%1) {"dim": 1, "start": 0, "end": 12, "step": 1} : bf16[T,12]
  %3 = gelu(%2) {"approximate": "tanh"} : bf16[T,12]
  %4 = slice(%1) {"dim": 1, "start": 12, "end": 24, "step": 1} : bf16[T,12]
  %5 = mul(%3, %4) : bf16[T,12]
  return %5
}"""
GELU_TANH_AFTER = """graph {
  %input_ids = input : i64[T]
  @embed = param : bf16[16,8]
  %0 = embedding(@embed, %input_ids) : bf16[T,8]
  @gate_up = param : bf16[24,8]
  %1 = linear(%0, @gate_up) : bf16[T,24]
  %2 = gelu_and_mul(%1) {"approximate": "tanh"} : bf16[T,12]
  return %2
}"""

GELU_EXACT_RANK3_BEFORE = """graph {
  %input_ids = input : i64[T]
  @embed = param : f32[16,8]
  %0 = embedding(@embed, %input_ids) : f32[T,8]
  %1 = reshape(%0) {"shape": ["T", 2, 4]} : f32[T,2,4]
  %2 = slice(%1) {"dim": -1, "start": 0, "end": 2, "step": 1} : f32[T,2,2]
  %3 = gelu(%2) {"approximate": "none"} : f32[T,2,2]
  %4 = slice(%1) {"dim": 2, "start": 2, "end": 4, "step": 1} : f32[T,2,2]
  %5 = mul(%3, %4) : f32[T,2,2]
  return %5
}"""
GELU_EXACT_RANK3_AFTER = """graph {
  %input_ids = input : i64[T]
  @embed = param : f32[16,8]
  %0 = embedding(@embed, %input_ids) : f32[T,8]
  %1 = reshape(%0) {"shape": ["T", 2, 4]} : f32[T,2,4]
  %2 = gelu_and_mul(%1) {"approximate": "none"} : f32[T,2,2]
  return %2
}"""

MERGED_WITH_OTHER_PROJECTIONS_BEFORE = """graph {
  %input_ids = input : i64[T]
  @embed = param : f32[16,8]
  %0 = embedding(@embed, %input_ids) : f32[T,8]
  @qkv_gate_up = param : f32[20,8]
  %1 = linear(%0, @qkv_gate_up) : f32[T,20]
  %2 = slice(%1) {"dim": 1, "start": 0, "end": 8, "step": 1} : f32[T,8]
  %3 = slice(%1) {"dim": 1, "start": 8, "end": 14, "step": 1} : f32[T,6]
  %4 = silu(%3) : f32[T,6]
  %5 = slice(%1) {"dim": 1, "start": 14, "end": 20, "step": 1} : f32[T,6]
  %6 = mul(%4, %5) : f32[T,6]
  return %2, %6
}"""
MERGED_WITH_OTHER_PROJECTIONS_AFTER = """graph {
  %input_ids = input : i64[T]
  @embed = param : f32[16,8]
  %0 = embedding(@embed, %input_ids) : f32[T,8]
  @qkv_gate_up = param : f32[20,8]
  %1 = linear(%0, @qkv_gate_up) : f32[T,20]
  %2 = slice(%1) {"dim": 1, "start": 0, "end": 8, "step": 1} : f32[T,8]
  %3 = slice(%1) {"dim": 1, "start": 8, "end": 20, "step": 1} : f32[T,12]
  %4 = silu_and_mul(%3) : f32[T,6]
  return %2, %4
}"""

REWRITTEN = {
    "merged_gate_up_silu": (MERGED_SILU_BEFORE, MERGED_SILU_AFTER),
    "phi3_chunk_up_times_silu_gate": (PHI3_CHUNK_BEFORE, PHI3_CHUNK_AFTER),
    "gelu_tanh_bf16": (GELU_TANH_BEFORE, GELU_TANH_AFTER),
    "gelu_exact_rank3_negative_dim": (GELU_EXACT_RANK3_BEFORE, GELU_EXACT_RANK3_AFTER),
    "gate_up_merged_with_other_projections": (MERGED_WITH_OTHER_PROJECTIONS_BEFORE, MERGED_WITH_OTHER_PROJECTIONS_AFTER),
}


@pytest.mark.parametrize("case", sorted(REWRITTEN))
def test_rewrites_bit_exact(case):
    before, after = REWRITTEN[case]
    graph, result = rewrite("gated-activation", before, after)
    assert_equivalent("gated-activation", graph, result, tol=0.0)


UNCHANGED = {
    "up_half_first": """graph {
  %input_ids = input : i64[T]
  @embed = param : f32[16,8]
  %0 = embedding(@embed, %input_ids) : f32[T,8]
  %1 = slice(%0) {"dim": 1, "start": 4, "end": 8, "step": 1} : f32[T,4]
  %2 = silu(%1) : f32[T,4]
  %3 = slice(%0) {"dim": 1, "start": 0, "end": 4, "step": 1} : f32[T,4]
  %4 = mul(%2, %3) : f32[T,4]
  return %4
}""",
    "interleaved_halves": """graph {
  %input_ids = input : i64[T]
  @embed = param : f32[16,8]
  %0 = embedding(@embed, %input_ids) : f32[T,8]
  %1 = slice(%0) {"dim": 1, "start": 0, "end": 8, "step": 2} : f32[T,4]
  %2 = silu(%1) : f32[T,4]
  %3 = slice(%0) {"dim": 1, "start": 1, "end": 8, "step": 2} : f32[T,4]
  %4 = mul(%2, %3) : f32[T,4]
  return %4
}""",
    "halves_of_two_values": """graph {
  %input_ids = input : i64[T]
  @embed = param : f32[16,8]
  %0 = embedding(@embed, %input_ids) : f32[T,8]
  %1 = exp(%0) : f32[T,8]
  %2 = slice(%0) {"dim": 1, "start": 0, "end": 4, "step": 1} : f32[T,4]
  %3 = silu(%2) : f32[T,4]
  %4 = slice(%1) {"dim": 1, "start": 4, "end": 8, "step": 1} : f32[T,4]
  %5 = mul(%3, %4) : f32[T,4]
  return %5
}""",
    "relu_is_not_a_kernel_set_gate": """graph {
  %input_ids = input : i64[T]
  @embed = param : f32[16,8]
  %0 = embedding(@embed, %input_ids) : f32[T,8]
  %1 = slice(%0) {"dim": 1, "start": 0, "end": 4, "step": 1} : f32[T,4]
  %2 = relu(%1) : f32[T,4]
  %3 = slice(%0) {"dim": 1, "start": 4, "end": 8, "step": 1} : f32[T,4]
  %4 = mul(%2, %3) : f32[T,4]
  return %4
}""",
}


@pytest.mark.parametrize("case", sorted(UNCHANGED))
def test_pattern_does_not_match(case):
    graph, result = rewrite("gated-activation", UNCHANGED[case], UNCHANGED[case])
    assert result is graph


def test_pass_is_registered_under_its_name():
    assert isinstance(get_pass("gated-activation"), GatedActivation)
