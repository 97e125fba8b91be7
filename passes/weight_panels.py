"""weight-panels: linear weights stored as panels of output columns (the cpu target's layout)."""

from __future__ import annotations

from dataclasses import dataclass

from kiln.ir.graph import Graph, Node
from kiln.passes.base import Pass, make, weight_only


@dataclass(frozen=True)
class WeightPanels(Pass):
    """Matches: `linear(x, W[, b])` whose weight W [N, K] ("out_in", the checkpoint's layout) is
    weight-only (a param, or a subgraph of params that weight folding computes at compile time:
    a merged QKV `cat`), with N a multiple of 8.
    Emits: `linear(x, permute(reshape(W, [N / nb, nb, K]), [0, 2, 1])[, b]) {weight_layout="panels"}`,
    nb the widest of `width`, width / 2, ..., 8 that divides N; folding stores W as N / nb
    panels [K, nb]:

        W [N, K]                    panels [N / nb, K, nb]
        row n = p * nb + j    ->    P[p, k, j] = W[p * nb + j, k]

    So the weights of a block of output columns are one contiguous run: a decode GEMV's thread
    streams its panels from memory in one pass (the hardware prefetcher follows one stream, not
    nb rows at a stride), and a prefill GEMM's register tile reads its nb columns of row k as
    one vector, without packing them first. A weight that another op reads too (an LM head tied to
    the embedding table) is then stored twice, the panels beside the original."""

    name = "weight-panels"
    width: int = 32

    def apply(self, graph: Graph) -> Graph:
        def panels(n: Node) -> Node | None:
            w = n.inputs[1] if n.op == "linear" else None
            if (
                w is None
                or n.attrs.get("weight_layout", "out_in") != "out_in"
                or not weight_only(w)
            ):
                return None
            rows, k = w.type.shape
            if not isinstance(rows, int) or rows % 8:
                return None
            nb = self.width
            while rows % nb:
                nb //= 2
            split = make("reshape", [w], shape=[rows // nb, nb, k])
            return make(
                "linear",
                [n.inputs[0], make("permute", [split], dims=[0, 2, 1]), *n.inputs[2:]],
                weight_layout="panels",
            )

        return graph.rewrite(panels)
