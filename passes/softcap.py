"""softcap: tanh(x / c) * c (logit soft-capping) becomes one `softcap` op."""

from __future__ import annotations

from dataclasses import dataclass

from kiln.ir.graph import Graph, Node
from kiln.passes.base import Pass, make
from kiln.passes.patterns import commuted, scalar, substitute_matches


def _capped(inner: Node, cap: float) -> Node | None:
    """x when inner = x / cap, or x * (1 / cap) (either order), else None."""
    if inner.op == "div" and scalar(inner.inputs[1]) == cap:
        return inner.inputs[0]
    for x, r in commuted(inner, "mul"):
        if scalar(r) == 1.0 / cap:
            return x
    return None


def _match(n: Node) -> tuple[Node, Node] | None:
    """(n, softcap(x) {cap}) for n = tanh(x / cap) * cap, else None."""
    for t, c in commuted(n, "mul"):
        cap = scalar(c)
        if t.op != "tanh" or not cap:
            continue
        x = _capped(t.inputs[0], cap)
        if x is not None:
            return n, make("softcap", [x], cap=cap)
    return None


@dataclass(frozen=True)
class Softcap(Pass):
    """Matches: mul(tanh(div(x, c)), c) or mul(tanh(mul(x, 1/c)), c), operands of mul in
    either order, c a scalar constant (Gemma2's final-logit soft-capping; the attention
    soft-cap is already an attribute of `attention`). Emits: softcap(x) {cap: c}, computed as
    tanh(x / c) * c (for the reciprocal form that differs from x * (1/c) by the rounding of 1/c)."""

    name = "softcap"

    def apply(self, graph: Graph) -> Graph:
        return substitute_matches(graph, (_match(n) for n in graph.nodes))
