"""rms-norm: the hand-written RMSNorm variants become one rms_norm op, bit for bit."""

from __future__ import annotations

import pytest
from pass_harness import assert_equivalent, rewrite

from kiln.passes import get_pass
from kiln.passes.rms_norm import RmsNorm

LLAMA_BF16_BEFORE = """graph {
  %input_ids = input : i64[T]
  @embed = param : bf16[16,8]
  %0 = embedding(@embed, %input_ids) : bf16[T,8]
  @norm = param : bf16[8]
  %1 = cast(%0) {"dtype": "float32"} : f32[T,8]
  %2 = pow(%1, 2) : f32[T,8]
  %3 = mean(%2) {"dims": [1], "keepdim": true} : f32[T,1]
  %4 = add(%3, 1e-06) : f32[T,1]
  %5 = rsqrt(%4) : f32[T,1]
  %6 = mul(%1, %5) : f32[T,8]
  %7 = cast(%6) {"dtype": "bfloat16"} : bf16[T,8]
  %8 = mul(@norm, %7) : bf16[T,8]
  return %8
}"""
LLAMA_BF16_AFTER = """graph {
  %input_ids = input : i64[T]
  @embed = param : bf16[16,8]
  %0 = embedding(@embed, %input_ids) : bf16[T,8]
  @norm = param : bf16[8]
  %1 = rms_norm(%0, @norm) {"normalized_shape": [8], "eps": 1e-06, "offset": 0.0, "weight_fp32": false} : bf16[T,8]
  return %1
}"""

GEMMA_BF16_BEFORE = """graph {
  %input_ids = input : i64[T]
  @embed = param : bf16[16,8]
  %0 = embedding(@embed, %input_ids) : bf16[T,8]
  %1 = cast(%0) {"dtype": "float32"} : f32[T,8]
  %2 = pow(%1, 2) : f32[T,8]
  %3 = mean(%2) {"dims": [1], "keepdim": true} : f32[T,1]
  %4 = add(%3, 1e-06) : f32[T,1]
  %5 = rsqrt(%4) : f32[T,1]
  %6 = mul(%1, %5) : f32[T,8]
  @norm = param : bf16[8]
  %7 = cast(@norm) {"dtype": "float32"} : f32[8]
  %8 = add(%7, 1.0) : f32[8]
  %9 = mul(%6, %8) : f32[T,8]
  %10 = cast(%9) {"dtype": "bfloat16"} : bf16[T,8]
  return %10
}"""
GEMMA_BF16_AFTER = """graph {
  %input_ids = input : i64[T]
  @embed = param : bf16[16,8]
  %0 = embedding(@embed, %input_ids) : bf16[T,8]
  @norm = param : bf16[8]
  %1 = rms_norm(%0, @norm) {"normalized_shape": [8], "eps": 1e-06, "offset": 1.0, "weight_fp32": true} : bf16[T,8]
  return %1
}"""

OLMO2_BF16_BEFORE = """graph {
  %input_ids = input : i64[T]
  @embed = param : bf16[16,8]
  %0 = embedding(@embed, %input_ids) : bf16[T,8]
  @norm = param : bf16[8]
  %1 = cast(%0) {"dtype": "float32"} : f32[T,8]
  %2 = pow(%1, 2) : f32[T,8]
  %3 = mean(%2) {"dims": [1], "keepdim": true} : f32[T,1]
  %4 = add(%3, 1e-05) : f32[T,1]
  %5 = rsqrt(%4) : f32[T,1]
  %6 = mul(%1, %5) : f32[T,8]
  %7 = mul(@norm, %6) : f32[T,8]
  %8 = cast(%7) {"dtype": "bfloat16"} : bf16[T,8]
  return %8
}"""
OLMO2_BF16_AFTER = """graph {
  %input_ids = input : i64[T]
  @embed = param : bf16[16,8]
  %0 = embedding(@embed, %input_ids) : bf16[T,8]
  @norm = param : bf16[8]
  %1 = rms_norm(%0, @norm) {"normalized_shape": [8], "eps": 1e-05, "offset": 0.0, "weight_fp32": true} : bf16[T,8]
  return %1
}"""

