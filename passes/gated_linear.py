"""gated-linear: a gated activation read only by a linear layer fuses into it (`gated_linear`)."""

from __future__ import annotations

from dataclasses import dataclass

from kiln.ir.graph import Graph, Node
from kiln.ir.ops.kernels import GATES
from kiln.passes.base import Pass, make
from kiln.passes.patterns import sole_users, substitute_matches


def _match(n: Node, sole: dict[Node, Node | None]) -> tuple[Node, Node] | None:
    """(n, get_result 0 of gated_linear) for n = linear(gate(x), w[, b]) with [N, K] weights and
    gate(x) read by n alone, else None."""
    if n.op != "linear" or n.attrs.get("weight_layout", "out_in") != "out_in":
        return None
    h = n.inputs[0]
    if h.op not in GATES or sole.get(h) is not n or n.inputs[1:].count(h):
        return None
    attrs = {"gate": h.op, **({"approximate": h.attrs["approximate"]} if "approximate" in h.attrs else {})}
    return n, make("get_result", [make("gated_linear", [h.inputs[0], *n.inputs[1:]], **attrs)], index=0)


@dataclass(frozen=True)
class GatedLinear(Pass):
    """Matches: linear(silu_and_mul(x) | gelu_and_mul(x), w[, b]) with an out_in weight, the
    activation read by nothing else (the MLP's down projection). Emits: get_result 0 of
    gated_linear(x, w[, b]) {gate, approximate?}. Its second result, the activation, is written
    only by a kernel that does not fuse it (the cuda target's batch-1 GEMV reads [gate | up] and
    never writes the activation; larger steps write it and run the GEMM)."""

    name = "gated-linear"

    def apply(self, graph: Graph) -> Graph:
        sole = sole_users(graph)
        return substitute_matches(graph, (_match(n, sole) for n in graph.nodes))
