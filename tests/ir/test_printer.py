"""The IR text form: print(parse(text)) == text, literals, errors, and a round-trip property."""

from __future__ import annotations

import json
import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kiln.errors import VerifyError
from kiln.ir import (
    Graph,
    Node,
    TensorType,
    const_node,
    input_node,
    parse_graph,
    print_graph,
    run_graph,
    verify,
)
from kiln.ir.ops import OPS, infer_type
from kiln.ir.serialize import dumps, graph_from_dict, graph_to_dict, loads

ROUND_TRIP = {
    "inline_scalars": """graph {
  %x = input : f32[T,4]
  %0 = add(%x, 1e-06) : f32[T,4]
  %1 = maximum(%0, -Infinity) : f32[T,4]
  %2 = minimum(%1, Infinity) : f32[T,4]
  %3 = mul(%2, -2.5) : f32[T,4]
  %4 = add(%3, 3) : f32[T,4]
  %5 = mul(%4, True) : f32[T,4]
  %6 = where(False, %5, NaN) : f32[T,4]
  return %6
}
""",
    "symbolic_attrs": """graph {
  %input_ids = input : i64[T]
  %cu_seqlens = input : i32[S+1]
  @model.embed_tokens.weight = param : f32[32,8]
  %0 = embedding(@model.embed_tokens.weight, %input_ids) : f32[T,8]
  %1 = reshape(%0) {"shape": ["T", 2, 4]} : f32[T,2,4]
  %2 = slice(%1) {"dim": 0, "start": 1, "end": "T", "step": 1} : f32[T-1,2,4]
  %3 = reshape(%0) {"shape": ["2*T", 4]} : f32[2*T,4]
  %4 = arange() {"start": 0, "end": "S+1", "step": 1, "dtype": "int32"} : i32[S+1]
  %5 = sub(%cu_seqlens, %4) : i32[S+1]
  return %2, %3, %5
}
""",
    "params_norms_attention": """graph {
  %input_ids = input : i64[T]
  %cu_seqlens = input : i32[S+1]
  @embed = param : f32[16,8]
  %0 = embedding(@embed, %input_ids) : f32[T,8]
  @layers.0.norm.weight = param : f32[8]
  %1 = rms_norm(%0, @layers.0.norm.weight) {"normalized_shape": [8], "eps": 1e-05} : f32[T,8]
  @layers.0.qkv = param : f32[16,8]
  %2 = linear(%1, @layers.0.qkv) : f32[T,16]
  %3 = slice(%2) {"dim": 1, "start": 0, "end": 8, "step": 1} : f32[T,8]
  %4 = reshape(%3) {"shape": ["T", 2, 4]} : f32[T,2,4]
  %5 = slice(%2) {"dim": 1, "start": 8, "end": 12, "step": 1} : f32[T,4]
  %6 = reshape(%5) {"shape": ["T", 1, 4]} : f32[T,1,4]
  %7 = slice(%2) {"dim": 1, "start": 12, "end": 16, "step": 1} : f32[T,4]
  %8 = reshape(%7) {"shape": ["T", 1, 4]} : f32[T,1,4]
  %9 = attention(%4, %6, %8, %cu_seqlens) {"scale": 0.5, "causal": true, "sliding_window": 0, "softcap": 0.0} : f32[T,2,4]
  return %9, %1
}
""",
    "non_inline_consts": """graph {
  %x = input : f16[T,2]
  %0 = const() {"value": [1.0, 2.0]} : f16[2]
  %1 = mul(%x, %0) : f16[T,2]
  %2 = const() {"value": 0.5} : f16[]
  %3 = add(%1, %2) : f16[T,2]
  %4 = const() {"value": 2} : f32[]
  %5 = div(%3, %4) : f16[T,2]
  %6 = cast(%5) {"dtype": "bfloat16"} : bf16[T,2]
  return %6, %x
}
""",
    "scalar_and_bool_types": """graph {
  %mask = input : bool[1,T]
  %n = input : i64[]
  %0 = logical_not(%mask) : bool[1,T]
  %1 = cast(%0) {"dtype": "int64"} : i64[1,T]
  %2 = mul(%1, %n) : i64[1,T]
  %3 = floor(1.5) : f32[]
  return %2, %3
}
""",
}


