"""kiln's graph IR: types, nodes and graphs, the op registry, printer/parser, verifier,
JSON serialization and the reference interpreter."""

from kiln.ir.graph import Graph, Node, const_node, input_node, param_node
from kiln.ir.interpreter import run_graph
from kiln.ir.printer import parse_graph, print_graph
from kiln.ir.serialize import graph_from_dict, graph_to_dict
from kiln.ir.types import TensorType
from kiln.ir.verifier import verify

__all__ = [
    "Graph",
    "Node",
    "TensorType",
    "const_node",
    "graph_from_dict",
    "graph_to_dict",
    "input_node",
    "param_node",
    "parse_graph",
    "print_graph",
    "run_graph",
    "verify",
]
