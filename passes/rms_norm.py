"""rms-norm: the hand-written RMSNorm of transformers' modules becomes one `rms_norm` op."""

from __future__ import annotations

from dataclasses import dataclass

from kiln.ir.graph import Graph, Node
from kiln.ir.types import FLOAT_DTYPES
from kiln.passes.base import Pass, make
from kiln.passes.patterns import (
    WeightFactor,
    centred,
    scaled_by_rms,
    sole_users,
    substitute_matches,
    weight_factor,
)


def _norm(x: Node, eps: float, scale: WeightFactor | None, weight_fp32: bool) -> Node:
    weight = [scale.weight] if scale else []
    return make("rms_norm", [x, *weight], normalized_shape=[x.type.shape[-1]], eps=eps,
                offset=scale.offset if scale else 0.0, weight_fp32=weight_fp32)


def _match(y: Node, users: dict[Node, Node | None]) -> tuple[Node, Node] | None:
    """(the node the norm ends at, its rms_norm) for y = the normalised float32 value."""
    stats = scaled_by_rms(y)
    if stats is None or stats[0].type.dtype != "float32" or centred(stats[0]) is not None:
        return None  # a centred value is a LayerNorm's: layer-norm's to match
    x32, eps = stats
    x = x32.inputs[0] if x32.op == "cast" and x32.inputs[0].type.dtype in FLOAT_DTYPES else x32
    size, nxt = x.type.shape[-1], users.get(y)
    if not isinstance(size, int):
        return None
    if x.type.dtype == "float32":
        scale = weight_factor(nxt, y, size)
        if scale is None:
            return y, _norm(x, eps, None, False)
        return nxt, _norm(x, eps, scale, scale.in_fp32)
    if nxt is not None and nxt.op == "cast" and nxt.type.dtype == x.type.dtype:
        # Llama: cast back to x's dtype, then times the weight in that dtype
        scale = weight_factor(users.get(nxt), nxt, size)
        if scale is None or scale.in_fp32:
            return nxt, _norm(x, eps, None, False)
        return users[nxt], _norm(x, eps, scale, False)
    # Gemma (1 + w), OLMo2 (w): times the weight in float32, then cast back
    scale = weight_factor(nxt, y, size)
    if scale is None or not (scale.in_fp32 or scale.offset == 0 or scale.weight.type.dtype == "float32"):
        return None  # an offset added in the weight's own low precision: not rms_normalize's
    end = users.get(nxt)
    if end is None or end.op != "cast" or end.type.dtype != x.type.dtype:
        return None
    return end, _norm(x, eps, scale, True)


@dataclass(frozen=True)
class RmsNorm(Pass):
    """Matches: RMSNorm over the last axis as transformers' modules write it,
    x32 * rsqrt(mean(x32 ** 2) + eps) with x32 = x cast to float32 (or x itself in float32),
    then one of: cast back and times the weight (Llama, per-head q/k norms of Qwen3); times
    (1 + w) in float32 and cast back (Gemma, Gemma3 q/k norms); times w in float32 and cast
    back (OLMo2); nothing but the cast back (no weight). Emits: `rms_norm(x[, w])` with
    offset/weight_fp32 set so that it computes bit for bit what the graph computed."""

    name = "rms-norm"

    def apply(self, graph: Graph) -> Graph:
        users = sole_users(graph)
        return substitute_matches(graph, (_match(n, users) for n in graph.nodes))
