"""The IR's text form, printed and parsed back (pass tests are written in it).

    %input_ids = input : i64[T]
    @model.norm.weight = param : f32[64]
    %3 = rms_norm(%2, @model.norm.weight) {"eps": 1e-05, "normalized_shape": [64]} : f32[T,64]
    %4 = add(%3, 1e-06) : f32[T,64]
    return %4

Rank-0 constants of dtype f32, i64 and bool print inline as literals; other constants get a line.
A node with several results has a tuple type, read through get_result projections:

    %5 = kv_cache_write(%1, %2, %k_cache.0, %v_cache.0, %slot_mapping) : (f32[NB,BS,2,16], f32[NB,BS,2,16])
    %6 = get_result(%5) {"index": 0} : f32[NB,BS,2,16]
"""

from __future__ import annotations

import json
import re

from kiln.errors import VerifyError
from kiln.ir.graph import Graph, Node, const_node, input_node, param_node
from kiln.ir.types import LONG, TensorType, TupleType, ValueType

_INLINE = {"float32": float, "int64": int, "bool": bool}


def _inline(n: Node) -> bool:
    return n.is_scalar_const and _INLINE.get(n.type.dtype) is type(n.attrs["value"])


def _literal(v: bool | int | float) -> str:
    return repr(v) if not isinstance(v, float) or v == v and abs(v) != float("inf") else json.dumps(v)


def print_graph(graph: Graph) -> str:
    """The text form of a graph; node names are canonical, so equal graphs print equally."""
    names: dict[Node, str] = {}
    lines: list[str] = []
    counter = 0
    outputs = set(graph.outputs)
    for n in graph.nodes:
        if _inline(n) and n not in outputs:
            names[n] = _literal(n.attrs["value"])
            continue
        if n.op == "input":
            names[n] = f"%{n.name}"
            lines.append(f"  {names[n]} = input : {n.type}")
            continue
        if n.op == "param":
            names[n] = f"@{n.name}"
            lines.append(f"  {names[n]} = param : {n.type}")
            continue
        names[n] = f"%{counter}"
        counter += 1
        args = ", ".join(names[i] for i in n.inputs)
        attrs = f" {json.dumps(n.attrs)}" if n.attrs else ""
        lines.append(f"  {names[n]} = {n.op}({args}){attrs} : {n.type}")
    lines.append("  return " + ", ".join(names[o] for o in graph.outputs))
    return "graph {\n" + "\n".join(lines) + "\n}\n"


def format_node(n: Node) -> str:
    """One node on one line, for error messages."""
    args = ", ".join(f"{i.op}:{i.type}" for i in n.inputs)
    return f"{n.op}({args}) {json.dumps(n.attrs)} : {n.type}"


_LINE = re.compile(r"^\s*([%@][\w.\-/]+) = (\w+)(?:\((.*?)\))?(?: (\{.*\}))? : (\w+\[.*\]|\(.*\))$")
_TENSOR = re.compile(r"(\w+)\[([^\]]*)\]")


def _parse_tensor(dtype: str, dims: str) -> TensorType:
    if dtype not in LONG:
        raise VerifyError(f"unknown dtype '{dtype}' in IR text")
    shape = tuple(int(d) if re.fullmatch(r"-?\d+", d) else d for d in dims.split(",") if d)
    return TensorType(LONG[dtype], shape)


def _parse_type(text: str) -> ValueType:
    if text.startswith("("):
        return TupleType(tuple(_parse_tensor(*m.groups()) for m in _TENSOR.finditer(text)))
    m = _TENSOR.fullmatch(text)
    if not m:
        raise VerifyError(f"cannot parse IR type {text!r}")
    return _parse_tensor(*m.groups())


def _parse_literal(tok: str) -> Node:
    if tok in ("True", "False"):
        return const_node(tok == "True", TensorType("bool", ()))
    if re.fullmatch(r"-?\d+", tok):
        return const_node(int(tok), TensorType("int64", ()))
    return const_node(float(tok), TensorType("float32", ()))


def parse_graph(text: str) -> Graph:
    """Parse the text form back into a graph (types are taken as written, not inferred)."""
    env: dict[str, Node] = {}
    nodes: list[Node] = []
    outputs: list[Node] = []
    for raw in text.strip().splitlines():
        line = raw.strip()
        if not line or line in ("graph {", "}"):
            continue
        if line.startswith("return"):
            outputs = [env[a.strip()] for a in line[len("return"):].split(",") if a.strip()]
            continue
        m = _LINE.match(line)
        if not m:
            raise VerifyError(f"cannot parse IR line: {line!r}")
        name, op, args, attrs, type_text = m.groups()
        type_ = _parse_type(type_text)
        if op == "input":
            node = input_node(name[1:], type_)
        elif op == "param":
            node = param_node(name[1:], type_)
        else:
            inputs = []
            for tok in (a.strip() for a in (args or "").split(",") if a.strip()):
                if tok[0] in "%@":
                    if tok not in env:
                        raise VerifyError(f"IR line uses {tok} before it is defined: {line!r}")
                    inputs.append(env[tok])
                else:
                    lit = _parse_literal(tok)
                    nodes.append(lit)
                    inputs.append(lit)
            node = Node(op, tuple(inputs), json.loads(attrs) if attrs else {}, type_)
        env[name] = node
        nodes.append(node)
    return Graph(nodes, outputs)