LLAMA_F32_BEFORE = """graph {
  %input_ids = input : i64[T]
  @embed = param : f32[16,8]
  %0 = embedding(@embed, %input_ids) : f32[T,8]
  @norm = param : f32[8]
  %1 = pow(%0, 2) : f32[T,8]
  %2 = mean(%1) {"dims": [1], "keepdim": true} : f32[T,1]
  %3 = add(%2, 1e-06) : f32[T,1]
  %4 = rsqrt(%3) : f32[T,1]
  %5 = mul(%0, %4) : f32[T,8]
  %6 = mul(@norm, %5) : f32[T,8]
  return %6
}"""
LLAMA_F32_AFTER = """graph {
  %input_ids = input : i64[T]
  @embed = param : f32[16,8]
  %0 = embedding(@embed, %input_ids) : f32[T,8]
  @norm = param : f32[8]
  %1 = rms_norm(%0, @norm) {"normalized_shape": [8], "eps": 1e-06, "offset": 0.0, "weight_fp32": false} : f32[T,8]
  return %1
}"""

GEMMA_F32_BEFORE = """graph {
  %input_ids = input : i64[T]
  @embed = param : f32[16,8]
  %0 = embedding(@embed, %input_ids) : f32[T,8]
  %1 = pow(%0, 2) : f32[T,8]
  %2 = mean(%1) {"dims": [1], "keepdim": true} : f32[T,1]
  %3 = add(%2, 1e-06) : f32[T,1]
  %4 = rsqrt(%3) : f32[T,1]
  %5 = mul(%0, %4) : f32[T,8]
  @norm = param : f32[8]
  %6 = add(@norm, 1.0) : f32[8]
  %7 = mul(%5, %6) : f32[T,8]
  return %7
}"""
GEMMA_F32_AFTER = """graph {
  %input_ids = input : i64[T]
  @embed = param : f32[16,8]
  %0 = embedding(@embed, %input_ids) : f32[T,8]
  @norm = param : f32[8]
  %1 = rms_norm(%0, @norm) {"normalized_shape": [8], "eps": 1e-06, "offset": 1.0, "weight_fp32": false} : f32[T,8]
  return %1
}"""

QK_NORM_BF16_BEFORE = """graph {
  %input_ids = input : i64[T]
  @embed = param : bf16[16,8]
  %0 = embedding(@embed, %input_ids) : bf16[T,8]
  %1 = reshape(%0) {"shape": ["T", -1, 4]} : bf16[T,2,4]
  @q_norm = param : bf16[4]
  %2 = cast(%1) {"dtype": "float32"} : f32[T,2,4]
  %3 = pow(%2, 2) : f32[T,2,4]
  %4 = mean(%3) {"dims": [2], "keepdim": true} : f32[T,2,1]
  %5 = add(%4, 1e-06) : f32[T,2,1]
  %6 = rsqrt(%5) : f32[T,2,1]
  %7 = mul(%2, %6) : f32[T,2,4]
  %8 = cast(%7) {"dtype": "bfloat16"} : bf16[T,2,4]
  %9 = mul(@q_norm, %8) : bf16[T,2,4]
  return %9
}"""
QK_NORM_BF16_AFTER = """graph {
  %input_ids = input : i64[T]
  @embed = param : bf16[16,8]
  %0 = embedding(@embed, %input_ids) : bf16[T,8]
  %1 = reshape(%0) {"shape": ["T", -1, 4]} : bf16[T,2,4]
  @q_norm = param : bf16[4]
  %2 = rms_norm(%1, @q_norm) {"normalized_shape": [4], "eps": 1e-06, "offset": 0.0, "weight_fp32": false} : bf16[T,2,4]
  return %2
}"""

