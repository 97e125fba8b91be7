"""Dropping the traced batch axis (size 1) from every value that carries it.

Tracing runs transformers with input_ids [1, T]; kiln's calling convention is one flattened
batch, input_ids [T]. Removing a size-1 axis never changes values, only where consumers look:
each rule below says how an op's attributes move when an operand lost axis `b`. An op with no
rule gets the axis back through a reshape, so the result is always correct, at worst not
fully canonical.
"""

from __future__ import annotations

from kiln.ir.dims import symbols
from kiln.ir.graph import Graph, Node
from kiln.ir.ops import get_op
from kiln.passes.base import make


def _without(shape: tuple, axis: int) -> list:
    return [d for i, d in enumerate(shape) if i != axis]


def _squeeze(x: Node, axis: int) -> Node:
    return make("reshape", [x], shape=_without(x.type.shape, axis))


class _Dropper:
    def __init__(self) -> None:
        self.new: dict[Node, Node] = {}
        self.axis: dict[Node, int | None] = {}

    def restore(self, old: Node) -> Node:
        """The new value with its batch axis put back (the old shape)."""
        m = self.new[old]
        return m if self.axis[old] is None else make("reshape", [m], shape=list(old.type.shape))

    def visit(self, n: Node) -> None:
        ins = [self.new[i] for i in n.inputs]
        axes = [self.axis[i] for i in n.inputs]
        if n.op == "input":
            drop = n.type.rank >= 2 and n.type.shape[0] == 1
            self.new[n] = n.replace(type=n.type.__class__(n.type.dtype, n.type.shape[1:])) if drop else n
            self.axis[n] = 0 if drop else None
            return
        if all(a is None for a in axes) and n.op != "reshape":
            self.new[n] = n if all(a is b for a, b in zip(ins, n.inputs, strict=True)) else n.replace(inputs=tuple(ins))
            self.axis[n] = None
            return
        result = self._rule(n, ins, axes)
        if result is None:  # no rule: give every operand its axis back, keep the op as it was
            self.new[n] = n.replace(inputs=tuple(self.restore(i) for i in n.inputs))
            self.axis[n] = None
        else:
            self.new[n], self.axis[n] = result

    def _aligned(self, n: Node, ins: list[Node], axes: list[int | None], skip_last: int = 0):
        """Broadcasting operands: the output axis the batch maps to, operands squeezed to match."""
        r = n.type.rank
        outs = {a + r - i.type.rank for i, a in zip(n.inputs, axes, strict=True) if a is not None}
        if len(outs) != 1:
            return None
        b = outs.pop()
        if b >= r - skip_last:
            return None
        fixed = []
        for old, new, a in zip(n.inputs, ins, axes, strict=True):
            j = b - (r - old.type.rank)
            if a is None and j >= 0 and old.type.rank - skip_last > j:
                if old.type.shape[j] != 1:
                    return None
                new = _squeeze(new, j)
            fixed.append(new)
        return fixed, b

    def _rule(self, n: Node, ins: list[Node], axes: list[int | None]) -> tuple[Node, int | None] | None:
        op = get_op(n.op)
        a = n.attrs
        if n.op == "embedding" and axes[0] is None:
            return make("embedding", ins), axes[1]
        if n.op == "attention" and axes[:3] == [0, 0, 0] and all(x is None for x in axes[3:]):
            return make("attention", ins, **a), 0
        if op.kind == "elementwise" or n.op == "matmul":
            got = self._aligned(n, ins, axes, skip_last=2 if n.op == "matmul" else 0)
            if got is None:
                return None
            fixed, b = got
            return make(n.op, fixed, **a), b
        b = axes[0]
        if n.op == "reshape":
            shape = a["shape"]
            has_tokens = any(symbols(d) for d in n.type.shape)
            lead_one = len(shape) >= 2 and n.type.shape[0] == 1  # written as 1 or as -1
            if b == 0 and lead_one or b is None and lead_one and has_tokens:
                return make("reshape", ins, shape=shape[1:]), 0
            if b == 0:
                return make("reshape", ins, shape=shape), None
            return None
        if b is None or any(x is not None and x != b for x in axes):
            return None
        rank = n.inputs[0].type.rank
        if op.kind == "reduce":
            red = [d % rank for d in a["dims"]]
            if b in red:
                return None
            dims = [d - (d > b) for d in red]
            out_b = b if a["keepdim"] else b - sum(d < b for d in red)
            return make(n.op, ins, **{**a, "dims": dims}), out_b
        if op.kind == "dim":
            a = {**a, "dim": a["dim"] % rank}
            if a["dim"] == b:
                return None
            fixed = [
                _squeeze(new, b) if x is None and old.type.rank == n.inputs[0].type.rank else new
                for old, new, x in zip(n.inputs, ins, axes, strict=True)
            ]
            out_b = b
            if n.op in ("argmax", "max_dim") and not a["keepdim"] and a["dim"] < b:
                out_b = b - 1
            return make(n.op, fixed, **{**a, "dim": a["dim"] - (a["dim"] > b)}), out_b
        if n.op == "permute":
            dims = [d - (d > b) for d in a["dims"] if d != b]
            return make("permute", ins, dims=dims), a["dims"].index(b)
        if n.op == "expand":
            out_b = b + n.type.rank - n.inputs[0].type.rank
            if n.type.shape[out_b] != 1:  # the expand copies along the batch axis
                return None
            return make("expand", ins, shape=_without(tuple(a["shape"]), out_b)), out_b
        if n.op == "linear" and b < n.inputs[0].type.rank - 1 and all(x is None for x in axes[1:]):
            return make("linear", ins), b
        if n.op in ("layer_norm", "rms_norm") and b < n.inputs[0].type.rank - len(a["normalized_shape"]):
            if all(x is None for x in axes[1:]):
                return make(n.op, ins, **a), b
        return None


def drop_batch_axis(graph: Graph) -> Graph:
    """The graph with the leading size-1 axis of its inputs removed throughout."""
    d = _Dropper()
    for n in graph.nodes:
        d.visit(n)
    outputs = []
    for o in graph.outputs:
        m = d.new[o]
        if d.axis[o] is None and m.type.rank >= 2 and m.type.shape[0] == 1:
            m = _squeeze(m, 0)
        outputs.append(m)
    return graph.with_nodes([d.new[n] for n in graph.inputs], outputs)
