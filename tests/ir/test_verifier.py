"""The verifier: one test per diagnostic, each a VerifyError whose message says what and where."""

from __future__ import annotations

import pytest

from kiln.errors import KilnError, VerifyError
from kiln.ir import (
    Graph,
    Node,
    TensorType,
    graph_from_dict,
    graph_to_dict,
    input_node,
    param_node,
    parse_graph,
    verify,
)
from kiln.ir.graph import const_node


def _graph(*lines: str, ret: str = "%0") -> Graph:
    body = "\n".join(f"  {line}" for line in lines)
    return parse_graph(f"graph {{\n  %x = input : f32[T,4]\n{body}\n  return {ret}\n}}\n")


def test_valid_graph_passes():
    verify(
        _graph(
            "@w = param : f32[3,4]",
            "%0 = linear(%x, @w) : f32[T,3]",
            '%1 = softmax(%0) {"dim": -1} : f32[T,3]',
            '%2 = clamp(%1) {"min": 0.1} : f32[T,3]',
            ret="%2",
        )
    )


def test_verify_error_is_a_kiln_error():
    assert issubclass(VerifyError, KilnError)


def test_use_before_definition():
    x = input_node("x", TensorType("float32", ("T",)))
    a = Node("exp", (x,), {}, x.type)
    b = Node("neg", (a,), {}, x.type)
    with pytest.raises(
        VerifyError, match=r"operand exp\(input:f32\[T\]\) .* used before definition in node neg\("
    ):
        verify(Graph([x, b, a], [b]))


def test_operand_from_outside_the_graph():
    x = input_node("x", TensorType("float32", ("T",)))
    stray = input_node("y", TensorType("float32", ("T",)))
    with pytest.raises(VerifyError, match="used before definition in node add"):
        verify(Graph([x, Node("add", (x, stray), {}, x.type)], []))


def test_output_not_in_graph():
    x = input_node("x", TensorType("float32", ("T",)))
    stray = Node("exp", (x,), {}, x.type)
    with pytest.raises(
        VerifyError, match=r"graph output exp\(input:f32\[T\]\) .* is not a node of the graph"
    ):
        verify(Graph([x], [stray]))


def test_unknown_op_lists_registered_ops():
    with pytest.raises(
        VerifyError, match=r"unknown op 'frobnicate'; registered ops: .*\badd\b.*\brms_norm\b"
    ):
        verify(_graph("%0 = frobnicate(%x) : f32[T,4]"))


@pytest.mark.parametrize(
    ("line", "match"),
    [
        ("%0 = add(%x) : f32[T,4]", r"expected 2 inputs, got 1 in node add\("),
        ("%0 = exp(%x, %x) : f32[T,4]", r"expected 1 inputs, got 2 in node exp\("),
        (
            '%0 = rms_norm(%x, %x, %x) {"normalized_shape": [4], "eps": 1e-06} : f32[T,4]',
            r"expected \(1, 2\) inputs, got 3",
        ),
        (
            '%0 = arange(%x) {"start": 0, "end": 4, "step": 1, "dtype": "int64"} : i64[4]',
            r"expected 0 inputs, got 1",
        ),
    ],
)
def test_wrong_arity(line, match):
    with pytest.raises(VerifyError, match=match):
        verify(_graph(line))


def test_missing_attribute():
    with pytest.raises(
        VerifyError, match=r"attributes missing \['dim'\] / unknown \[\] in node softmax\("
    ):
        verify(_graph("%0 = softmax(%x) : f32[T,4]"))


def test_unknown_attribute():
    with pytest.raises(
        VerifyError, match=r"attributes missing \[\] / unknown \['alpha'\] in node exp\("
    ):
        verify(_graph('%0 = exp(%x) {"alpha": 1.0} : f32[T,4]'))


def test_optional_attributes_may_be_absent_or_present():
    verify(_graph('%0 = softmax(%x) {"dim": 1} : f32[T,4]'))
    verify(_graph('%0 = softmax(%x) {"dim": 1, "dtype": "float64"} : f64[T,4]'))


@pytest.mark.parametrize(
    ("line", "match"),
    [
        (
            "%0 = exp(%x) : f32[T,5]",
            r"recorded type f32\[T,5\] but the rule gives f32\[T,4\] in node exp\(",
        ),
        ("%0 = exp(%x) : f16[T,4]", r"recorded type f16\[T,4\] but the rule gives f32\[T,4\]"),
        ("%0 = exp(%x) : f32[S,4]", r"recorded type f32\[S,4\] but the rule gives f32\[T,4\]"),
        (
            '%0 = reshape(%x) {"shape": ["2*T", 2]} : f32[T+T,3]',
            r"recorded type f32\[T\+T,3\] but the rule gives f32\[2\*T,2\]",
        ),
        (
            '%0 = cast(%x) {"dtype": "bfloat16"} : f16[T,4]',
            r"recorded type f16\[T,4\] but the rule gives bf16\[T,4\]",
        ),
        ("%0 = lt(%x, 0.0) : f32[T,4]", r"recorded type f32\[T,4\] but the rule gives bool\[T,4\]"),
    ],
)
def test_recorded_type_disagrees_with_rule(line, match):
    with pytest.raises(VerifyError, match=match):
        verify(_graph(line))


def test_recorded_type_equal_up_to_expression_form_is_accepted():
    verify(_graph('%0 = reshape(%x) {"shape": ["2*T", 2]} : f32[T+T,2]'))


def test_check_types_false_skips_the_type_rule():
    verify(_graph("%0 = exp(%x) : f32[T,5]"), check_types=False)


def test_type_rule_rejecting_operands():
    g = _graph("@w = param : f32[3,5]", "%0 = matmul(%x, @w) : f32[T,5]")
    with pytest.raises(VerifyError, match=r"type rule of 'matmul' failed \(.*\) in node matmul\("):
        verify(g)


def test_duplicate_input_name():
    text = "graph {\n  %x = input : f32[T]\n  %x = input : f32[T]\n  return %x\n}\n"
    with pytest.raises(VerifyError, match="duplicate graph input 'x'"):
        verify(parse_graph(text))


def test_param_declared_with_two_types():
    a = param_node("w", TensorType("float32", (4,)))
    b = param_node("w", TensorType("float32", (5,)))
    with pytest.raises(VerifyError, match="param 'w' declared with two types"):
        verify(Graph([a, b], [a]))
    verify(Graph([a, param_node("w", TensorType("float32", (4,)))], [a]))  # same type twice is fine


def test_const_without_value():
    c = Node("const", (), {}, TensorType("float32", ()))
    with pytest.raises(VerifyError, match="const without a value"):
        verify(Graph([c], [c]))


def test_unknown_dtype():
    x = input_node("x", TensorType("float8", ("T",)))
    with pytest.raises(VerifyError, match="unknown dtype 'float8'"):
        verify(Graph([x], [x]))


def test_unknown_dtype_from_json():
    data = graph_to_dict(_graph("%0 = exp(%x) : f32[T,4]"))
    data["nodes"][1]["dtype"] = "float8"
    with pytest.raises(VerifyError, match="unknown dtype 'float8'"):
        verify(graph_from_dict(data))


def test_scalar_const_operands_verify():
    x = input_node("x", TensorType("float32", ("T",)))
    c = const_node(2, TensorType("int64", ()))
    verify(Graph([x, c, Node("pow", (x, c), {}, x.type)], [x]))


def test_type_rule_rejects_what_the_reference_cannot_run():
    with pytest.raises(VerifyError, match="sub"):
        verify(_graph("%0 = sub(%x, True) : f32[T,4]"))