GEMMA3_QK_NORM_F32_BEFORE = """graph {
  %input_ids = input : i64[T]
  @embed = param : f32[16,8]
  %0 = embedding(@embed, %input_ids) : f32[T,8]
  %1 = reshape(%0) {"shape": ["T", -1, 4]} : f32[T,2,4]
  %2 = permute(%1) {"dims": [1, 0, 2]} : f32[2,T,4]
  %3 = pow(%2, 2) : f32[2,T,4]
  %4 = mean(%3) {"dims": [2], "keepdim": true} : f32[2,T,1]
  %5 = add(%4, 1e-06) : f32[2,T,1]
  %6 = rsqrt(%5) : f32[2,T,1]
  %7 = mul(%2, %6) : f32[2,T,4]
  @k_norm = param : f32[4]
  %8 = add(@k_norm, 1.0) : f32[4]
  %9 = mul(%7, %8) : f32[2,T,4]
  return %9
}"""
GEMMA3_QK_NORM_F32_AFTER = """graph {
  %input_ids = input : i64[T]
  @embed = param : f32[16,8]
  %0 = embedding(@embed, %input_ids) : f32[T,8]
  %1 = reshape(%0) {"shape": ["T", -1, 4]} : f32[T,2,4]
  %2 = permute(%1) {"dims": [1, 0, 2]} : f32[2,T,4]
  @k_norm = param : f32[4]
  %3 = rms_norm(%2, @k_norm) {"normalized_shape": [4], "eps": 1e-06, "offset": 1.0, "weight_fp32": false} : f32[2,T,4]
  return %3
}"""

NO_WEIGHT_BF16_BEFORE = """graph {
  %input_ids = input : i64[T]
  @embed = param : bf16[16,8]
  %0 = embedding(@embed, %input_ids) : bf16[T,8]
  %1 = cast(%0) {"dtype": "float32"} : f32[T,8]
  %2 = pow(%1, 2) : f32[T,8]
  %3 = mean(%2) {"dims": [1], "keepdim": true} : f32[T,1]
  %4 = add(1e-06, %3) : f32[T,1]
  %5 = rsqrt(%4) : f32[T,1]
  %6 = mul(%5, %1) : f32[T,8]
  %7 = cast(%6) {"dtype": "bfloat16"} : bf16[T,8]
  %8 = exp(%7) : bf16[T,8]
  return %8
}"""
NO_WEIGHT_BF16_AFTER = """graph {
  %input_ids = input : i64[T]
  @embed = param : bf16[16,8]
  %0 = embedding(@embed, %input_ids) : bf16[T,8]
  %1 = rms_norm(%0) {"normalized_shape": [8], "eps": 1e-06, "offset": 0.0, "weight_fp32": false} : bf16[T,8]
  %2 = exp(%1) : bf16[T,8]
  return %2
}"""

WEIGHT_FROM_ACTIVATIONS_BEFORE = """graph {
  %input_ids = input : i64[T]
  @embed = param : f32[16,8]
  %0 = embedding(@embed, %input_ids) : f32[T,8]
  %1 = pow(%0, 2) : f32[T,8]
  %2 = mean(%1) {"dims": [1], "keepdim": true} : f32[T,1]
  %3 = add(%2, 1e-06) : f32[T,1]
  %4 = rsqrt(%3) : f32[T,1]
  %5 = mul(%0, %4) : f32[T,8]
  %6 = mul(%5, %0) : f32[T,8]
  return %6
}"""
WEIGHT_FROM_ACTIVATIONS_AFTER = """graph {
  %input_ids = input : i64[T]
  @embed = param : f32[16,8]
  %0 = embedding(@embed, %input_ids) : f32[T,8]
  %1 = rms_norm(%0) {"normalized_shape": [8], "eps": 1e-06, "offset": 0.0, "weight_fp32": false} : f32[T,8]
  %2 = mul(%1, %0) : f32[T,8]
  return %2
}"""

REWRITTEN = {
    "llama_bf16_cast_then_weight": (LLAMA_BF16_BEFORE, LLAMA_BF16_AFTER),
    "gemma_bf16_one_plus_weight_in_fp32": (GEMMA_BF16_BEFORE, GEMMA_BF16_AFTER),
    "olmo2_bf16_weight_in_fp32": (OLMO2_BF16_BEFORE, OLMO2_BF16_AFTER),
    "llama_f32": (LLAMA_F32_BEFORE, LLAMA_F32_AFTER),
    "gemma_f32": (GEMMA_F32_BEFORE, GEMMA_F32_AFTER),
    "per_head_qk_norm_bf16": (QK_NORM_BF16_BEFORE, QK_NORM_BF16_AFTER),
    "gemma3_per_head_qk_norm_f32": (GEMMA3_QK_NORM_F32_BEFORE, GEMMA3_QK_NORM_F32_AFTER),
    "no_weight_bf16": (NO_WEIGHT_BF16_BEFORE, NO_WEIGHT_BF16_AFTER),
    "weight_from_activations_stays_a_mul": (WEIGHT_FROM_ACTIVATIONS_BEFORE, WEIGHT_FROM_ACTIVATIONS_AFTER),
}


