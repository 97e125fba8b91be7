"""gated-activation: act(gate) * up on the halves of a merged gate/up GEMM becomes one op."""

from __future__ import annotations

from dataclasses import dataclass

from kiln.ir.graph import Graph, Node
from kiln.passes.base import Pass, make
from kiln.passes.patterns import commuted, on_last_axis, substitute_matches


def _half(s: Node, y: Node, start: int, end: int) -> bool:
    """Whether s = y[..., start:end] (contiguous, on the last axis)."""
    return (s.op == "slice" and s.inputs[0] is y and on_last_axis(s, "dim") and s.attrs["step"] == 1
            and s.attrs["start"] == start and s.attrs["end"] == end)


def _match(n: Node) -> tuple[Node, Node] | None:
    """(n, the gated op) for n = act(y[..., s:s+I]) * y[..., s+I:s+2I], else None."""
    for act, up in commuted(n, "mul"):
        gate = act.inputs[0] if act.op in ("silu", "gelu") else None
        if gate is None or gate.op != "slice" or not all(isinstance(gate.attrs[k], int) for k in ("start", "end")):
            continue
        y, start, i = gate.inputs[0], gate.attrs["start"], gate.attrs["end"] - gate.attrs["start"]
        if not (i > 0 and _half(gate, y, start, start + i) and _half(up, y, start + i, start + 2 * i)):
            continue
        if start != 0 or y.type.shape[-1] != 2 * i:
            # gate/up merged with other projections (q/k/v, a router): their [gate | up] columns
            y = make("slice", [y], dim=y.type.rank - 1, start=start, end=start + 2 * i, step=1)
        if act.op == "silu":
            return n, make("silu_and_mul", [y])
        return n, make("gelu_and_mul", [y], approximate=act.attrs["approximate"])
    return None


@dataclass(frozen=True)
class GatedActivation(Pass):
    """Matches: mul(act(y[..., s:s+I]), y[..., s+I:s+2I]) (either operand order) with act silu
    or gelu (exact or tanh), y the merged gate/up projection (merge-projections' output, or a
    fused gate_up weight split by chunk). Emits: silu_and_mul(y) or gelu_and_mul(y)
    {approximate}, on y[..., s:s+2I] where y holds more than [gate | up] (Cohere's q/k/v and
    gate/up read one norm and merge into one GEMM; Qwen2-MoE's router and shared expert too). Other gates stay generic: gpt_oss's clamped, interleaved
    (x * sigmoid(1.702 x)) * (up + 1) is no act(gate) * up."""

    name = "gated-activation"

    def apply(self, graph: Graph) -> Graph:
        return substitute_matches(graph, (_match(n) for n in graph.nodes))
