"""graph.json: exact round trips (types, attrs, meta, node identity structure) and bad input."""

from __future__ import annotations

import json

import pytest

from kiln.errors import VerifyError
from kiln.ir import graph_from_dict, graph_to_dict, parse_graph, print_graph, verify
from kiln.ir.serialize import FORMAT, dumps, loads

TEXT = """graph {
  %input_ids = input : i64[T]
  %cu_seqlens = input : i32[S+1]
  @embed = param : bf16[16,8]
  %0 = embedding(@embed, %input_ids) : bf16[T,8]
  %1 = reshape(%0) {"shape": ["2*T", 4]} : bf16[2*T,4]
  %2 = const() {"value": [[1.0, 2.0, 3.0, 4.0]]} : bf16[1,4]
  %3 = mul(%1, %2) : bf16[2*T,4]
  %4 = add(%3, -Infinity) : bf16[2*T,4]
  %5 = cast(%4) {"dtype": "float32"} : f32[2*T,4]
  %6 = slice(%cu_seqlens) {"dim": 0, "start": 1, "end": "S+1", "step": 1} : i32[S]
  return %5, %6, %0
}
"""


def _graph():
    graph = parse_graph(TEXT)
    graph.meta.update({"model_type": "llama", "vocab_size": 16, "rope": {"theta": 10000.0}})
    return graph


def test_dict_round_trip_is_exact():
    graph = _graph()
    back = graph_from_dict(graph_to_dict(graph))
    verify(back)
    assert print_graph(back) == TEXT
    assert back.meta == graph.meta
    assert [(n.op, n.attrs, n.type) for n in back.nodes] == [
        (n.op, n.attrs, n.type) for n in graph.nodes
    ]
    assert all(isinstance(n.type.shape, tuple) for n in back.nodes)
    index = {n: i for i, n in enumerate(back.nodes)}
    assert [index[o] for o in back.outputs] == graph_to_dict(graph)["outputs"]


def test_dict_preserves_operand_indices_and_sharing():
    graph = _graph()
    data = graph_to_dict(graph)
    back = graph_from_dict(data)
    index = {n: i for i, n in enumerate(back.nodes)}
    assert [[index[i] for i in n.inputs] for n in back.nodes] == [
        d["inputs"] for d in data["nodes"]
    ]
    # the embedding is read by two nodes and is an output: still one node object
    emb = back.nodes[3]
    assert emb.op == "embedding" and back.outputs[2] is emb and back.nodes[4].inputs[0] is emb


def test_json_string_round_trip_and_format_field():
    graph = _graph()
    text = dumps(graph)
    data = json.loads(text)
    assert data["format"] == FORMAT
    assert data["meta"]["vocab_size"] == 16
    assert data["nodes"][1] == {
        "op": "input",
        "inputs": [],
        "attrs": {"name": "cu_seqlens"},
        "dtype": "int32",
        "shape": ["S+1"],
    }
    back = loads(text)
    assert print_graph(back) == TEXT
    assert back.meta == graph.meta
    assert dumps(back) == text


def test_wrong_format_version_is_rejected():
    data = graph_to_dict(_graph())
    data["format"] = FORMAT + 1
    with pytest.raises(VerifyError, match=f"format {FORMAT + 1} is not {FORMAT}"):
        graph_from_dict(data)
    del data["format"]
    with pytest.raises(VerifyError, match="format None"):
        graph_from_dict(data)


def test_forward_reference_is_rejected():
    data = graph_to_dict(_graph())
    data["nodes"][3]["inputs"] = [2, 5]
    with pytest.raises(VerifyError, match=r"node 3 \(embedding\) uses a later node"):
        graph_from_dict(data)


def test_missing_meta_defaults_to_empty():
    data = graph_to_dict(parse_graph(TEXT))
    del data["meta"]
    assert graph_from_dict(data).meta == {}
