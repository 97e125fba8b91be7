"""Memory planning: which results are views of other storage, the liveness of every storage,
and arena slots reused across non-overlapping lifetimes (greedy interval colouring in
execution order).

Storage and aliases:

    input / param / const   their own storage, never in the arena
    op result               one arena buffer per result (a multi-result op has several)
    reshape/permute/expand/slice   a view of its operand when torch can view it at the
                            operand's layout (checked on meta tensors), else an op result
    get_result              the projected result's buffer
    in-place write result   the written operand's buffer

A storage lives until the last reader of any alias of it (views keep their base alive).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from kiln.ir.dims import evaluate, shape_symbols
from kiln.ir.graph import SOURCE_OPS, Graph, Node
from kiln.ir.ops import get_op, resolve_attrs
from kiln.ir.types import PACKED, TensorType, torch_dtype

# Ops whose result may be a view of their first operand's storage.
VIEW_OPS = frozenset({"reshape", "permute", "expand", "slice"})

# Two sets of probe sizes (distinct primes, as the type rules use): a reshape is a view only
# when torch can view it at both.
_PROBES = ((1009, 101), (1201, 89))


@dataclass
class Storage:
    """A buffer of the plan before numbering: a source, an arena result, or a view."""

    node: Node
    """The node that made it."""
    index: int
    """Which result of that node."""
    kind: str
    """input | param | const | arena | view."""
    type: TensorType
    base: Storage | None = None
    """The viewed storage (view)."""
    slot: int | None = None
    """Arena slot (arena)."""

    @property
    def root(self) -> Storage:
        """The storage that owns the memory (a view's ultimate base)."""
        s = self
        while s.base is not None:
            s = s.base
        return s


@dataclass
class MemoryPlan:
    """Where each value lives."""

    buffers: list[Storage]
    """Every storage and view, in execution order (a view after its base)."""
    values: dict[Node, list[Storage]]
    """Node -> its results' storages (a projection or in-place result: the aliased one)."""
    slots: list[list[Storage]] = field(default_factory=list)
    """Per arena slot, the buffers it holds over the run."""


def _meta(t: TensorType, bindings: dict[str, int]) -> torch.Tensor:
    shape = [evaluate(d, bindings) for d in t.shape]
    if t.dtype in PACKED and shape:
        shape[-1] //= PACKED[t.dtype]
    return torch.empty(shape, dtype=torch_dtype(t.dtype), device="meta")


def _view(n: Node, base: torch.Tensor, bindings: dict[str, int]) -> torch.Tensor | None:
    attrs = resolve_attrs(get_op(n.op), n.attrs, bindings)
    if n.op == "reshape":
        try:
            return base.view(attrs["shape"])
        except RuntimeError:
            return None
    return get_op(n.op).impl(base, **attrs)


def plan_memory(graph: Graph) -> MemoryPlan:
    """Classify every result (source, arena, view, alias) and assign arena slots: an op's
    results take slots freed by values that died at an earlier step, never the slot of one of
    its own operands. Graph outputs are never freed."""
    syms = shape_symbols([t.shape for n in graph.nodes for t in n.type.types])
    probes = [{s: base + step * i for i, s in enumerate(syms)} for base, step in _PROBES]
    values: dict[Node, list[Storage]] = {}
    metas: dict[int, list[torch.Tensor]] = {}
    buffers: list[Storage] = []

    def new(n: Node, i: int, kind: str, t: TensorType, base: Storage | None, meta: list[torch.Tensor]) -> Storage:
        s = Storage(n, i, kind, t, base)
        buffers.append(s)
        metas[id(s)] = meta
        return s

    for n in graph.nodes:
        if n.op in SOURCE_OPS:
            values[n] = [new(n, 0, n.op, n.type, None, [_meta(n.type, b) for b in probes])]
        elif n.op == "get_result":
            values[n] = [values[n.inputs[0]][n.attrs["index"]]]
        elif n.writes:  # the written operands, then any fresh results (see OpDef.writes)
            values[n] = [values[x][0] for x in n.writes] + [
                new(n, i, "arena", t, None, [_meta(t, b) for b in probes])
                for i, t in enumerate(n.type.types) if i >= len(n.writes)
            ]
        elif n.op in VIEW_OPS:
            base = values[n.inputs[0]][0]
            views = [_view(n, m, b) for m, b in zip(metas[id(base)], probes, strict=True)]
            if all(v is not None for v in views):
                values[n] = [new(n, 0, "view", n.type, base, views)]
            else:
                values[n] = [new(n, 0, "arena", n.type, None, [_meta(n.type, b) for b in probes])]
        else:
            values[n] = [
                new(n, i, "arena", t, None, [_meta(t, b) for b in probes]) for i, t in enumerate(n.type.types)
            ]
    plan = MemoryPlan(buffers, values)
    _assign_slots(graph, plan)
    return plan


def _assign_slots(graph: Graph, plan: MemoryPlan) -> None:
    end = len(graph.nodes)
    last: dict[int, int] = {}
    for i, n in enumerate(graph.nodes):
        for s in plan.values[n]:
            last.setdefault(id(s.root), i)
        for x in n.inputs:
            for s in plan.values[x]:
                last[id(s.root)] = i
    for o in graph.outputs:
        for s in plan.values[o]:
            last[id(s.root)] = end
    dies_at: dict[int, list[Storage]] = {}
    for s in plan.buffers:
        if s.kind == "arena":
            dies_at.setdefault(last[id(s)], []).append(s)
    pool: list[int] = []
    for i, n in enumerate(graph.nodes):
        for s in plan.values[n]:
            if s.kind == "arena" and s.node is n and s.slot is None:
                s.slot = pool.pop() if pool else len(plan.slots)
                if s.slot == len(plan.slots):
                    plan.slots.append([])
                plan.slots[s.slot].append(s)
        pool.extend(s.slot for s in dies_at.get(i, []))
