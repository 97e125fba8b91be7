"""quantize-weights: compile-time quantization of the linear layers (W8A8 int8, fp8, int4 weight-only)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import ClassVar

from kiln.errors import KilnError
from kiln.ir.graph import Graph, Node, const_node
from kiln.ir.types import TensorType
from kiln.passes.base import Pass, make, weight_only

METHODS: dict[str, dict[str, object]] = {
    "int8": {"bits": 8, "act": "int8", "weights": "int8, per output channel, symmetric"},
    "fp8": {"bits": 8, "act": "float8_e4m3fn", "weights": "float8_e4m3fn, per output channel"},
    "int4": {"bits": 4, "act": None, "weights": "int4, per group, asymmetric (zeros)"},
}
"""--quantize values: weight bits, the activations' quant_act format (None: weight-only)."""
DEFAULT_GROUP_SIZE = 128


def int4_group_size(k: int, group_size: int = DEFAULT_GROUP_SIZE) -> int:
    """The group of a K-input linear: group_size when it divides K, else the largest even divisor
    of K below it (688 -> 86); KilnError for an odd K (two 4-bit weights share a byte)."""
    if k % 2:
        raise KilnError(f"int4 quantization needs an even number of input channels; a linear has {k}")
    if k % group_size == 0:
        return group_size
    return max(g for g in range(2, min(group_size, k) + 1, 2) if k % g == 0)


def _linears_reaching(roots: list[Node]) -> set[Node]:
    """The linears whose results reach `roots` without passing another linear."""
    found: set[Node] = set()
    stack, seen = list(roots), set()
    while stack:
        n = stack.pop()
        if n in seen:
            continue
        seen.add(n)
        if n.op == "linear":
            found.add(n)
        else:
            stack.extend(n.inputs)
    return found


def quantized_linears(graph: Graph, lm_head: bool = False) -> list[Node]:
    """The linears the pass quantizes: a 2-D weight-only weight in the checkpoint's [N, K] layout,
    except MoE routers (a linear a `topk` reaches without passing another: a rounded logit would
    pick other experts) and, unless `lm_head`, the LM head (the same, from a graph output)."""
    keep = _linears_reaching([n for n in graph.nodes if n.op == "topk"])
    if not lm_head:
        keep |= _linears_reaching(list(graph.outputs))
    return [
        n for n in graph.nodes
        if n.op == "linear" and n not in keep and n.attrs.get("weight_layout", "out_in") == "out_in"
        and n.inputs[1].type.rank == 2 and weight_only(n.inputs[1]) and isinstance(n.inputs[1].type.shape[1], int)
    ]


def weight_name(w: Node) -> str:
    """The name that keys a weight (AWQ scales, the manifest): its first param's."""
    stack = [w]
    while stack:
        n = stack.pop()
        if n.op == "param":
            return n.name
        stack.extend(reversed(n.inputs))
    raise KilnError("a quantized linear's weight reads no param")


def _vector(values: tuple[float, ...] | list[float], dtype: str) -> Node:
    return const_node([float(v) for v in values], TensorType(dtype, (len(values),)))


def _norm_weight(x: Node) -> int | None:
    """Which operand of x = mul(a, w) is a norm's weight: weight-only, [K], a param or a cast of
    one (so that w / s is the same norm with another weight); None when x is not that."""
    if x.op != "mul":
        return None
    k = x.type.shape[-1]
    for i, w in enumerate(x.inputs):
        base = w.inputs[0] if w.op == "cast" else w
        if base.op == "param" and w.type.rank == 1 and w.type.shape[0] == k and x.inputs[1 - i].type.rank > 1:
            return i
    return None


def _scalable_producer(x: Node, users: dict[Node, list[Node]], quantized: set[Node], graph: Graph) -> Node | None:
    """The linear L (quantized, no bias, read by x alone) when x = mul(a, L(..)): x / s is then
    the same graph with L's weight rows divided by s (SwiGLU's up projection before down)."""
    if x.op != "mul":
        return None
    for u in x.inputs:
        if u in quantized and len(u.inputs) == 2 and users[u] == [x] and u not in graph.outputs \
                and u.type.shape[-1] == x.type.shape[-1]:
            return u
    return None


