"""layer-norm: a hand-written LayerNorm (Cohere's, in float32) becomes one layer_norm op."""

from __future__ import annotations

import pytest
from pass_harness import assert_equivalent, rewrite

from kiln.passes import get_pass
from kiln.passes.layer_norm import LayerNorm

COHERE_BF16_BEFORE = """graph {
  %input_ids = input : i64[T]
  @embed = param : bf16[16,8]
  %0 = embedding(@embed, %input_ids) : bf16[T,8]
  @ln = param : bf16[8]
  %1 = cast(@ln) {"dtype": "float32"} : f32[8]
  %2 = cast(%0) {"dtype": "float32"} : f32[T,8]
  %3 = mean(%2) {"dims": [1], "keepdim": true} : f32[T,1]
  %4 = sub(%2, %3) : f32[T,8]
  %5 = pow(%4, 2) : f32[T,8]
  %6 = mean(%5) {"dims": [1], "keepdim": true} : f32[T,1]
  %7 = add(%6, 1e-05) : f32[T,1]
  %8 = rsqrt(%7) : f32[T,1]
  %9 = mul(%4, %8) : f32[T,8]
  %10 = mul(%1, %9) : f32[T,8]
  %11 = cast(%10) {"dtype": "bfloat16"} : bf16[T,8]
  return %11
}"""
COHERE_BF16_AFTER = """graph {
  %input_ids = input : i64[T]
  @embed = param : bf16[16,8]
  %0 = embedding(@embed, %input_ids) : bf16[T,8]
  @ln = param : bf16[8]
  %1 = layer_norm(%0, @ln) {"normalized_shape": [8], "eps": 1e-05, "has_weight": true, "has_bias": false} : bf16[T,8]
  return %1
}"""

WEIGHT_AND_BIAS_F32_BEFORE = """graph {
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
  @ln.weight = param : f32[8]
  %8 = mul(%7, @ln.weight) : f32[T,8]
  @ln.bias = param : f32[8]
  %9 = add(%8, @ln.bias) : f32[T,8]
  return %9
}"""
WEIGHT_AND_BIAS_F32_AFTER = """graph {
  %input_ids = input : i64[T]
  @embed = param : f32[16,8]
  %0 = embedding(@embed, %input_ids) : f32[T,8]
  @ln.weight = param : f32[8]
  @ln.bias = param : f32[8]
  %1 = layer_norm(%0, @ln.weight, @ln.bias) {"normalized_shape": [8], "eps": 1e-05, "has_weight": true, "has_bias": true} : f32[T,8]
  return %1
}"""

NO_WEIGHT_F32_BEFORE = """graph {
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
  %8 = tanh(%7) : f32[T,8]
  return %8
}"""
NO_WEIGHT_F32_AFTER = """graph {
  %input_ids = input : i64[T]
  @embed = param : f32[16,8]
  %0 = embedding(@embed, %input_ids) : f32[T,8]
  %1 = layer_norm(%0) {"normalized_shape": [8], "eps": 1e-05, "has_weight": false, "has_bias": false} : f32[T,8]
  %2 = tanh(%1) : f32[T,8]
  return %2
}"""

# layer_norm's kernel may sum in another order than the hand-written graph: float32 rounding,
# which in bfloat16 can move a result by one ulp (2 ** -8 relative).
REWRITTEN = {
    "cohere_bf16_weight_in_fp32": (COHERE_BF16_BEFORE, COHERE_BF16_AFTER, 1e-2),
    "weight_and_bias_f32": (WEIGHT_AND_BIAS_F32_BEFORE, WEIGHT_AND_BIAS_F32_AFTER, 1e-5),
    "no_weight_f32": (NO_WEIGHT_F32_BEFORE, NO_WEIGHT_F32_AFTER, 1e-5),
}


@pytest.mark.parametrize("case", sorted(REWRITTEN))
def test_rewrites(case):
    before, after, tol = REWRITTEN[case]
    graph, result = rewrite("layer-norm", before, after)
    assert_equivalent("layer-norm", graph, result, tol=tol)


UNCHANGED = {
    "mean_minus_x_is_not_centring": """graph {
  %input_ids = input : i64[T]
  @embed = param : f32[16,8]
  %0 = embedding(@embed, %input_ids) : f32[T,8]
  %1 = mean(%0) {"dims": [1], "keepdim": true} : f32[T,1]
  %2 = sub(%1, %0) : f32[T,8]
  %3 = pow(%2, 2) : f32[T,8]
  %4 = mean(%3) {"dims": [1], "keepdim": true} : f32[T,1]
  %5 = add(%4, 1e-05) : f32[T,1]
  %6 = rsqrt(%5) : f32[T,1]
  %7 = mul(%2, %6) : f32[T,8]
  return %7
}""",
    "bfloat16_input_float32_result": """graph {
  %input_ids = input : i64[T]
  @embed = param : bf16[16,8]
  %0 = embedding(@embed, %input_ids) : bf16[T,8]
  %1 = cast(%0) {"dtype": "float32"} : f32[T,8]
  %2 = mean(%1) {"dims": [1], "keepdim": true} : f32[T,1]
  %3 = sub(%1, %2) : f32[T,8]
  %4 = pow(%3, 2) : f32[T,8]
  %5 = mean(%4) {"dims": [1], "keepdim": true} : f32[T,1]
  %6 = add(%5, 1e-05) : f32[T,1]
  %7 = rsqrt(%6) : f32[T,1]
  %8 = mul(%3, %7) : f32[T,8]
  return %8
}""",
    "rms_norm_is_rms_norms": """graph {
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
}""",
}


@pytest.mark.parametrize("case", sorted(UNCHANGED))
def test_pattern_does_not_match(case):
    graph, result = rewrite("layer-norm", UNCHANGED[case], UNCHANGED[case])
    assert result is graph


def test_pass_is_registered_under_its_name():
    assert isinstance(get_pass("layer-norm"), LayerNorm)
