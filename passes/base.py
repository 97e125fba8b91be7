"""What a pass is: a small frozen dataclass with a kebab-case name and one apply()."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from kiln.ir.graph import Graph, Node
from kiln.ir.ops import get_op, infer_type


@dataclass(frozen=True)
class Pass:
    """Base class: subclasses set `name`, take options as fields, and implement apply()."""

    name: ClassVar[str] = ""
    exact: ClassVar[bool] = True
    """False for a pass that changes what the graph computes by design (quantize-weights):
    --verify does not compare its output with its input."""

    def apply(self, graph: Graph) -> Graph:
        """Return the transformed graph (the input graph is never mutated)."""
        raise NotImplementedError


def make(op: str, inputs: list[Node] | tuple[Node, ...], **attrs: object) -> Node:
    """A new node whose type comes from the op's rule."""
    return Node(op, tuple(inputs), dict(attrs), infer_type(get_op(op), [i.type for i in inputs], attrs))


def weight_only(n: Node) -> bool:
    """Whether a value depends on parameters and constants alone (foldable at compile time)."""
    stack, seen = [n], set()
    while stack:
        x = stack.pop()
        if x.op == "input":
            return False
        if x not in seen:
            seen.add(x)
            stack.extend(x.inputs)
    return True
