"""weight-layout: linear weights stored in the layout a target's GEMM kernels read."""

from __future__ import annotations

from dataclasses import dataclass

from kiln.ir.graph import Graph, Node
from kiln.passes.base import Pass, make, weight_only


@dataclass(frozen=True)
class WeightLayout(Pass):
    """Matches: `linear(x, W[, b])` whose weight W is weight-only (a param, or a subgraph of
    params that weight folding computes at compile time) and not already in `layout`.
    Emits: `linear(x, permute(W, [1, 0])[, b]) {weight_layout=layout}`; folding then stores the
    transposed weight, so the kernel reads it in the order it wants and nothing transposes at
    run time. layout "out_in" is the checkpoint's own ([out, in]), "in_out" its transpose."""

    name = "weight-layout"
    layout: str = "in_out"

    def apply(self, graph: Graph) -> Graph:
        def relayout(n: Node) -> Node | None:
            if n.op != "linear" or not weight_only(n.inputs[1]):
                return None
            current = n.attrs.get("weight_layout", "out_in")
            if current == self.layout:
                return None
            w = make("permute", [n.inputs[1]], dims=[1, 0])
            attrs = {} if self.layout == "out_in" else {"weight_layout": self.layout}
            return make("linear", [n.inputs[0], w, *n.inputs[2:]], **attrs)

        return graph.rewrite(relayout)
