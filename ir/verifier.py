"""Structural and type checks of a graph; run after every pass."""

from __future__ import annotations

from kiln.errors import VerifyError
from kiln.ir.graph import SOURCE_OPS, Graph
from kiln.ir.ops import get_op, infer_type
from kiln.ir.printer import format_node
from kiln.ir.types import DTYPES


def verify(graph: Graph, *, check_types: bool = True) -> None:
    """Raise VerifyError on the first problem: use before definition, an unknown op, a wrong
    number of inputs, missing or unknown attributes, or a recorded type that disagrees with
    the op's type rule."""
    defined: set[int] = set()
    input_names: set[str] = set()
    param_names: dict[str, object] = {}
    for n in graph.nodes:
        if n.type.dtype not in DTYPES or any(i.type.dtype not in DTYPES for i in n.inputs):
            raise VerifyError(f"unknown dtype '{n.type.dtype}' in a node of op '{n.op}'")
        where = f"in node {format_node(n)}"
        for i in n.inputs:
            if id(i) not in defined:
                raise VerifyError(f"operand {format_node(i)} used before definition {where}")
        defined.add(id(n))
        if n.op in SOURCE_OPS:
            if n.op == "input":
                if n.name in input_names:
                    raise VerifyError(f"duplicate graph input '{n.name}'")
                input_names.add(n.name)
            elif n.op == "param":
                if n.name in param_names and param_names[n.name] != n.type:
                    raise VerifyError(f"param '{n.name}' declared with two types")
                param_names[n.name] = n.type
            elif "value" not in n.attrs:
                raise VerifyError(f"const without a value {where}")
            continue
        op = get_op(n.op)
        _check_arity(op.arity, len(n.inputs), where)
        missing = set(op.attrs) - n.attrs.keys()
        unknown = n.attrs.keys() - set(op.attrs) - set(op.optional_attrs)
        if missing or unknown:
            raise VerifyError(f"attributes missing {sorted(missing)} / unknown {sorted(unknown)} {where}")
        if check_types:
            try:
                expected = infer_type(op, [i.type for i in n.inputs], n.attrs)
            except VerifyError:
                raise
            except Exception as e:  # the op's own rule rejected its operands
                raise VerifyError(f"type rule of '{n.op}' failed ({e}) {where}") from None
            if not expected.same_as(n.type):
                raise VerifyError(f"recorded type {n.type} but the rule gives {expected} {where}")
    for o in graph.outputs:
        if id(o) not in defined:
            raise VerifyError(f"graph output {format_node(o)} is not a node of the graph")


def _check_arity(arity: int | tuple[int, int] | None, n: int, where: str) -> None:
    if arity is None:
        return
    lo, hi = (arity, arity) if isinstance(arity, int) else arity
    if not lo <= n <= hi:
        raise VerifyError(f"expected {arity} inputs, got {n} {where}")