@pytest.mark.parametrize("name", sorted(ROUND_TRIP))
def test_print_parse_round_trip(name):
    text = ROUND_TRIP[name]
    graph = parse_graph(text)
    verify(graph)
    assert print_graph(graph) == text


@pytest.mark.parametrize("name", sorted(ROUND_TRIP))
def test_json_round_trip_preserves_text(name):
    graph = parse_graph(ROUND_TRIP[name])
    assert print_graph(loads(dumps(graph))) == ROUND_TRIP[name]


def test_parse_inline_literals_get_scalar_const_nodes():
    graph = parse_graph(ROUND_TRIP["inline_scalars"])
    consts = [(n.type.dtype, n.attrs["value"]) for n in graph.nodes if n.op == "const"]
    assert [d for d, _ in consts] == [
        "float32",
        "float32",
        "float32",
        "float32",
        "int64",
        "bool",
        "bool",
        "float32",
    ]
    values = [v for _, v in consts]
    assert values[:5] == [1e-06, -math.inf, math.inf, -2.5, 3]
    assert values[5] is True and values[6] is False
    assert math.isnan(values[7])
    assert all(n.type.shape == () for n in graph.nodes if n.op == "const")


def test_parse_types_params_and_symbolic_shapes():
    graph = parse_graph(ROUND_TRIP["symbolic_attrs"])
    assert [n.name for n in graph.inputs] == ["input_ids", "cu_seqlens"]
    assert graph.input("cu_seqlens").type == TensorType("int32", ("S+1",))
    assert [(p.name, p.type) for p in graph.params] == [
        ("model.embed_tokens.weight", TensorType("float32", (32, 8)))
    ]
    slice_ = next(n for n in graph.nodes if n.op == "slice")
    assert slice_.attrs == {"dim": 0, "start": 1, "end": "T", "step": 1}
    assert slice_.type.same_as(TensorType("float32", ("T - 1", 2, 4)))
    assert len(graph.outputs) == 3


def test_printer_uses_canonical_names_for_computed_values():
    x = input_node("hidden", TensorType("float32", ("T", 4)))
    a = Node("exp", (x,), {}, x.type)
    b = Node("neg", (a,), {}, x.type)
    text = print_graph(Graph([x, a, b], [b, a]))
    assert (
        text
        == "graph {\n  %hidden = input : f32[T,4]\n  %0 = exp(%hidden) : f32[T,4]\n  %1 = neg(%0) : f32[T,4]\n  return %1, %0\n}\n"
    )


def test_inline_literal_is_printed_at_each_use():
    x = input_node("x", TensorType("float32", ("T",)))
    two = const_node(2.0, TensorType("float32", ()))
    a = Node("mul", (x, two), {}, x.type)
    b = Node("add", (a, two), {}, x.type)
    text = print_graph(Graph([x, two, a, b], [b]))
    assert "mul(%x, 2.0)" in text and "add(%0, 2.0)" in text
    assert print_graph(parse_graph(text)) == text


def test_rank0_const_of_other_dtype_is_not_inlined():
    x = input_node("x", TensorType("float16", ("T",)))
    c = const_node(2.0, TensorType("float16", ()))
    text = print_graph(Graph([x, c, Node("mul", (x, c), {}, x.type)], [x]))
    assert '%0 = const() {"value": 2.0} : f16[]' in text


