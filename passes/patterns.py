"""Matching helpers the kernel-set passes share: operand orders, scalar constants, sole users."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from kiln.ir.graph import Graph, Node
from kiln.passes.base import weight_only


def scalar(n: Node) -> float | None:
    """The value of a scalar constant operand (`add(%x, 1e-06)`), else None."""
    return float(n.attrs["value"]) if n.is_scalar_const else None


def commuted(n: Node, op: str) -> Iterator[tuple[Node, Node]]:
    """Both operand orders of a binary `op` node; nothing when n is another op."""
    if n.op == op and len(n.inputs) == 2:
        a, b = n.inputs
        yield a, b
        yield b, a


def on_last_axis(n: Node, attr: str) -> bool:
    """Whether the node's axis attribute (`dim`, or a one-element `dims`) names its input's last axis."""
    rank = n.inputs[0].type.rank
    axes = n.attrs[attr] if isinstance(n.attrs[attr], list) else [n.attrs[attr]]
    return rank > 0 and len(axes) == 1 and axes[0] % rank == rank - 1


def scaled_by_rms(n: Node) -> tuple[Node, float] | None:
    """(v, eps) when n = v * rsqrt(mean(v ** 2 over the last axis, keepdim) + eps): the
    normalisation step shared by RMSNorm (v = x) and LayerNorm (v = x - mean(x))."""
    for v, r in commuted(n, "mul"):
        if r.op != "rsqrt":
            continue
        for m, eps in commuted(r.inputs[0], "add"):
            if scalar(eps) is None or m.op != "mean" or not on_last_axis(m, "dims") or not m.attrs["keepdim"]:
                continue
            p = m.inputs[0]
            if p.op == "pow" and p.inputs[0] is v and scalar(p.inputs[1]) == 2:
                return v, scalar(eps)
    return None


def centred(x: Node) -> Node | None:
    """a when x = a - mean(a over the last axis, keepdim) (a LayerNorm's centring), else None."""
    if x.op != "sub":
        return None
    a, m = x.inputs
    if m.op == "mean" and m.inputs[0] is a and on_last_axis(m, "dims") and m.attrs["keepdim"]:
        return a
    return None


def substitute_matches(graph: Graph, found: Iterable[tuple[Node, Node] | None]) -> Graph:
    """graph.substitute of every (old, new) match whose new value has old's type; the graph
    itself when nothing matched."""
    replace = {old: new for old, new in filter(None, found) if new.type.same_as(old.type)}
    return graph.substitute(replace) if replace else graph


def sole_users(graph: Graph) -> dict[Node, Node | None]:
    """Each node's only reader; None where it has several, none, or is also a graph output
    (a rewrite may then absorb a value into a fused op without computing it twice)."""
    out: dict[Node, Node | None] = {}
    count: dict[Node, int] = dict.fromkeys(graph.outputs, 1)
    for n in graph.nodes:
        for i in dict.fromkeys(n.inputs):
            count[i] = count.get(i, 0) + 1
            out[i] = n
    return {n: u if count[n] == 1 else None for n, u in out.items()}


@dataclass(frozen=True)
class WeightFactor:
    """A matched weight factor: weight, offset + weight, or either on the weight cast to float32."""

    weight: Node
    """The weight-only vector [D]."""
    offset: float
    """The constant added to it (Gemma's 1; 0 when none)."""
    in_fp32: bool
    """Whether the weight is cast to float32 before the offset and the product."""


def weight_factor(n: Node | None, y: Node, size: object) -> WeightFactor | None:
    """The weight factor when n = y * factor (either order) with factor (cast(w)) (+ c), w a
    weight-only [size] vector."""
    if n is None:
        return None
    for a, f in commuted(n, "mul"):
        if a is not y:
            continue
        offset = 0.0
        for b, c in commuted(f, "add"):
            if scalar(c) is not None:
                f, offset = b, scalar(c)
                break
        in_fp32 = f.op == "cast" and f.type.dtype == "float32"
        w = f.inputs[0] if in_fp32 else f
        if weight_only(w) and w.type.rank == 1 and w.type.shape[0] == size:
            return WeightFactor(w, offset, in_fp32)
    return None
