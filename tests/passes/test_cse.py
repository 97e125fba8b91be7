"""cse: equal nodes (op, operands, attributes; consts by value and dtype) become one."""

from __future__ import annotations

import pytest
from pass_harness import assert_equivalent, rewrite

from kiln.ir import Graph, Node, TensorType, const_node, input_node, print_graph
from kiln.passes import get_pass

DUPLICATE_CHAIN_BEFORE = """graph {
  %input_ids = input : i64[T]
  @embed = param : f32[16,8]
  %0 = embedding(@embed, %input_ids) : f32[T,8]
  %1 = exp(%0) : f32[T,8]
  %2 = exp(%0) : f32[T,8]
  %3 = tanh(%1) : f32[T,8]
  %4 = tanh(%2) : f32[T,8]
  %5 = add(%3, %4) : f32[T,8]
  return %5
}"""
DUPLICATE_CHAIN_AFTER = """graph {
  %input_ids = input : i64[T]
  @embed = param : f32[16,8]
  %0 = embedding(@embed, %input_ids) : f32[T,8]
  %1 = exp(%0) : f32[T,8]
  %2 = tanh(%1) : f32[T,8]
  %3 = add(%2, %2) : f32[T,8]
  return %3
}"""

# Each inline literal parses to its own const node: equal values and dtypes merge, so do
# the adds reading them.
SCALAR_CONSTS_BEFORE = """graph {
  %input_ids = input : i64[T]
  @embed = param : f32[16,8]
  %0 = embedding(@embed, %input_ids) : f32[T,8]
  %1 = add(%0, 2.0) : f32[T,8]
  %2 = add(%0, 2.0) : f32[T,8]
  %3 = add(%0, 2) : f32[T,8]
  %4 = add(%0, True) : f32[T,8]
  %5 = mul(%1, %2) : f32[T,8]
  %6 = mul(%3, %4) : f32[T,8]
  %7 = sub(%5, %6) : f32[T,8]
  return %7
}"""
SCALAR_CONSTS_AFTER = """graph {
  %input_ids = input : i64[T]
  @embed = param : f32[16,8]
  %0 = embedding(@embed, %input_ids) : f32[T,8]
  %1 = add(%0, 2.0) : f32[T,8]
  %2 = mul(%1, %1) : f32[T,8]
  %3 = add(%0, 2) : f32[T,8]
  %4 = add(%0, True) : f32[T,8]
  %5 = mul(%3, %4) : f32[T,8]
  %6 = sub(%2, %5) : f32[T,8]
  return %6
}"""

TENSOR_CONSTS_BEFORE = """graph {
  %input_ids = input : i64[T]
  @embed = param : f32[16,8]
  %0 = embedding(@embed, %input_ids) : f32[T,8]
  %1 = const() {"value": [1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0]} : f32[8]
  %2 = mul(%0, %1) : f32[T,8]
  %3 = const() {"value": [1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0]} : f32[8]
  %4 = add(%2, %3) : f32[T,8]
  %5 = const() {"value": [1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0]} : f16[8]
  %6 = add(%4, %5) : f32[T,8]
  %7 = const() {"value": [1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 9.0]} : f32[8]
  %8 = sub(%6, %7) : f32[T,8]
  %9 = const() {"value": 0.5} : f16[]
  %10 = mul(%8, %9) : f32[T,8]
  %11 = const() {"value": 0.5} : f16[]
  %12 = mul(%10, %11) : f32[T,8]
  return %12
}"""
TENSOR_CONSTS_AFTER = """graph {
  %input_ids = input : i64[T]
  @embed = param : f32[16,8]
  %0 = embedding(@embed, %input_ids) : f32[T,8]
  %1 = const() {"value": [1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0]} : f32[8]
  %2 = mul(%0, %1) : f32[T,8]
  %3 = add(%2, %1) : f32[T,8]
  %4 = const() {"value": [1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0]} : f16[8]
  %5 = add(%3, %4) : f32[T,8]
  %6 = const() {"value": [1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 9.0]} : f32[8]
  %7 = sub(%5, %6) : f32[T,8]
  %8 = const() {"value": 0.5} : f16[]
  %9 = mul(%7, %8) : f32[T,8]
  %10 = mul(%9, %8) : f32[T,8]
  return %10
}"""

# Same op and operands but other attributes, other ops, or operand order: all kept.
DISTINCT = """graph {
  %input_ids = input : i64[T]
  @embed = param : f32[16,8]
  %0 = embedding(@embed, %input_ids) : f32[T,8]
  %1 = softmax(%0) {"dim": 0} : f32[T,8]
  %2 = softmax(%0) {"dim": 1} : f32[T,8]
  %3 = sub(%1, %2) : f32[T,8]
  %4 = sub(%2, %1) : f32[T,8]
  %5 = softmax(%0) {"dim": 1, "dtype": "float32"} : f32[T,8]
  %6 = exp(%5) : f32[T,8]
  %7 = neg(%5) : f32[T,8]
  %8 = cat(%3, %4, %6, %7) {"dim": 1} : f32[T,32]
  return %8
}"""

CASES = {
    "duplicate_chain": (DUPLICATE_CHAIN_BEFORE, DUPLICATE_CHAIN_AFTER),
    "scalar_consts_by_value_and_dtype": (SCALAR_CONSTS_BEFORE, SCALAR_CONSTS_AFTER),
    "tensor_consts_by_value_and_dtype": (TENSOR_CONSTS_BEFORE, TENSOR_CONSTS_AFTER),
    "distinct_attrs_ops_and_operand_order": (DISTINCT, DISTINCT),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_cse(case):
    before, after = CASES[case]
    graph, result = rewrite("cse", before, after)
    assert_equivalent("cse", graph, result)


def test_params_of_one_name_merge_inputs_never_do():
    t = TensorType("float32", ("T", 4))
    x, y = input_node("x", t), input_node("y", t)
    w1 = Node("param", (), {"name": "w"}, TensorType("float32", (4, 4)))
    w2 = Node("param", (), {"name": "w"}, TensorType("float32", (4, 4)))
    a = Node("linear", (x, w1), {}, t)
    b = Node("linear", (x, w2), {}, t)
    c = Node("add", (x, y), {}, t)
    graph = Graph([x, y, w1, w2, a, b, c], [a, b, c])
    result = get_pass("cse").apply(graph)
    assert [n.name for n in result.inputs] == ["x", "y"]
    assert len(result.params) == 1
    assert result.outputs[0] is result.outputs[1]
    assert print_graph(result).count("linear(") == 1


def test_same_value_different_int_and_float_consts_stay_apart():
    t = TensorType("float32", ("T",))
    x = input_node("x", t)
    one_f, one_i = (
        const_node(1.0, TensorType("float32", ())),
        const_node(1, TensorType("int64", ())),
    )
    a, b = Node("add", (x, one_f), {}, t), Node("add", (x, one_i), {}, t)
    result = get_pass("cse").apply(Graph([x, one_f, one_i, a, b], [a, b]))
    assert result.outputs[0] is not result.outputs[1]
