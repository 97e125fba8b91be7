"""merge-projections: sibling linears of one activation become one GEMM and slices."""

from __future__ import annotations

import pytest
from pass_harness import assert_equivalent, canonical, rewrite

from kiln.ir import parse_graph, print_graph
from kiln.passes.merge_projections import MergeProjections

QKV_BEFORE = """graph {
  %input_ids = input : i64[T]
  @embed = param : f32[16,8]
  %0 = embedding(@embed, %input_ids) : f32[T,8]
  @q = param : f32[8,8]
  %1 = linear(%0, @q) : f32[T,8]
  @k = param : f32[4,8]
  %2 = linear(%0, @k) : f32[T,4]
  @v = param : f32[4,8]
  %3 = linear(%0, @v) : f32[T,4]
  return %1, %2, %3
}"""
QKV_AFTER = """graph {
  %input_ids = input : i64[T]
  @embed = param : f32[16,8]
  %0 = embedding(@embed, %input_ids) : f32[T,8]
  @q = param : f32[8,8]
  @k = param : f32[4,8]
  @v = param : f32[4,8]
  %1 = cat(@q, @k, @v) {"dim": 0} : f32[16,8]
  %2 = linear(%0, %1) : f32[T,16]
  %3 = slice(%2) {"dim": 1, "start": 0, "end": 8, "step": 1} : f32[T,8]
  %4 = slice(%2) {"dim": 1, "start": 8, "end": 12, "step": 1} : f32[T,4]
  %5 = slice(%2) {"dim": 1, "start": 12, "end": 16, "step": 1} : f32[T,4]
  return %3, %4, %5
}"""

QKV_BIAS_ATTENTION_BEFORE = """graph {
  %input_ids = input : i64[T]
  %cu_seqlens = input : i32[S+1]
  @embed = param : f32[16,8]
  %0 = embedding(@embed, %input_ids) : f32[T,8]
  @q.weight = param : f32[8,8]
  @q.bias = param : f32[8]
  %1 = linear(%0, @q.weight, @q.bias) : f32[T,8]
  %2 = reshape(%1) {"shape": ["T", 4, 2]} : f32[T,4,2]
  @k.weight = param : f32[4,8]
  @k.bias = param : f32[4]
  %3 = linear(%0, @k.weight, @k.bias) : f32[T,4]
  %4 = reshape(%3) {"shape": ["T", 2, 2]} : f32[T,2,2]
  @v.weight = param : f32[4,8]
  @v.bias = param : f32[4]
  %5 = linear(%0, @v.weight, @v.bias) : f32[T,4]
  %6 = reshape(%5) {"shape": ["T", 2, 2]} : f32[T,2,2]
  %7 = attention(%2, %4, %6, %cu_seqlens) {"scale": 0.7, "causal": true, "sliding_window": 0, "softcap": 0.0} : f32[T,4,2]
  %8 = reshape(%7) {"shape": ["T", 8]} : f32[T,8]
  return %8
}"""
QKV_BIAS_ATTENTION_AFTER = """graph {
  %input_ids = input : i64[T]
  %cu_seqlens = input : i32[S+1]
  @embed = param : f32[16,8]
  %0 = embedding(@embed, %input_ids) : f32[T,8]
  @q.weight = param : f32[8,8]
  @k.weight = param : f32[4,8]
  @v.weight = param : f32[4,8]
  %1 = cat(@q.weight, @k.weight, @v.weight) {"dim": 0} : f32[16,8]
  @q.bias = param : f32[8]
  @k.bias = param : f32[4]
  @v.bias = param : f32[4]
  %2 = cat(@q.bias, @k.bias, @v.bias) {"dim": 0} : f32[16]
  %3 = linear(%0, %1, %2) : f32[T,16]
  %4 = slice(%3) {"dim": 1, "start": 0, "end": 8, "step": 1} : f32[T,8]
  %5 = reshape(%4) {"shape": ["T", 4, 2]} : f32[T,4,2]
  %6 = slice(%3) {"dim": 1, "start": 8, "end": 12, "step": 1} : f32[T,4]
  %7 = reshape(%6) {"shape": ["T", 2, 2]} : f32[T,2,2]
  %8 = slice(%3) {"dim": 1, "start": 12, "end": 16, "step": 1} : f32[T,4]
  %9 = reshape(%8) {"shape": ["T", 2, 2]} : f32[T,2,2]
  %10 = attention(%5, %7, %9, %cu_seqlens) {"scale": 0.7, "causal": true, "sliding_window": 0, "softcap": 0.0} : f32[T,4,2]
  %11 = reshape(%10) {"shape": ["T", 8]} : f32[T,8]
  return %11
}"""

