"""cse: common-subexpression elimination."""

from __future__ import annotations

import json
from dataclasses import dataclass

from kiln.ir.graph import Graph, Node
from kiln.passes.base import Pass


@dataclass(frozen=True)
class CommonSubexpressionElimination(Pass):
    """Matches: two nodes with the same op, the same operands and the same attributes (params
    by name, constants by value and dtype), neither writing in place. Emits: one node, used by every reader of either."""

    name = "cse"

    def apply(self, graph: Graph) -> Graph:
        seen: dict[tuple, Node] = {}

        def dedupe(n: Node) -> Node | None:
            if n.op == "input" or n.writes:  # two writes are two effects, never one
                return None
            key = (n.op, tuple(id(i) for i in n.inputs), json.dumps(n.attrs, sort_keys=True), str(n.type))
            first = seen.setdefault(key, n)
            return first if first is not n else None

        return graph.rewrite(dedupe)
