"""weight-layout: linear weights transposed for a target that reads [in, out]."""

from __future__ import annotations

from pass_harness import assert_equivalent, rewrite

from kiln.passes.weight_layout import WeightLayout

BEFORE = """graph {
  %input_ids = input : i64[T]
  @embed = param : f32[16,8]
  @w = param : f32[4,8]
  @b = param : f32[4]
  %0 = embedding(@embed, %input_ids) : f32[T,8]
  %1 = linear(%0, @w, @b) : f32[T,4]
  %2 = reshape(%1) {"shape": ["T", 2, 2]} : f32[T,2,2]
  %3 = permute(%2) {"dims": [1, 0, 2]} : f32[2,T,2]
  %4 = reshape(%3) {"shape": [2, -1]} : f32[2,2*T]
  %5 = permute(%4) {"dims": [1, 0]} : f32[2*T,2]
  %6 = linear(%0, @embed) : f32[T,16]
  return %6, %5
}"""

AFTER = """graph {
  %input_ids = input : i64[T]
  @embed = param : f32[16,8]
  %0 = embedding(@embed, %input_ids) : f32[T,8]
  %1 = permute(@embed) {"dims": [1, 0]} : f32[8,16]
  %2 = linear(%0, %1) {"weight_layout": "in_out"} : f32[T,16]
  @w = param : f32[4,8]
  %3 = permute(@w) {"dims": [1, 0]} : f32[8,4]
  @b = param : f32[4]
  %4 = linear(%0, %3, @b) {"weight_layout": "in_out"} : f32[T,4]
  %5 = reshape(%4) {"shape": ["T", 2, 2]} : f32[T,2,2]
  %6 = permute(%5) {"dims": [1, 0, 2]} : f32[2,T,2]
  %7 = reshape(%6) {"shape": [2, -1]} : f32[2,2*T]
  %8 = permute(%7) {"dims": [1, 0]} : f32[2*T,2]
  return %2, %8
}"""


def test_weights_transposed_for_in_out_kernels():
    before, after = rewrite(WeightLayout(), BEFORE, AFTER)
    assert_equivalent("weight-layout", before, after)


def test_back_to_out_in_and_idempotent():
    _, after = rewrite(WeightLayout(), BEFORE, AFTER)
    twice = WeightLayout().apply(after)
    assert sum(n.op == "permute" and n.inputs[0].op == "param" for n in twice.nodes) == 2
    back = WeightLayout(layout="out_in").apply(after)
    assert all("weight_layout" not in n.attrs for n in back.nodes if n.op == "linear")
    assert_equivalent("weight-layout", after, back)


def test_activation_weight_is_left_alone():
    text = """graph {
  %input_ids = input : i64[T]
  @embed = param : f32[16,8]
  %0 = embedding(@embed, %input_ids) : f32[T,8]
  %1 = reshape(%0) {"shape": [-1, 8]} : f32[T,8]
  %2 = linear(%0, %1) : f32[T,T]
  return %2
}"""
    rewrite(WeightLayout(), text, text)
