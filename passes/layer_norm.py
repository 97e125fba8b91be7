"""layer-norm: a hand-written LayerNorm (Cohere's, computed in float32) becomes one `layer_norm` op."""

from __future__ import annotations

from dataclasses import dataclass

from kiln.ir.graph import Graph, Node
from kiln.ir.types import FLOAT_DTYPES
from kiln.passes.base import Pass, make, weight_only
from kiln.passes.patterns import (
    centred,
    commuted,
    scaled_by_rms,
    sole_users,
    substitute_matches,
    weight_factor,
)


def _bias(n: Node | None, y: Node, size: int) -> Node | None:
    """b when n = y + b (either order), b a weight-only [size] vector (cast to float32 or not)."""
    for a, b in commuted(n, "add") if n is not None else ():
        raw = b.inputs[0] if b.op == "cast" and b.type.dtype == "float32" else b
        if a is y and weight_only(raw) and raw.type.rank == 1 and raw.type.shape[0] == size:
            return raw
    return None


def _match(y: Node, users: dict[Node, Node | None]) -> tuple[Node, Node] | None:
    """(the node the LayerNorm ends at, its layer_norm) for y = the normalised float32 value."""
    stats = scaled_by_rms(y)
    a = centred(stats[0]) if stats is not None else None
    if a is None or a.type.dtype != "float32":
        return None
    x = a.inputs[0] if a.op == "cast" and a.inputs[0].type.dtype in FLOAT_DTYPES else a
    size = x.type.shape[-1]
    if not isinstance(size, int):
        return None
    end, operands = y, []
    scale = weight_factor(users.get(end), end, size)
    weighted = scale is not None and scale.offset == 0
    if weighted:
        end, operands = users[end], [scale.weight]
    bias = _bias(users.get(end), end, size)
    if bias is not None:
        end, operands = users[end], [*operands, bias]
    if x.type.dtype != "float32":
        cast = users.get(end)
        if cast is None or cast.op != "cast" or cast.type.dtype != x.type.dtype:
            return None
        end = cast
    if any(o.type.dtype != x.type.dtype for o in operands):
        return None
    ln = make("layer_norm", [x, *operands], normalized_shape=[size], eps=stats[1],
              has_weight=weighted, has_bias=bias is not None)
    return end, ln


@dataclass(frozen=True)
class LayerNorm(Pass):
    """Matches: LayerNorm over the last axis written out as transformers' modules do (Cohere):
    a = x cast to float32 (or x in float32), d = a - mean(a), d * rsqrt(mean(d ** 2) + eps),
    then optionally times the weight and plus the bias (each cast to float32 or not), then the
    cast back to x's dtype. Emits: `layer_norm(x[, w][, b])` in x's dtype. Not bit-exact: the
    op's kernel may compute mean and variance in another order (float32 rounding, far inside
    --verify's tolerance)."""

    name = "layer-norm"

    def apply(self, graph: Graph) -> Graph:
        users = sole_users(graph)
        return substitute_matches(graph, (_match(n, users) for n in graph.nodes))