@dataclass(frozen=True)
class QuantizeWeights(Pass):
    """Matches: every `linear(x, W[, b])` with a weight-only W [N, K] in the checkpoint's layout,
    except MoE routers and, unless `lm_head`, the LM head (embeddings are not linears: they stay
    in the model dtype).
    Emits, by `method`:

        int8  linear(quant_act(x){int8}, dequant_int(quantize_int(W){part=qweight|scales}){bits 8, group K})
        fp8   linear(quant_act(x){float8_e4m3fn}, dequant_fp8(quantize_fp8(W){part=...}){block 1 x K})
        int4  linear(x', dequant_int(quantize_int(W'){part=qweight|scales|zeros}){bits 4, group 128})

    one quant_act per activation (sibling projections keep sharing their input). With AWQ
    `act_scales` (weight name -> per-input-channel scale s, one s for the linears that share an
    input), W' = W * s (columns) and x' = x / s: when x is a norm's output `mul(w_norm, y)` the
    1/s goes into the norm's weight (mul(w_norm, 1/s), folded at compile time); when x is
    `mul(a, linear(h, U))` (SwiGLU's act(gate) * up) into U's rows before U is quantized (a row
    scale leaves round-to-nearest's relative error as it was); else x' is mul(x, 1/s). Weight folding computes the quantize_* parts into packed params; the result is
    graph.meta["quantization"]. Numerics change by design: --verify does not compare this pass
    with its input."""

    name = "quantize-weights"
    exact: ClassVar[bool] = False
    method: str = "int4"
    group_size: int = DEFAULT_GROUP_SIZE
    act_scales: Mapping[str, tuple[float, ...]] = field(default_factory=dict)
    lm_head: bool = False

    def apply(self, graph: Graph) -> Graph:
        if self.method not in METHODS:
            raise ValueError(f"unknown quantization {self.method!r}; accepted: {', '.join(METHODS)}")
        if any(n.op in ("dequant_int", "dequant_fp8") for n in graph.nodes):
            raise KilnError("the model is already quantized (its graph dequantizes packed weights); compile it "
                            "without --quantize")
        spec = METHODS[self.method]
        by_input: dict[Node, list[Node]] = {}
        for n in quantized_linears(graph, self.lm_head):
            by_input.setdefault(n.inputs[0], []).append(n)
        users = graph.users()
        quantized = {m for members in by_input.values() for m in members}
        replace: dict[Node, Node] = {}
        groups: dict[str, int] = {}
        new_inputs: dict[Node, Node] = {}
        col_scales: dict[Node, tuple[float, ...]] = {}
        row_scales: dict[Node, tuple[float, ...]] = {}  # a producing linear's rows times 1/s
        for x, members in by_input.items():
            scales = {tuple(self.act_scales[weight_name(m.inputs[1])]) for m in members
                      if weight_name(m.inputs[1]) in self.act_scales}
            if len(scales) > 1:
                raise KilnError(f"AWQ scales differ between linears sharing one input ({len(members)} linears)")
            s = scales.pop() if scales else None
            new_inputs[x] = x
            if spec["act"] is not None:
                new_inputs[x] = make("quant_act", [x], format=spec["act"])
            elif s is not None:
                col_scales.update(dict.fromkeys(members, s))
                inv = tuple(1.0 / v for v in s)
                sole = set(users[x]) == set(members) and x not in graph.outputs
                at = _norm_weight(x) if sole else None
                producer = _scalable_producer(x, users, quantized, graph) if sole else None
                if at is not None:
                    w = x.inputs[at]
                    ins = list(x.inputs)
                    ins[at] = make("mul", [w, _vector(inv, w.type.dtype)])
                    replace[x] = make("mul", ins)
                elif producer is not None:
                    row_scales[producer] = inv
                else:
                    new_inputs[x] = make("mul", [x, _vector(inv, x.type.dtype)])
        for x, members in by_input.items():
            for m in members:
                w = m.inputs[1]
                if m in col_scales:
                    w = make("mul", [w, _vector(col_scales[m], w.type.dtype)])
                if m in row_scales:
                    rows = [[v] for v in row_scales[m]]
                    w = make("mul", [w, const_node(rows, TensorType(w.type.dtype, (len(rows), 1)))])
                dq, group = self._dequant(w)
                groups[weight_name(m.inputs[1])] = group
                replace[m] = make("linear", [new_inputs[x], dq, *m.inputs[2:]], **m.attrs)
        out = graph.substitute(replace) if replace else graph
        out.meta = {**graph.meta, "quantization": self.describe(groups)}
        return out

    def _dequant(self, w: Node) -> tuple[Node, int]:
        dtype = w.type.dtype
        n, k = w.type.shape
        if self.method == "fp8":
            parts = [make("quantize_fp8", [w], part=p) for p in ("qweight", "scales")]
            return make("dequant_fp8", parts, block_n=1, block_k=k, dtype=dtype), k
        bits = int(METHODS[self.method]["bits"])
        group = k if bits == 8 else int4_group_size(k, self.group_size)
        names = ("qweight", "scales", "zeros") if bits == 4 else ("qweight", "scales")
        parts = [make("quantize_int", [w], bits=bits, group_size=group, part=p) for p in names]
        return make("dequant_int", parts, bits=bits, group_size=group, dtype=dtype), group

    def describe(self, groups: dict[str, int]) -> dict[str, object]:
        """What the manifest records: method, bits, group size (and the linears given another),
        activations, whether AWQ scales were applied, how many linears."""
        spec = METHODS[self.method]
        group: object = "per output channel" if spec["bits"] == 8 else self.group_size
        return {
            "method": self.method,
            "bits": spec["bits"],
            "weights": spec["weights"],
            "activations": f"{spec['act']}, per token, dynamic" if spec["act"] else "model dtype (weight-only)",
            "group_size": group,
            "group_size_overrides": {k: g for k, g in groups.items() if spec["bits"] == 4 and g != self.group_size},
            "awq": bool(self.act_scales),
            "linears": len(groups),
            "lm_head": "quantized" if self.lm_head else "model dtype",
        }
