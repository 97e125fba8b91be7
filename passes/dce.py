"""dce: dead-code elimination."""

from __future__ import annotations

from dataclasses import dataclass

from kiln.ir.graph import Graph
from kiln.passes.base import Pass


@dataclass(frozen=True)
class DeadCodeElimination(Pass):
    """Matches: nodes that no graph output and no in-place write depends on (graph inputs
    are kept: they are the calling convention). Emits: the graph without them."""

    name = "dce"

    def apply(self, graph: Graph) -> Graph:
        return graph.dce()
