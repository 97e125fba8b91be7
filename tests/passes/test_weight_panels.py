"""weight-panels: linear weights stored as panels of output columns for the cpu kernels."""

from __future__ import annotations

import torch
from pass_harness import assert_equivalent, random_weights, rewrite, weight_fn

from kiln.codegen.fold_weights import fold_weights
from kiln.passes.weight_panels import WeightPanels

BEFORE = """graph {
  %input_ids = input : i64[T]
  @embed = param : f32[16,8]
  @o = param : f32[24,8]
  @q = param : f32[64,8]
  @k = param : f32[32,8]
  @b = param : f32[96]
  @odd = param : f32[12,8]
  %0 = embedding(@embed, %input_ids) : f32[T,8]
  %1 = linear(%0, @o) : f32[T,24]
  %2 = cat(@q, @k) {"dim": 0} : f32[96,8]
  %3 = linear(%0, %2, @b) : f32[T,96]
  %4 = linear(%0, @odd) : f32[T,12]
  %5 = linear(%0, @embed) : f32[T,16]
  return %1, %3, %4, %5
}"""

AFTER = """graph {
  %input_ids = input : i64[T]
  @embed = param : f32[16,8]
  %0 = embedding(@embed, %input_ids) : f32[T,8]
  @o = param : f32[24,8]
  %1 = reshape(@o) {"shape": [3, 8, 8]} : f32[3,8,8]
  %2 = permute(%1) {"dims": [0, 2, 1]} : f32[3,8,8]
  %3 = linear(%0, %2) {"weight_layout": "panels"} : f32[T,24]
  @q = param : f32[64,8]
  @k = param : f32[32,8]
  %4 = cat(@q, @k) {"dim": 0} : f32[96,8]
  %5 = reshape(%4) {"shape": [3, 32, 8]} : f32[3,32,8]
  %6 = permute(%5) {"dims": [0, 2, 1]} : f32[3,8,32]
  @b = param : f32[96]
  %7 = linear(%0, %6, @b) {"weight_layout": "panels"} : f32[T,96]
  @odd = param : f32[12,8]
  %8 = linear(%0, @odd) : f32[T,12]
  %9 = reshape(@embed) {"shape": [1, 16, 8]} : f32[1,16,8]
  %10 = permute(%9) {"dims": [0, 2, 1]} : f32[1,8,16]
  %11 = linear(%0, %10) {"weight_layout": "panels"} : f32[T,16]
  return %3, %7, %8, %11
}"""


def test_weights_in_panels_of_the_widest_width_dividing_n():
    """A merged (cat) weight of 96 rows: 3 panels of 32; 24 rows: 3 of 8; 16: 1 of 16; 12 rows
    (not a multiple of 8) stay out_in."""
    before, after = rewrite(WeightPanels(), BEFORE, AFTER)
    assert_equivalent("weight-panels", before, after)


def test_idempotent_and_folded_into_one_contiguous_param():
    _, after = rewrite(WeightPanels(), AFTER, AFTER)
    weights = random_weights(after)
    folded, producers = fold_weights(after, weight_fn(weights))
    panels = [
        n for n in folded.nodes if n.op == "linear" and n.attrs.get("weight_layout") == "panels"
    ]
    assert len(panels) == 3 and all(n.inputs[1].op == "param" for n in panels)
    merged = producers[panels[1].inputs[1].name]()
    assert merged.shape == (3, 8, 32) and merged.is_contiguous()
    qk = torch.cat([weights["q"], weights["k"]])
    torch.testing.assert_close(merged[1, :, 5], qk[32 + 5])  # panel 1, column 5: output 37


def test_activation_weight_and_other_layouts_are_left_alone():
    """x @ x^T (a weight computed from the step's input) and an in_out weight stay as they are."""
    text = """graph {
  %input_ids = input : i64[T]
  @embed = param : f32[16,8]
  %0 = embedding(@embed, %input_ids) : f32[T,8]
  %1 = linear(%0, %0) : f32[T,T]
  @w = param : f32[8,16]
  %2 = linear(%0, @w) {"weight_layout": "in_out"} : f32[T,16]
  return %1, %2
}"""
    rewrite(WeightPanels(), text, text)
