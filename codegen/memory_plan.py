"""Memory planning: liveness of every value and buffer slots reused across non-overlapping
lifetimes (greedy interval colouring in execution order)."""

from __future__ import annotations

from dataclasses import dataclass

import sympy

from kiln.ir.dims import from_expr, to_expr
from kiln.ir.graph import Graph, Node

# Ops whose result may alias their first operand's storage.
VIEW_OPS = frozenset({"reshape", "permute", "expand", "slice"})


@dataclass
class MemoryPlan:
    """Where each value lives."""

    slot: dict[Node, int]
    """Value -> buffer slot."""
    free_after: dict[Node, list[Node]]
    """Op node -> values whose last reader it is."""
    slot_bytes: list[str]
    """Per slot, bytes of the largest value it holds (a symbolic expression)."""


def _bytes(n: Node) -> sympy.Expr:
    total = sympy.Integer(0)
    for t in n.type.types:
        size = sympy.Rational(t.itemsize)
        for d in t.shape:
            size = size * to_expr(d)
        total += size
    return total


def plan_memory(graph: Graph) -> MemoryPlan:
    """Assign slots: sources (inputs, params, consts) get their own; op results reuse the slot
    of a value that died at an earlier step. Graph outputs are never freed."""
    end = len(graph.nodes)
    last_use: dict[Node, int] = {o: end for o in graph.outputs}
    for i, n in enumerate(graph.nodes):
        for x in n.inputs:
            last_use[x] = max(last_use.get(x, i), i)
    # A view shares its base's storage: the base lives as long as any view of it.
    for n in reversed(graph.nodes):
        if n.op in VIEW_OPS and n in last_use:
            base = n.inputs[0]
            last_use[base] = max(last_use[base], last_use[n])
    outputs = set(graph.outputs)
    dies_at: dict[int, list[Node]] = {}
    for x, last in last_use.items():
        if x not in outputs:
            dies_at.setdefault(last, []).append(x)
    slot: dict[Node, int] = {}
    free_after: dict[Node, list[Node]] = {}
    sizes: list[sympy.Expr] = []
    pool: list[int] = []
    for i, n in enumerate(graph.nodes):
        if n.op in ("input", "param", "const") or not pool:
            slot[n] = len(sizes)
            sizes.append(_bytes(n))
        else:
            slot[n] = pool.pop()
            sizes[slot[n]] = sympy.Max(sizes[slot[n]], _bytes(n))
        dead = dies_at.get(i, [])
        if n.op not in ("input", "param", "const"):
            free_after[n] = dead
            # Only intermediate results give their slot back; sources stay resident.
            pool.extend(slot[x] for x in dead if x.op not in ("input", "param", "const"))
    return MemoryPlan(slot, free_after, [str(from_expr(s)) if not isinstance(s, sympy.Max) else str(s) for s in sizes])