GATE_UP_BEFORE = """graph {
  %input_ids = input : i64[T]
  @embed = param : f32[16,8]
  %0 = embedding(@embed, %input_ids) : f32[T,8]
  @mlp.gate_proj.weight = param : f32[12,8]
  %1 = linear(%0, @mlp.gate_proj.weight) : f32[T,12]
  %2 = silu(%1) : f32[T,12]
  @mlp.up_proj.weight = param : f32[12,8]
  %3 = linear(%0, @mlp.up_proj.weight) : f32[T,12]
  %4 = mul(%2, %3) : f32[T,12]
  @mlp.down_proj.weight = param : f32[8,12]
  %5 = linear(%4, @mlp.down_proj.weight) : f32[T,8]
  return %5
}"""
GATE_UP_AFTER = """graph {
  %input_ids = input : i64[T]
  @embed = param : f32[16,8]
  %0 = embedding(@embed, %input_ids) : f32[T,8]
  @mlp.gate_proj.weight = param : f32[12,8]
  @mlp.up_proj.weight = param : f32[12,8]
  %1 = cat(@mlp.gate_proj.weight, @mlp.up_proj.weight) {"dim": 0} : f32[24,8]
  %2 = linear(%0, %1) : f32[T,24]
  %3 = slice(%2) {"dim": 1, "start": 0, "end": 12, "step": 1} : f32[T,12]
  %4 = silu(%3) : f32[T,12]
  %5 = slice(%2) {"dim": 1, "start": 12, "end": 24, "step": 1} : f32[T,12]
  %6 = mul(%4, %5) : f32[T,12]
  @mlp.down_proj.weight = param : f32[8,12]
  %7 = linear(%6, @mlp.down_proj.weight) : f32[T,8]
  return %7
}"""

# The weight itself may be computed from params (a transpose, a dequantize): still mergeable.
COMPUTED_WEIGHT_BEFORE = """graph {
  %input_ids = input : i64[T]
  @embed = param : f32[16,8]
  %0 = embedding(@embed, %input_ids) : f32[T,8]
  @a = param : f32[8,6]
  %1 = permute(@a) {"dims": [1, 0]} : f32[6,8]
  %2 = linear(%0, %1) : f32[T,6]
  @b = param : f32[2,8]
  %3 = mul(@b, 0.5) : f32[2,8]
  %4 = linear(%0, %3) : f32[T,2]
  %5 = cat(%4, %2) {"dim": 1} : f32[T,8]
  return %5
}"""
COMPUTED_WEIGHT_AFTER = """graph {
  %input_ids = input : i64[T]
  @embed = param : f32[16,8]
  %0 = embedding(@embed, %input_ids) : f32[T,8]
  @a = param : f32[8,6]
  %1 = permute(@a) {"dims": [1, 0]} : f32[6,8]
  @b = param : f32[2,8]
  %2 = mul(@b, 0.5) : f32[2,8]
  %3 = cat(%1, %2) {"dim": 0} : f32[8,8]
  %4 = linear(%0, %3) : f32[T,8]
  %5 = slice(%4) {"dim": 1, "start": 6, "end": 8, "step": 1} : f32[T,2]
  %6 = slice(%4) {"dim": 1, "start": 0, "end": 6, "step": 1} : f32[T,6]
  %7 = cat(%5, %6) {"dim": 1} : f32[T,8]
  return %7
}"""

MERGED = {
    "qkv_without_bias": (QKV_BEFORE, QKV_AFTER),
    "qkv_with_bias_into_attention": (QKV_BIAS_ATTENTION_BEFORE, QKV_BIAS_ATTENTION_AFTER),
    "gate_up": (GATE_UP_BEFORE, GATE_UP_AFTER),
    "weights_computed_from_params": (COMPUTED_WEIGHT_BEFORE, COMPUTED_WEIGHT_AFTER),
}


