"""fuse-elementwise: groups of generic elementwise ops become one `fused_elementwise` op."""

from __future__ import annotations

import heapq
from dataclasses import dataclass

from kiln.ir.graph import Graph, Node
from kiln.ir.types import TensorType
from kiln.passes.base import Pass, make

FLOATS = ("float32", "float16", "bfloat16")
UNARY = ("gelu", "relu", "tanh", "sigmoid", "silu", "neg", "exp", "clamp")
BINARY = ("add", "sub", "mul", "div", "pow")
MAX_INPUTS = 8
"""Tensor operands a group reads at most (kiln.kernels.tvm_kernels.fused.MAX_INPUTS)."""


def _broadcast(t: TensorType, out: TensorType) -> bool:
    """Whether an operand of type t feeds a result of type out elementwise: out's shape, one value
    per row (out's shape with a last dim of 1) or one element, in out's dtype."""
    if t.dtype != out.dtype:
        return False
    if tuple(t.shape) == tuple(out.shape) or all(d == 1 for d in t.shape):
        return True
    return t.rank == out.rank and tuple(t.shape[:-1]) == tuple(out.shape[:-1]) and t.shape[-1] == 1


def _number(n: Node) -> bool:
    return n.is_scalar_const and isinstance(n.attrs["value"], int | float) and not isinstance(n.attrs["value"], bool)


def fusible(n: Node) -> bool:
    """Whether n is an elementwise op a fused kernel computes: a float result of rank >= 1 whose
    operands are each a tensor that broadcasts to it (_broadcast) or a scalar constant, one of
    them of the result's shape; pow with a constant exponent, div without a rounding mode, gelu
    exact or tanh, clamp between constants."""
    out = n.type
    if not isinstance(out, TensorType) or out.dtype not in FLOATS or not out.shape:
        return False
    if not ((n.op in UNARY and len(n.inputs) == 1) or (n.op in BINARY and len(n.inputs) == 2)):
        return False
    tensors = [x for x in n.inputs if not x.is_scalar_const]
    if not all(_number(x) for x in n.inputs if x.is_scalar_const):
        return False
    if not all(isinstance(x.type, TensorType) and _broadcast(x.type, out) for x in tensors):
        return False
    if not any(x.type.same_as(out) for x in tensors):
        return False
    if n.op == "pow":
        return _number(n.inputs[1]) and n.inputs[0].type.same_as(out)
    if n.op == "div":
        return n.attrs.get("rounding_mode") is None
    if n.op == "gelu":
        return n.attrs.get("approximate", "none") in ("none", "tanh")
    if n.op == "clamp":
        return all(isinstance(n.attrs.get(b), int | float | None) for b in ("min", "max"))
    return True


def _groups(graph: Graph) -> list[list[Node]]:
    """Maximal single-result groups: from each fusible node not yet taken (last first), the
    fusible producers of its type whose every reader is in the group, in topological order."""
    index = {n: i for i, n in enumerate(graph.nodes)}
    users = graph.users()
    outputs = set(graph.outputs)
    taken: set[Node] = set()
    groups = []
    for root in reversed(graph.nodes):
        if root in taken or not fusible(root):
            continue
        group, inputs = {root}, {x for x in root.inputs if not x.is_scalar_const}
        # Visit candidates from the latest: a node's readers all come after it, so they are
        # decided (in the group or not) before it is.
        heap = [(-index[x], id(x), x) for x in dict.fromkeys(root.inputs)]
        heapq.heapify(heap)
        while heap:
            _, _, p = heapq.heappop(heap)
            if (p in taken or p in group or p in outputs or not fusible(p) or not p.type.same_as(root.type)
                    or not all(u in group for u in users[p])):
                continue
            grown = (inputs - {p}) | {x for x in p.inputs if not x.is_scalar_const}
            if len(grown) > MAX_INPUTS:
                continue
            group.add(p)
            inputs = grown
            for x in dict.fromkeys(p.inputs):
                heapq.heappush(heap, (-index[x], id(x), x))
        taken |= group
        if len(group) > 1:
            groups.append(sorted(group, key=index.__getitem__))
    return groups


def _fused(group: list[Node]) -> Node:
    """fused_elementwise over the group's outside operands, its steps in the group's order."""
    step = {n: f"v{j}" for j, n in enumerate(group)}
    inputs: dict[Node, str] = {}
    expr = []
    for n in group:
        args = []
        for x in n.inputs:
            if x in step:
                args.append(step[x])
            elif x.is_scalar_const:
                args.append(x.attrs["value"])
            else:
                args.append(inputs.setdefault(x, f"x{len(inputs)}"))
        expr.append([n.op, args, dict(n.attrs)])
    return make("fused_elementwise", list(inputs), expr=expr)


@dataclass(frozen=True)
class FuseElementwise(Pass):
    """Matches: connected groups of at least two elementwise ops that no kernel-set pattern took
    (add, sub, mul, div, pow by a constant, gelu, relu, tanh, sigmoid, silu, neg, exp, clamp)
    over float tensors of one type, whose operands are tensors of that type, one value per row
    ([.., 1]), one-element tensors or scalar constants, and whose intermediate values nothing
    outside the group reads (nor the graph returns); at most 8 tensor operands. Emits: one
    fused_elementwise(operands) {expr: the steps in order} per group, for its last value (gpt2's
    written-out tanh GELU, 8 ops, becomes one)."""

    name = "fuse-elementwise"

    def apply(self, graph: Graph) -> Graph:
        replace = {}
        for group in _groups(graph):
            fused = _fused(group)
            if fused.type.same_as(group[-1].type):
                replace[group[-1]] = fused
        return graph.substitute(replace) if replace else graph
