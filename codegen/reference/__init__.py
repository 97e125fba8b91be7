"""The reference target: every op runs its IR torch implementation (the `torch` provider), in
plan order, into arena buffers."""

from __future__ import annotations

from kiln.codegen.lowering import LoweredModule, build_plan
from kiln.errors import UnsupportedOpError
from kiln.ir.graph import Graph, Node
from kiln.kernels import torch_provider

TARGET = "reference"


def _kernel(node: Node) -> str:
    if torch_provider.launcher(node.op) is None:
        raise UnsupportedOpError(node.op, hint="the torch provider has no kernel for it")
    return f"{torch_provider.PREFIX}:{node.op}"


def lower(graph: Graph) -> LoweredModule:
    """The execution plan of a (pass-processed, weight-folded) graph; no files, no fallbacks."""
    return LoweredModule(build_plan(graph, TARGET, _kernel))
