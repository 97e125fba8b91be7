"""JSON form of a graph (the artifact's graph.json); round-trips exactly."""

from __future__ import annotations

import json
from typing import Any

from kiln.errors import VerifyError
from kiln.ir.graph import Graph, Node
from kiln.ir.types import TensorType

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
                "dtype": n.type.dtype,
                "shape": list(n.type.shape),
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
            Node(d["op"], tuple(nodes[j] for j in d["inputs"]), d["attrs"], TensorType(d["dtype"], tuple(d["shape"])))
        )
    return Graph(nodes, [nodes[i] for i in data["outputs"]], data.get("meta", {}))


def dumps(graph: Graph) -> str:
    """The graph as a JSON string."""
    return json.dumps(graph_to_dict(graph), indent=1)


def loads(text: str) -> Graph:
    """A graph from a JSON string."""
    return graph_from_dict(json.loads(text))
