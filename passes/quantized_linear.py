"""quantized-linear: a linear layer over a dequantized weight reads the packed weight itself
(`quantized_linear`), so no [N, K] weight is ever stored or materialized."""

from __future__ import annotations

from dataclasses import dataclass

from kiln.ir.dims import from_expr, to_expr
from kiln.ir.graph import Graph, Node
from kiln.passes.base import Pass, make, weight_only
from kiln.passes.patterns import substitute_matches

DEQUANT = ("dequant_int", "dequant_int_offset", "dequant_fp8")


@dataclass(frozen=True)
class _Packed:
    """One dequant node's operands and attributes, as quantized_linear takes them."""

    qweight: Node
    scales: Node
    zeros: Node | None
    offsets: Node | None
    g_idx: Node | None
    attrs: dict
    """format, dtype and bits / group_size (int) or block_n / block_k (fp8)."""


def _packed(w: Node) -> _Packed | None:
    """The packed weight behind w = dequant_int | dequant_int_offset | dequant_fp8(params ...),
    else None."""
    if w.op not in DEQUANT or not weight_only(w):
        return None
    if w.op == "dequant_fp8":
        a = {"format": "fp8", "block_n": w.attrs["block_n"], "block_k": w.attrs["block_k"], "dtype": w.attrs["dtype"]}
        return _Packed(w.inputs[0], w.inputs[1], None, None, None, a)
    a = {"format": "int", "bits": w.attrs["bits"], "group_size": w.attrs["group_size"], "dtype": w.attrs["dtype"]}
    if w.op == "dequant_int_offset":
        return _Packed(w.inputs[0], w.inputs[1], None, w.inputs[2], None, a)
    zeros = next((t for t in w.inputs[2:] if t.type.rank == 2), None)
    g_idx = next((t for t in w.inputs[2:] if t.type.rank == 1), None)
    return _Packed(w.inputs[0], w.inputs[1], zeros, None, g_idx, a)


def _merged(parts: list[_Packed]) -> _Packed | None:
    """One packed weight for the row-concatenation of `parts` (merge-projections' cat), when the
    canonical layout allows: rows of qweight, scales, zeros and offsets concatenate when every
    part has the same format and attributes, the same operands present, one g_idx node (or
    none), and (fp8) every part but the last a whole number of scale blocks of rows. None
    otherwise."""
    first = parts[0]
    if any(p.attrs != first.attrs or (p.zeros is None) != (first.zeros is None) or p.g_idx is not first.g_idx
           or (p.offsets is None) != (first.offsets is None) or p.scales.type.dtype != first.scales.type.dtype
           or p.offsets is not None and p.offsets.type.dtype != first.offsets.type.dtype for p in parts):
        return None
    if first.attrs["format"] == "fp8" and any(
            not isinstance(p.qweight.type.shape[0], int) or p.qweight.type.shape[0] % first.attrs["block_n"]
            for p in parts[:-1]):
        return None

    def rows(nodes: list[Node]) -> Node:
        return make("cat", nodes, dim=0)

    zeros = rows([p.zeros for p in parts]) if first.zeros is not None else None
    offsets = rows([p.offsets for p in parts]) if first.offsets is not None else None
    return _Packed(rows([p.qweight for p in parts]), rows([p.scales for p in parts]), zeros, offsets, first.g_idx,
                   first.attrs)


def _quantized(x: Node, act: str, p: _Packed, bias: Node | None) -> Node:
    ins = [x, p.qweight, p.scales, *(t for t in (p.zeros, p.offsets, p.g_idx, bias) if t is not None)]
    attrs = {k: v for k, v in p.attrs.items() if k != "dtype"}
    if p.offsets is not None:
        attrs["has_offsets"] = True  # absent (False) otherwise: the graphs from before offsets stay as they were
    return make("quantized_linear", ins, **attrs, act=act, dtype=p.attrs["dtype"], has_zeros=p.zeros is not None,
                has_g_idx=p.g_idx is not None, has_bias=bias is not None)


def _split(n: Node, x: Node, act: str, members: tuple[Node, ...], bias: Node | None) -> Node:
    """cat over the last axis of one product per member of the cat weight (the members that
    cannot share one packed weight): quantized_linear where the member is a dequant, linear of
    the (quant_act) input otherwise; each with its rows of the bias."""
    outs, start = [], 0
    for w in members:
        end = from_expr(to_expr(start) + to_expr(w.type.shape[0]))
        b = make("slice", [bias], dim=0, start=start, end=end, step=1) if bias is not None else None
        p = _packed(w)
        outs.append(_quantized(x, act, p, b) if p is not None else make("linear", [n.inputs[0], w, *([b] if b else [])]))
        start = end
    return make("cat", outs, dim=n.type.rank - 1)


def _match(n: Node) -> tuple[Node, Node] | None:
    """(n, its quantized form) for n = linear(x | quant_act(x), W[, b]) with W a dequant of
    params or a row-cat of such (merge-projections), else None."""
    if n.op != "linear" or n.attrs.get("weight_layout", "out_in") != "out_in":
        return None
    x, w, *rest = n.inputs
    bias = rest[0] if rest else None
    act = "none"
    if x.op == "quant_act":
        x, act = x.inputs[0], x.attrs["format"]
    p = _packed(w)
    if p is not None:
        return n, _quantized(x, act, p, bias)
    if w.op != "cat" or w.attrs["dim"] not in (0, -2):
        return None
    parts = [_packed(m) for m in w.inputs]
    if not any(parts):
        return None
    if all(parts):
        merged = _merged(parts)
        if merged is not None:
            return n, _quantized(x, act, merged, bias)
    if act != "none" and not all(parts):
        return None  # a dense member of an activation-quantized product: leave it whole
    return n, _split(n, x, act, w.inputs, bias)


@dataclass(frozen=True)
class QuantizedLinear(Pass):
    """Matches: linear(x, W[, b]) and linear(quant_act(x), W[, b]) with an out_in weight W that
    is dequant_int(qweight, scales[, zeros][, g_idx]), dequant_int_offset(qweight, scales,
    offsets) or dequant_fp8(qweight, scales) of params, or merge-projections' cat (dim 0) of such
    weights (merged QKV, gate/up).
    Emits: quantized_linear(x, qweight, scales[, zeros][, offsets][, g_idx][, b]) {format, act,
    dtype, has_zeros, has_g_idx, has_bias, bits + group_size | block_n + block_k, and
    has_offsets: true for dequant_int_offset}; for a merged weight, one quantized_linear over
    the row-concatenated qweight, scales, zeros and offsets (folded into new params at compile
    time) when its parts share format, attributes and g_idx (and, fp8, whole scale blocks of
    rows), else a cat along the last axis of one product per part, each on its
    rows of the bias (the weights stay packed; the slices merge-projections took still apply).
    The quant_act node is absorbed (its format becomes `act`); it stays only for other readers."""

    name = "quantized-linear"

    def apply(self, graph: Graph) -> Graph:
        return substitute_matches(graph, (_match(n) for n in graph.nodes))
