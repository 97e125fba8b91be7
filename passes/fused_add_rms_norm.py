"""fused-add-rms-norm: a residual add and the RMSNorm of its sum become one two-result op."""

from __future__ import annotations

from dataclasses import dataclass

from kiln.ir.graph import Graph, Node
from kiln.passes.base import Pass, make


def _fusable(n: Node) -> bool:
    """An rms_norm over the last axis of an add of two values of its type, computed the way
    fused_add_rms_norm computes it (offset/weight_fp32 set: kernels.rms_normalize)."""
    if n.op != "rms_norm" or "offset" not in n.attrs or "weight_fp32" not in n.attrs:
        return False
    s = n.inputs[0]
    if s.op != "add" or n.attrs["normalized_shape"] != [s.type.shape[-1]]:
        return False
    a, b = s.inputs
    return a.type.same_as(b.type) and a.type.same_as(s.type)


@dataclass(frozen=True)
class FusedAddRmsNorm(Pass):
    """Matches: rms_norm(add(a, b)[, w]) with offset/weight_fp32 set (what rms-norm emits), a
    and b of one type — the residual add before a pre-norm, whose sum the next residual add
    reads too. Emits: fused_add_rms_norm(a, b[, w]) and get_result 0 (the normed value) for
    the norm, get_result 1 (a + b) for every other reader of the sum. A sum normed twice is
    fused once; the other norm reads result 1."""

    name = "fused-add-rms-norm"

    def apply(self, graph: Graph) -> Graph:
        replace: dict[Node, Node] = {}
        for n in graph.nodes:
            if not _fusable(n) or n.inputs[0] in replace:
                continue
            s = n.inputs[0]
            fused = make("fused_add_rms_norm", [*s.inputs, *n.inputs[1:]], eps=n.attrs["eps"],
                         offset=n.attrs["offset"], weight_fp32=n.attrs["weight_fp32"])
            replace[n] = make("get_result", [fused], index=0)
            replace[s] = make("get_result", [fused], index=1)
        if not replace:
            return graph
        return graph.substitute(replace)