@pytest.mark.parametrize("case", sorted(MERGED))
def test_merges(case):
    before, after = MERGED[case]
    graph, result = rewrite("merge-projections", before, after)
    assert_equivalent("merge-projections", graph, result)


UNCHANGED = {
    "different_inputs": """graph {
  %input_ids = input : i64[T]
  @embed = param : f32[16,8]
  %0 = embedding(@embed, %input_ids) : f32[T,8]
  %1 = neg(%0) : f32[T,8]
  @a = param : f32[4,8]
  %2 = linear(%0, @a) : f32[T,4]
  @b = param : f32[4,8]
  %3 = linear(%1, @b) : f32[T,4]
  return %2, %3
}""",
    "mixed_bias": """graph {
  %input_ids = input : i64[T]
  @embed = param : f32[16,8]
  %0 = embedding(@embed, %input_ids) : f32[T,8]
  @a = param : f32[4,8]
  @a.bias = param : f32[4]
  %1 = linear(%0, @a, @a.bias) : f32[T,4]
  @b = param : f32[4,8]
  %2 = linear(%0, @b) : f32[T,4]
  return %1, %2
}""",
    "mixed_weight_dtype": """graph {
  %input_ids = input : i64[T]
  @embed = param : f32[16,8]
  %0 = embedding(@embed, %input_ids) : f32[T,8]
  @a = param : f32[4,8]
  %1 = linear(%0, @a) : f32[T,4]
  @b = param : f64[4,8]
  %2 = linear(%0, @b) : f32[T,4]
  return %1, %2
}""",
    "single_projection": """graph {
  %input_ids = input : i64[T]
  @embed = param : f32[16,8]
  %0 = embedding(@embed, %input_ids) : f32[T,8]
  @a = param : f32[4,8]
  %1 = linear(%0, @a) : f32[T,4]
  return %1
}""",
    # the "weight" of a score-like linear depends on the activations: not foldable
    "activation_weight": """graph {
  %input_ids = input : i64[T]
  @embed = param : f32[16,8]
  %0 = embedding(@embed, %input_ids) : f32[T,8]
  %1 = linear(%0, %0) : f32[T,T]
  @a = param : f32[4,8]
  %2 = linear(%0, @a) : f32[T,4]
  return %2, %1
}""",
}


@pytest.mark.parametrize("case", sorted(UNCHANGED))
def test_not_mergeable_is_unchanged(case):
    rewrite("merge-projections", UNCHANGED[case], UNCHANGED[case])


def test_min_group_option():
    rewrite(MergeProjections(min_group=3), GATE_UP_BEFORE, GATE_UP_BEFORE)
    rewrite(MergeProjections(min_group=3), QKV_BEFORE, QKV_AFTER)


def test_symbolic_input_width_and_leading_axes():
    before = """graph {
  %x = input : f32[2,T,8]
  @a = param : f32[4,8]
  %0 = linear(%x, @a) : f32[2,T,4]
  @b = param : f32[4,8]
  %1 = linear(%x, @b) : f32[2,T,4]
  %2 = sub(%0, %1) : f32[2,T,4]
  return %2
}"""
    after = """graph {
  %x = input : f32[2,T,8]
  @a = param : f32[4,8]
  @b = param : f32[4,8]
  %0 = cat(@a, @b) {"dim": 0} : f32[8,8]
  %1 = linear(%x, %0) : f32[2,T,8]
  %2 = slice(%1) {"dim": 2, "start": 0, "end": 4, "step": 1} : f32[2,T,4]
  %3 = slice(%1) {"dim": 2, "start": 4, "end": 8, "step": 1} : f32[2,T,4]
  %4 = sub(%2, %3) : f32[2,T,4]
  return %4
}"""
    graph, result = rewrite("merge-projections", before, after)
    assert print_graph(graph) == canonical(before)  # input graph untouched
    assert print_graph(parse_graph(print_graph(result))) == print_graph(result)