@pytest.mark.parametrize("case", sorted(REWRITTEN))
def test_rewrites_bit_exact(case):
    before, after = REWRITTEN[case]
    graph, result = rewrite("rms-norm", before, after)
    assert_equivalent("rms-norm", graph, result, tol=0.0)


UNCHANGED = {
    "mean_over_another_axis": """graph {
  %input_ids = input : i64[T]
  @embed = param : f32[16,8]
  %0 = embedding(@embed, %input_ids) : f32[T,8]
  %1 = reshape(%0) {"shape": ["T", -1, 4]} : f32[T,2,4]
  %2 = pow(%1, 2) : f32[T,2,4]
  %3 = mean(%2) {"dims": [1], "keepdim": true} : f32[T,1,4]
  %4 = add(%3, 1e-06) : f32[T,1,4]
  %5 = rsqrt(%4) : f32[T,1,4]
  %6 = mul(%1, %5) : f32[T,2,4]
  return %6
}""",
    "cube_instead_of_square": """graph {
  %input_ids = input : i64[T]
  @embed = param : f32[16,8]
  %0 = embedding(@embed, %input_ids) : f32[T,8]
  %1 = pow(%0, 3) : f32[T,8]
  %2 = mean(%1) {"dims": [1], "keepdim": true} : f32[T,1]
  %3 = add(%2, 1e-06) : f32[T,1]
  %4 = rsqrt(%3) : f32[T,1]
  %5 = mul(%0, %4) : f32[T,8]
  return %5
}""",
    "offset_added_in_bfloat16": """graph {
  %input_ids = input : i64[T]
  @embed = param : bf16[16,8]
  %0 = embedding(@embed, %input_ids) : bf16[T,8]
  %1 = cast(%0) {"dtype": "float32"} : f32[T,8]
  %2 = pow(%1, 2) : f32[T,8]
  %3 = mean(%2) {"dims": [1], "keepdim": true} : f32[T,1]
  %4 = add(%3, 1e-06) : f32[T,1]
  %5 = rsqrt(%4) : f32[T,1]
  %6 = mul(%1, %5) : f32[T,8]
  @norm = param : bf16[8]
  %7 = add(@norm, 1.0) : bf16[8]
  %8 = mul(%6, %7) : f32[T,8]
  %9 = cast(%8) {"dtype": "bfloat16"} : bf16[T,8]
  return %9
}""",
    "bfloat16_input_float32_result": """graph {
  %input_ids = input : i64[T]
  @embed = param : bf16[16,8]
  %0 = embedding(@embed, %input_ids) : bf16[T,8]
  %1 = cast(%0) {"dtype": "float32"} : f32[T,8]
  %2 = pow(%1, 2) : f32[T,8]
  %3 = mean(%2) {"dims": [1], "keepdim": true} : f32[T,1]
  %4 = add(%3, 1e-06) : f32[T,1]
  %5 = rsqrt(%4) : f32[T,1]
  %6 = mul(%1, %5) : f32[T,8]
  return %6
}""",
    "centred_is_a_layer_norm": """graph {
  %input_ids = input : i64[T]
  @embed = param : f32[16,8]
  %0 = embedding(@embed, %input_ids) : f32[T,8]
  %1 = mean(%0) {"dims": [1], "keepdim": true} : f32[T,1]
  %2 = sub(%0, %1) : f32[T,8]
  %3 = pow(%2, 2) : f32[T,8]
  %4 = mean(%3) {"dims": [1], "keepdim": true} : f32[T,1]
  %5 = add(%4, 1e-05) : f32[T,1]
  %6 = rsqrt(%5) : f32[T,1]
  %7 = mul(%2, %6) : f32[T,8]
  @ln = param : f32[8]
  %8 = mul(@ln, %7) : f32[T,8]
  return %8
}""",
}


@pytest.mark.parametrize("case", sorted(UNCHANGED))
def test_pattern_does_not_match(case):
    graph, result = rewrite("rms-norm", UNCHANGED[case], UNCHANGED[case])
    assert result is graph


def test_pass_is_registered_under_its_name():
    assert isinstance(get_pass("rms-norm"), RmsNorm)
