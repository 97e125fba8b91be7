"""Structural and type checks of a graph; run after every pass."""

from __future__ import annotations

from kiln.errors import VerifyError
from kiln.ir.graph import SOURCE_OPS, Graph, Node
from kiln.ir.ops import get_op, infer_type
from kiln.ir.printer import format_node
from kiln.ir.types import DTYPES, TupleType


def verify(graph: Graph, *, check_types: bool = True) -> None:
    """Raise VerifyError on the first problem: use before definition, an unknown op, a wrong
    number of inputs, missing or unknown attributes, a recorded type that disagrees with
    the op's type rule, a multi-result value read other than through get_result, or a value
    written in place that another node also reads (every read must follow the write, reading
    its result)."""
    defined: set[int] = set()
    input_names: set[str] = set()
    param_names: dict[str, object] = {}
    for n in graph.nodes:
        for t in n.type.types:
            if t.dtype not in DTYPES:
                raise VerifyError(f"unknown dtype '{t.dtype}' in a node of op '{n.op}'")
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
        if isinstance(o.type, TupleType):
            raise VerifyError(f"graph output {format_node(o)} has several results; project one")
    _check_reads(graph)


def _check_reads(graph: Graph) -> None:
    """Tuples are read only by get_result; a value written in place is read only by its
    writer, and is a graph input or the result of an earlier write (an engine-owned buffer)."""
    readers: dict[int, list[Node]] = {}
    for n in graph.nodes:
        for i in n.inputs:
            readers.setdefault(id(i), []).append(n)
    for n in graph.nodes:
        if isinstance(n.type, TupleType) and any(r.op != "get_result" for r in readers.get(id(n), [])):
            raise VerifyError(f"multi-result value {format_node(n)} is read other than by get_result")
        for w in n.writes:
            others = [r for r in readers.get(id(w), []) if r is not n]
            if others:
                raise VerifyError(
                    f"{format_node(n)} writes {format_node(w)} in place, but {format_node(others[0])} "
                    "also reads it: nothing orders that read against the write; read the writer's result"
                )
            if w.op != "input" and not (w.op == "get_result" and w.inputs[0].writes):
                raise VerifyError(f"{format_node(n)} writes {format_node(w)} in place, which is not a buffer "
                                  "the caller owns (a graph input or an earlier write's result)")


def _check_arity(arity: int | tuple[int, int] | None, n: int, where: str) -> None:
    if arity is None:
        return
    lo, hi = (arity, arity) if isinstance(arity, int) else arity
    if not lo <= n <= hi:
        raise VerifyError(f"expected {arity} inputs, got {n} {where}")
