"""The rope pass's cos/sin tables: the position-only values a traced graph computes, cloned over
every position (and, for longrope, over the long frequencies too)."""

from __future__ import annotations

from dataclasses import dataclass, field

import sympy

from kiln.errors import UnsupportedOpError
from kiln.ir.dims import Dim, dims_equal, from_expr, to_expr
from kiln.ir.graph import Graph, Node, const_node, input_node
from kiln.ir.ops import get_op
from kiln.ir.ops.kernels import LONG_ROPE_META
from kiln.ir.step_inputs import CU_SEQLENS, POSITION_IDS, TOTAL_LENS
from kiln.ir.types import TensorType, TupleType
from kiln.passes.base import make

TOKENS = POSITION_IDS.shape[0]

# Position-only ops that keep each token's row apart (checked further in _rowwise).
_ROW_OPS = frozenset({"reshape", "cat", "slice", "repeat_interleave", "expand", "permute", "matmul"})


def is_token_dim(d: Dim) -> bool:
    return dims_equal(d, TOKENS)


def token_axis(shape: tuple[Dim, ...]) -> int | None:
    """The one axis of a shape that is the token count T (None when it has none, or others)."""
    symbolic = [i for i, d in enumerate(shape) if not isinstance(d, int)]
    return symbolic[0] if len(symbolic) == 1 and is_token_dim(shape[symbolic[0]]) else None


def _has_tokens(n: Node) -> bool:
    return any(not isinstance(d, int) for d in n.type.shape)


def _rowwise(n: Node) -> bool:
    """Whether a position-derived node keeps row t a function of position t alone."""
    axis = token_axis(n.type.shape)
    if axis is None:
        return False
    if get_op(n.op).kind == "elementwise":
        return True
    if n.op not in _ROW_OPS:
        return False
    if n.op == "reshape":
        # Row-major: the token axis must stay outermost (only size-1 axes before it).
        src = n.inputs[0].type.shape
        src_axis = token_axis(src)
        return src_axis is not None and all(d == 1 for d in (*src[:src_axis], *n.type.shape[:axis]))
    if n.op in ("expand", "permute"):
        return True
    if n.op == "matmul":
        # freqs = inv_freq[:, None] @ positions[None, :] (transformers before 5.2x): the token
        # axis must be a row of the left operand or a column of the right one, never contracted,
        # and the other operand must have none.
        axes = [token_axis(i.type.shape) for i in n.inputs]
        a, b = n.inputs
        return (axes[0] == a.type.rank - 2 and axes[1] is None and not _has_tokens(b)) or (
            axes[1] == b.type.rank - 1 and axes[0] is None and not _has_tokens(a))
    return all(isinstance(x.type.shape[n.attrs["dim"]], int) for x in n.inputs)


def position_only(graph: Graph, positions: Node) -> set[Node]:
    """The values computed row by row from `positions` and weights alone (no other input)."""
    fixed: set[Node] = set()  # depends on no input, static shape
    out = {positions}
    for n in graph.nodes:
        if n.op == "input" or isinstance(n.type, TupleType):
            continue
        if all(i in fixed for i in n.inputs) and all(isinstance(d, int) for d in n.type.shape):
            fixed.add(n)
        elif all(i in fixed or i in out for i in n.inputs) and _rowwise(n):
            out.add(n)
    return out


def _at_positions(d: Dim, p: int) -> Dim:
    return d if isinstance(d, int) else from_expr(to_expr(d).subs(sympy.Symbol(TOKENS), p))


def _clone(n: Node, mapping: dict[Node, Node], p: int) -> Node:
    """n rebuilt over mapping's replacements (positions -> arange; for longrope's long tables
    also inv_freq -> the long frequencies), token dims in attrs -> p."""
    if n in mapping:
        return mapping[n]
    inputs = [_clone(i, mapping, p) for i in n.inputs]
    if token_axis(n.type.shape) is None and all(a is b for a, b in zip(inputs, n.inputs, strict=True)):
        mapping[n] = n  # weight-only and untouched by the replacements
        return n
    attrs = dict(n.attrs)
    for key in get_op(n.op).dim_attrs:
        v = attrs.get(key)
        if isinstance(v, list | tuple):
            attrs[key] = [_at_positions(d, p) for d in v]
        elif v is not None:
            attrs[key] = _at_positions(v, p)
    mapping[n] = make(n.op, inputs, **attrs)
    return mapping[n]


