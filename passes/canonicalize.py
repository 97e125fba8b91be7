"""canonicalize: the traced graph in kiln's canonical form."""

from __future__ import annotations

from dataclasses import dataclass

from kiln.ir.graph import Graph, Node
from kiln.passes.base import Pass
from kiln.passes.batch_dim import drop_batch_axis


def _same_shape(a: Node, b: Node) -> bool:
    return a.type.same_as(b.type)


def _fold(n: Node) -> Node | None:
    x = n.inputs[0] if n.inputs else None
    if n.op in ("reshape", "expand", "cast", "dropout") and _same_shape(n, x):
        return x  # no-op view, cast to the same dtype, inference dropout
    if n.op == "reshape" and x.op == "reshape":
        inner = x.inputs[0]
        return inner if _same_shape(n, inner) else n.replace(inputs=x.inputs)
    if n.op == "permute":
        if n.attrs["dims"] == list(range(n.type.rank)):
            return x
        if x.op == "permute":
            dims = [x.attrs["dims"][d] for d in n.attrs["dims"]]
            inner = x.inputs[0]
            return inner if dims == list(range(len(dims))) else n.replace(inputs=x.inputs, attrs={"dims": dims})
    if n.op == "slice" and n.attrs["start"] == 0 and n.attrs["step"] == 1 and _same_shape(n, x):
        return x
    if n.op == "cat" and len(n.inputs) == 1:
        return x
    if n.op == "mul":
        for a, b in (n.inputs, n.inputs[::-1]):
            if b.is_scalar_const and b.attrs["value"] == 1 and _same_shape(n, a):
                return a
    return None


@dataclass(frozen=True)
class Canonicalize(Pass):
    """Matches: the traced batch axis of size 1 on every value derived from input_ids; no-op
    reshapes/expands/casts/slices/permutes, reshape-of-reshape and permute-of-permute chains,
    multiplication by the constant 1, dropout (identity at inference).
    Emits: the same computation on flattened tokens ([T, ...]) with those folded away."""

    name = "canonicalize"

    def apply(self, graph: Graph) -> Graph:
        graph = drop_batch_axis(graph)
        return graph.rewrite(_fold)