@pytest.mark.parametrize(
    ("line", "match"),
    [
        ("%0 = exp(%x) : f32[T", "cannot parse IR line"),
        ("%0 exp(%x) : f32[T]", "cannot parse IR line"),
        ("%0 = exp(%x) : q8[T]", "unknown dtype 'q8'"),
        ("%0 = exp(%nope) : f32[T]", "uses %nope before it is defined"),
    ],
)
def test_parse_errors_are_verify_errors(line, match):
    text = f"graph {{\n  %x = input : f32[T]\n  {line}\n  return %x\n}}\n"
    with pytest.raises(VerifyError, match=match):
        parse_graph(text)


def test_round_trip_graph_returning_inline_const():
    x = input_node("x", TensorType("float32", ("T",)))
    c = const_node(1.5, TensorType("float32", ()))
    text = print_graph(Graph([x, c], [x, c]))
    assert print_graph(parse_graph(text)) == text


# -- property: random small elementwise/reshape graphs ---------------------------------------

_UNARY = ["exp", "neg", "tanh", "silu", "sigmoid", "abs", "square", "relu", "cos"]
_BINARY = ["add", "sub", "mul", "maximum", "minimum"]
_LITERALS = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True),
    st.integers(min_value=-(10**6), max_value=10**6),
    st.booleans(),
)
_DTYPE_OF = {float: "float32", int: "int64", bool: "bool"}
# Shapes every value of the graph may be reshaped to (all hold 4*T elements).
_SHAPES = [["T", 4], ["T", 2, 2], ["4*T"], ["2*T", 2], [-1, 4]]


def _make(op: str, inputs: list[Node], **attrs) -> Node:
    return Node(op, tuple(inputs), attrs, infer_type(OPS[op], [i.type for i in inputs], attrs))


@st.composite
def small_graphs(draw) -> Graph:
    x = input_node("x", TensorType("float32", ("T", 4)))
    values = [x]
    for _ in range(draw(st.integers(1, 6))):
        kind = draw(st.sampled_from(["unary", "binary", "literal", "reshape", "cast"]))
        a = draw(st.sampled_from(values))
        if kind == "unary":
            node = _make(draw(st.sampled_from(_UNARY)), [a])
        elif kind == "reshape":
            node = _make("reshape", [a], shape=draw(st.sampled_from(_SHAPES)))
        elif kind == "cast":
            node = _make(
                "cast", [a], dtype=draw(st.sampled_from(["float32", "float16", "float64"]))
            )
        else:
            if kind == "literal":
                v = draw(_LITERALS)
                b = const_node(v, TensorType(_DTYPE_OF[type(v)], ()))
            else:  # another value of the same shape (reshape it if needed)
                b = draw(st.sampled_from(values))
                if not b.type.same_as(a.type):
                    b = _make("reshape", [b], shape=list(a.type.shape))
            pair = [a, b] if draw(st.booleans()) else [b, a]
            op = draw(st.sampled_from(_BINARY))
            if op == "sub" and b.type.dtype == "bool":  # torch has no bool subtraction
                op = "add"
            node = _make(op, pair)
        values.append(node)
    outputs = draw(st.lists(st.sampled_from(values[1:]), min_size=1, max_size=3))
    return Graph([x], []).with_nodes([x], outputs)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(small_graphs())
def test_random_graphs_print_parse_print_is_stable(graph):
    verify(graph)
    text = print_graph(graph)
    parsed = parse_graph(text)
    verify(parsed)
    assert print_graph(parsed) == text
    assert print_graph(graph_from_dict(json.loads(json.dumps(graph_to_dict(graph))))) == text
    assert print_graph(graph_from_dict(json.loads(json.dumps(graph_to_dict(parsed))))) == text


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(small_graphs(), st.integers(1, 5))
def test_random_graphs_parsed_back_compute_the_same(graph, t):
    x = torch.randn(t, 4)
    want = run_graph(graph, {"x": x}, lambda name, type_: None)
    got = run_graph(parse_graph(print_graph(graph)), {"x": x}, lambda name, type_: None)
    for a, b in zip(got, want, strict=True):
        assert a.dtype == b.dtype and a.shape == b.shape
        torch.testing.assert_close(a, b, equal_nan=True, rtol=0, atol=0)
