"""dce: nodes no output depends on are dropped; graph inputs always stay."""

from __future__ import annotations

import pytest
from pass_harness import assert_equivalent, rewrite

from kiln.passes import get_pass

DEAD_CHAIN_BEFORE = """graph {
  %input_ids = input : i64[T]
  %position_ids = input : i64[T]
  @embed = param : f32[16,8]
  %0 = embedding(@embed, %input_ids) : f32[T,8]
  @unused = param : f32[8,8]
  %1 = linear(%0, @unused) : f32[T,8]
  %2 = exp(%1) : f32[T,8]
  %3 = cast(%position_ids) {"dtype": "float32"} : f32[T]
  %4 = const() {"value": [1.0, 2.0]} : f32[2]
  %5 = tanh(%0) : f32[T,8]
  return %5
}"""
DEAD_CHAIN_AFTER = """graph {
  %input_ids = input : i64[T]
  %position_ids = input : i64[T]
  @embed = param : f32[16,8]
  %0 = embedding(@embed, %input_ids) : f32[T,8]
  %1 = tanh(%0) : f32[T,8]
  return %1
}"""

# Reachable values keep their order; only the dead ones in between disappear.
INTERLEAVED_BEFORE = """graph {
  %input_ids = input : i64[T]
  @embed = param : f32[16,8]
  %0 = embedding(@embed, %input_ids) : f32[T,8]
  %1 = neg(%0) : f32[T,8]
  %2 = exp(%0) : f32[T,8]
  %3 = sigmoid(%1) : f32[T,8]
  %4 = mul(%2, 3.0) : f32[T,8]
  %5 = add(%2, %2) : f32[T,8]
  return %4, %2
}"""
INTERLEAVED_AFTER = """graph {
  %input_ids = input : i64[T]
  @embed = param : f32[16,8]
  %0 = embedding(@embed, %input_ids) : f32[T,8]
  %1 = exp(%0) : f32[T,8]
  %2 = mul(%1, 3.0) : f32[T,8]
  return %2, %1
}"""

NOTHING_DEAD = """graph {
  %input_ids = input : i64[T]
  @embed = param : f32[16,8]
  %0 = embedding(@embed, %input_ids) : f32[T,8]
  %1 = silu(%0) : f32[T,8]
  return %1, %0
}"""

CASES = {
    "dead_chain_param_const_and_unused_input": (DEAD_CHAIN_BEFORE, DEAD_CHAIN_AFTER),
    "interleaved": (INTERLEAVED_BEFORE, INTERLEAVED_AFTER),
    "nothing_dead": (NOTHING_DEAD, NOTHING_DEAD),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_dce(case):
    before, after = CASES[case]
    graph, result = rewrite("dce", before, after)
    assert_equivalent("dce", graph, result)
    assert [n.name for n in result.inputs] == [n.name for n in graph.inputs]


def test_dce_is_idempotent():
    _, once = rewrite("dce", DEAD_CHAIN_BEFORE, DEAD_CHAIN_AFTER)
    rewrite("dce", DEAD_CHAIN_AFTER, DEAD_CHAIN_AFTER)
    assert get_pass("dce").apply(once).nodes == once.nodes