def table(value: Node, axis: int, width: int, clones: dict[Node, Node], p: int,
           halves: bool) -> Node | None:
    """value (broadcast against a rank-3 x with tokens on `axis`) at positions 0..p-1, as
    [p, R]; clones maps the positions to their arange and memoizes the cloned nodes."""
    shape, offset = value.type.shape, 3 - value.type.rank
    if offset < 0 or shape[-1] != width:
        return None
    for i, d in enumerate(shape[:-1]):
        if not (is_token_dim(d) if i + offset == axis else d == 1):
            return None
    rows = _clone(value, clones, p)
    if rows.op == "reshape":
        rows = rows.inputs[0]
    if rows.type.shape != (p, width):
        rows = make("reshape", [rows], shape=[p, width])
    return make("cat", [rows, rows], dim=1) if halves else rows


@dataclass
class Variant:
    """One pair of tables to build: the clone replacements and the memo of built tables."""

    clones: dict[Node, Node]
    memo: dict[tuple[Node, bool, int], Node | None] = field(default_factory=dict)
    long_after: int = 0
    total_lens: Node | None = None
    cu_seqlens: Node | None = None


def check_no_short_only_rope(graph: Graph, long: Variant) -> None:
    """A longrope model whose rotary embedding stayed (partly) generic would run on its short
    factors alone: an error, never a silent deviation."""
    (inv_freq,) = (k for k in long.clones if k.op == "param")
    derived = {inv_freq}  # weight-only values computed from the frequencies
    live = {n for n in graph.inputs}  # values depending on a step input
    for n in graph.nodes:
        if n.op in ("input", "param", "const"):
            continue
        if any(i in live for i in n.inputs):
            live.add(n)
            if n.op != "rope" and any(i in derived for i in n.inputs):  # rope reads its tables
                raise UnsupportedOpError(
                    "a longrope rotary embedding the rope pass does not recognise",
                    str(graph.meta.get("model_type")),
                    hint=f"'{inv_freq.name}' is applied by generic ops, which would use the short factors only",
                )
        elif any(i in derived for i in n.inputs):
            derived.add(n)


def long_variant(graph: Graph, arange: Node, positions: Node) -> Variant | None:
    """Longrope (graph.meta[LONG_ROPE_META], written by the frontend): the tables again with the
    long frequencies in place of inv_freq, and the inputs the op picks a pair per token with."""
    entries = graph.meta.get(LONG_ROPE_META) or []
    if not entries:
        return None
    if len(entries) != 1:
        raise UnsupportedOpError("longrope with several rotary modules", str(graph.meta.get("model_type")),
                                 hint="kiln handles longrope when one rotary module serves every layer")
    (entry,) = entries
    params = {n.name: n for n in graph.params}
    inv_freq = params.get(entry["param"])
    if inv_freq is None:
        raise UnsupportedOpError(f"longrope frequencies '{entry['param']}'", str(graph.meta.get("model_type")),
                                 hint="the traced graph does not read that buffer; the rope tables cannot switch to "
                                 "the long factors")
    values = const_node(entry["long_inv_freq"], TensorType("float32", (len(entry["long_inv_freq"]),)))
    if inv_freq.type.dtype != "float32":
        values = make("cast", [values], dtype=inv_freq.type.dtype)
    inputs = {n.name: n for n in graph.inputs}
    return Variant(
        {positions: arange, inv_freq: values},
        long_after=int(entry["long_after"]),
        total_lens=inputs.get(TOTAL_LENS.name) or input_node(TOTAL_LENS.name, TOTAL_LENS.type),
        cu_seqlens=inputs[CU_SEQLENS.name],
    )
