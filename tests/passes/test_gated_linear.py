"""gated-linear: a gated activation read only by a linear layer fuses into gated_linear."""

from __future__ import annotations

from pass_harness import assert_equivalent, canonical, rewrite

from kiln.ir import parse_graph, print_graph
from kiln.passes import get_pass

MLP_BEFORE = """graph {
  %input_ids = input : i64[T]
  @embed = param : f32[16,8]
  %0 = embedding(@embed, %input_ids) : f32[T,8]
  @gate_up = param : f32[12,8]
  %1 = linear(%0, @gate_up) : f32[T,12]
  %2 = gelu_and_mul(%1) {"approximate": "tanh"} : f32[T,6]
  @down = param : f32[8,6]
  @down_bias = param : f32[8]
  %3 = linear(%2, @down, @down_bias) : f32[T,8]
  @lm_head = param : f32[16,8]
  %4 = linear(%3, @lm_head) : f32[T,16]
  return %4
}"""
MLP_AFTER = """graph {
  %input_ids = input : i64[T]
  @embed = param : f32[16,8]
  %0 = embedding(@embed, %input_ids) : f32[T,8]
  @gate_up = param : f32[12,8]
  %1 = linear(%0, @gate_up) : f32[T,12]
  @down = param : f32[8,6]
  @down_bias = param : f32[8]
  %2 = gated_linear(%1, @down, @down_bias) {"gate": "gelu_and_mul", "approximate": "tanh"} : (f32[T,8], f32[T,6])
  %3 = get_result(%2) {"index": 0} : f32[T,8]
  @lm_head = param : f32[16,8]
  %4 = linear(%3, @lm_head) : f32[T,16]
  return %4
}"""

READ_TWICE = """graph {
  %input_ids = input : i64[T]
  @embed = param : f32[16,12]
  %0 = embedding(@embed, %input_ids) : f32[T,12]
  %1 = silu_and_mul(%0) : f32[T,6]
  @down = param : f32[8,6]
  %2 = linear(%1, @down) : f32[T,8]
  %3 = add(%1, %1) : f32[T,6]
  return %2, %3
}"""


def test_the_down_projection_fuses_its_activation():
    graph, result = rewrite("gated-linear", MLP_BEFORE, MLP_AFTER)
    assert_equivalent("gated-linear", graph, result, tol=1e-6)


def test_an_activation_read_elsewhere_is_kept():
    graph = parse_graph(READ_TWICE)
    assert print_graph(get_pass("gated-linear").apply(graph)) == canonical(print_graph(graph))
