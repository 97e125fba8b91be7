"""last-token-logits: the LM head only on the rows that will be sampled."""

from __future__ import annotations

from dataclasses import dataclass

from kiln.ir.graph import Graph, Node, input_node
from kiln.ir.ops import get_op
from kiln.ir.types import TensorType
from kiln.passes.base import Pass, make, weight_only

LOGITS_INDICES = "logits_indices"
ROWS = "R"


def _row_wise_chain(out: Node) -> tuple[Node, list[Node]] | None:
    """Walk from the output back to the LM-head `linear` through elementwise ops whose other
    operands are weights or constants (soft-capping, logit scaling, casts)."""
    chain: list[Node] = []
    n = out
    while n.op != "linear":
        if n.op in ("input", "param", "const") or get_op(n.op).kind != "elementwise":
            return None
        acts = [i for i in n.inputs if not weight_only(i)]
        if len(acts) != 1 or any(i.type.rank > 1 for i in n.inputs if i is not acts[0]):
            return None
        chain.append(n)
        n = acts[0]
    return n, chain


@dataclass(frozen=True)
class LastTokenLogits(Pass):
    """Matches: a graph output computed as linear(h [T, H], W) followed by row-wise elementwise
    ops (the LM head, soft-capping, scaling). Emits: a graph input `logits_indices` (int64
    [R]) and gather_rows(h, logits_indices) before the LM head, so only the R rows the
    runtime samples are projected to the vocabulary. Passing every row index keeps all logits."""

    name = "last-token-logits"

    def apply(self, graph: Graph) -> Graph:
        if len(graph.outputs) != 1 or any(n.name == LOGITS_INDICES for n in graph.inputs):
            return graph
        found = _row_wise_chain(graph.outputs[0])
        if found is None:
            return graph
        head, chain = found
        h = head.inputs[0]
        if h.type.rank != 2:
            return graph
        idx = input_node(LOGITS_INDICES, TensorType("int64", (ROWS,)))
        rows = make("gather_rows", [h, idx])
        new = make("linear", [rows, *head.inputs[1:]])
        replace = {head: new}
        prev, old_prev = new, head
        for n in reversed(chain):
            rebuilt = make(n.op, [prev if i is old_prev else i for i in n.inputs], **n.attrs)
            replace[n] = rebuilt
            prev, old_prev = rebuilt, n
        out = graph.substitute(replace)
        return out.with_inputs([*(i for i in out.inputs if i is not idx), idx])
