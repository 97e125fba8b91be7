"""The graph IR: one node type (an SSA value), and a graph of nodes in topological order."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from kiln.ir.types import TensorType, ValueType

# Node kinds that are not registered ops: they introduce values instead of computing them.
SOURCE_OPS = frozenset({"input", "param", "const"})


@dataclass(frozen=True, slots=True, eq=False)
class Node:
    """One SSA value: an op applied to earlier values. Identity is the object itself."""

    op: str
    """A registered op name, or "input" / "param" / "const"."""
    inputs: tuple[Node, ...]
    """Operand values, in the op's schema order."""
    attrs: dict[str, Any]
    """JSON-serializable attributes (never mutated after construction)."""
    type: ValueType
    """The value's dtype and shape (a TupleType for an op with several results)."""

    def replace(self, **changes: Any) -> Node:
        """A copy with some fields changed."""
        return dataclasses.replace(self, **changes)

    @property
    def name(self) -> str | None:
        """The name of an input or param node."""
        return self.attrs.get("name")

    @property
    def is_scalar_const(self) -> bool:
        return self.op == "const" and self.type.shape == ()

    @property
    def writes(self) -> tuple[Node, ...]:
        """The operands this node writes in place (its op's declared side effects)."""
        if self.op in SOURCE_OPS:
            return ()
        from kiln.ir.ops import get_op  # the registry imports this module's types

        return tuple(self.inputs[i] for i in get_op(self.op).writes)


def input_node(name: str, type: TensorType) -> Node:
    """A graph input bound by the caller at run time."""
    return Node("input", (), {"name": name}, type)


def param_node(name: str, type: TensorType) -> Node:
    """A weight, read by name from the artifact's (or checkpoint's) safetensors."""
    return Node("param", (), {"name": name}, type)


def const_node(value: Any, type: TensorType) -> Node:
    """A literal: a Python scalar for rank 0, a nested list otherwise."""
    return Node("const", (), {"value": value}, type)


@dataclass
class Graph:
    """A whole program: nodes in topological order (sources included) and the output values."""

    nodes: list[Node]
    """Every node, each after its inputs."""
    outputs: list[Node]
    """The values the graph returns, in order."""
    meta: dict[str, Any] = field(default_factory=dict)
    """Facts about the source model (model_type, vocab size, ...), carried through passes."""

    @property
    def inputs(self) -> list[Node]:
        return [n for n in self.nodes if n.op == "input"]

    @property
    def params(self) -> list[Node]:
        return [n for n in self.nodes if n.op == "param"]

    def input(self, name: str) -> Node:
        """The input node of that name (KeyError when absent)."""
        for n in self.inputs:
            if n.name == name:
                return n
        raise KeyError(f"graph has no input '{name}'")

    def users(self) -> dict[Node, list[Node]]:
        """For each node, the nodes that read it (graph outputs are not listed)."""
        out: dict[Node, list[Node]] = {n: [] for n in self.nodes}
        for n in self.nodes:
            for i in n.inputs:
                out[i].append(n)
        return out

    def ops(self) -> list[Node]:
        """The computing nodes (no inputs, params or consts)."""
        return [n for n in self.nodes if n.op not in SOURCE_OPS]

    def with_nodes(self, inputs: Iterable[Node], outputs: list[Node], effects: Iterable[Node] = ()) -> Graph:
        """A graph of `inputs` (kept, in order: the calling convention), everything the
        outputs and the in-place writers in `effects` depend on, topologically sorted; other
        nodes are dropped. (A write is kept even when no output reads its result.)"""
        order: list[Node] = list(inputs)
        seen = set(order)
        for root in [*outputs, *effects]:
            _visit(root, seen, order)
        return Graph(order, list(outputs), dict(self.meta))

    def effects(self) -> list[Node]:
        """The nodes that write an operand in place."""
        return [n for n in self.nodes if n.writes]

    def with_inputs(self, inputs: Iterable[Node]) -> Graph:
        """The same program with its inputs in this order (the calling convention)."""
        return self.with_nodes(inputs, self.outputs, self.effects())

    def dce(self) -> Graph:
        """The graph without values that neither an output nor an in-place write needs."""
        return self.with_nodes(self.inputs, self.outputs, self.effects())

    def rewrite(self, fn: Callable[[Node], Node | None]) -> Graph:
        """Rebuild the graph bottom-up; `fn` sees each node with its inputs already rewritten
        and returns a replacement (which may be built on new nodes) or None to keep it.
        Nodes nothing uses any more are dropped."""
        mapping: dict[Node, Node] = {}
        for n in self.nodes:
            new_inputs = tuple(mapping[i] for i in n.inputs)
            cur = n if all(a is b for a, b in zip(new_inputs, n.inputs, strict=True)) else n.replace(inputs=new_inputs)
            mapping[n] = fn(cur) or cur
        return self._remapped(mapping)

    def substitute(self, replace: dict[Node, Node]) -> Graph:
        """Replace nodes by new values; the new values may be built on any original nodes
        (which are themselves remapped), so a pass can describe a rewrite against the graph
        as it was."""
        mapping: dict[Node, Node] = {}
        memo: dict[Node, Node] = {}

        def remap(x: Node) -> Node:
            if x in mapping:
                return mapping[x]
            if x not in memo:
                ins = tuple(remap(i) for i in x.inputs)
                memo[x] = x if all(a is b for a, b in zip(ins, x.inputs, strict=True)) else x.replace(inputs=ins)
            return memo[x]

        for n in self.nodes:
            mapping[n] = remap(replace[n]) if n in replace else remap(n)
        return self._remapped(mapping)

    def _remapped(self, mapping: dict[Node, Node]) -> Graph:
        # A writer that a rewrite replaced is dropped with it; one that survives stays.
        effects = [m for m in (mapping[n] for n in self.nodes) if m.writes]
        return self.with_nodes([mapping[i] for i in self.inputs], [mapping[o] for o in self.outputs], effects)


def _visit(root: Node, seen: set[Node], order: list[Node]) -> None:
    # Iterative DFS: graphs of deep models overflow Python's recursion limit.
    stack: list[tuple[Node, int]] = [(root, 0)]
    while stack:
        node, i = stack.pop()
        if node in seen:
            continue
        if i < len(node.inputs):
            stack.append((node, i + 1))
            child = node.inputs[i]
            if child not in seen:
                stack.append((child, 0))
        else:
            seen.add(node)
            order.append(node)
