"""JSON form of a graph (the artifact's graph.json); round-trips exactly."""

from __future__ import annotations

import json
from typing import Any

from kiln.errors import VerifyError
from kiln.ir.graph import Graph, Node
from kiln.ir.types import TensorType, TupleType, ValueType

FORMAT = 1


def graph_to_dict(graph: Graph) -> dict[str, Any]:
    """A JSON-ready dict: nodes by index, inputs as indices."""
    index = {n: i for i, n in enumerate(graph.nodes)}
    return {
        "format": FORMAT,
        "meta": graph.meta,
        "nodes": [
            {
                "op": n.op,
                "inputs": [index[i] for i in n.inputs],
                "attrs": n.attrs,
                **_type_to_dict(n.type),
            }
            for n in graph.nodes
        ],
        "outputs": [index[o] for o in graph.outputs],
    }


def graph_from_dict(data: dict[str, Any]) -> Graph:
    """Inverse of graph_to_dict."""
    if data.get("format") != FORMAT:
        raise VerifyError(f"graph JSON format {data.get('format')!r} is not {FORMAT}")
    nodes: list[Node] = []
    for i, d in enumerate(data["nodes"]):
        if any(j >= i for j in d["inputs"]):
            raise VerifyError(f"graph JSON node {i} ({d['op']}) uses a later node")
        nodes.append(
            Node(d["op"], tuple(nodes[j] for j in d["inputs"]), d["attrs"], _type_from_dict(d))
        )
    return Graph(nodes, [nodes[i] for i in data["outputs"]], data.get("meta", {}))


def _type_to_dict(t: ValueType) -> dict[str, Any]:
    if isinstance(t, TupleType):
        return {"results": [_type_to_dict(x) for x in t.types]}
    return {"dtype": t.dtype, "shape": list(t.shape)}


def _type_from_dict(d: dict[str, Any]) -> ValueType:
    if "results" in d:
        return TupleType(tuple(TensorType(r["dtype"], tuple(r["shape"])) for r in d["results"]))
    return TensorType(d["dtype"], tuple(d["shape"]))


def dumps(graph: Graph) -> str:
    """The graph as a JSON string."""
    return json.dumps(graph_to_dict(graph), indent=1)


def loads(text: str) -> Graph:
    """A graph from a JSON string."""
    return graph_from_dict(json.loads(text))
