"""merge-projections: one GEMM for sibling projections of the same activations (QKV, gate/up)."""

from __future__ import annotations

from dataclasses import dataclass

from kiln.ir.dims import from_expr, to_expr
from kiln.ir.graph import Graph, Node
from kiln.passes.base import Pass, make, weight_only


@dataclass(frozen=True)
class MergeProjections(Pass):
    """Matches: two or more `linear` nodes reading the same activation, with weights (and
    biases, all or none) that depend on parameters only and share a dtype — q/k/v projections,
    gate/up projections. Emits: one `linear` over the row-concatenated weight (a `cat` of the
    params, folded into a single weight when the artifact is written) and a `slice` of its
    output for each original projection."""

    name = "merge-projections"
    min_group: int = 2

    def apply(self, graph: Graph) -> Graph:
        groups: dict[Node, list[Node]] = {}
        for n in graph.nodes:
            if n.op == "linear" and all(weight_only(w) for w in n.inputs[1:]) and n.inputs[1].type.rank == 2:
                groups.setdefault(n.inputs[0], []).append(n)
        replace: dict[Node, Node] = {}
        for x, members in groups.items():
            key = {(len(m.inputs), m.inputs[1].type.dtype, m.inputs[1].type.shape[1]) for m in members}
            if len(members) < self.min_group or len(key) != 1:
                continue
            weight = make("cat", [m.inputs[1] for m in members], dim=0)
            biases = [make("cat", [m.inputs[2] for m in members], dim=0)] if len(members[0].inputs) == 3 else []
            fused = make("linear", [x, weight, *biases])
            last = fused.type.rank - 1
            start: object = 0
            for m in members:
                end = from_expr(to_expr(start) + to_expr(m.type.shape[-1]))
                replace[m] = make("slice", [fused], dim=last, start=start, end=end, step=1)
                start = end
        if not replace:
            return graph
        return graph.substitute(replace)
