"""expert-linear: the batched-experts GEMV of traced MoE layers becomes one grouped `expert_linear`."""

from __future__ import annotations

from dataclasses import dataclass

from kiln.ir.dims import dims_equal
from kiln.ir.graph import Graph, Node
from kiln.passes.base import Pass, make, weight_only
from kiln.passes.patterns import substitute_matches


def _gathered(g: Node) -> tuple[Node, Node] | None:
    """(W, ids) when g = index(W, ids) {axes: [0]}: the expert weights W [E, ., .] picked per row
    by integer ids [N]."""
    if g.op != "index" or g.attrs["axes"] != [0] or len(g.inputs) != 2:
        return None
    w, ids = g.inputs
    if w.type.rank != 3 or not weight_only(w) or ids.type.rank != 1 or ids.type.dtype not in ("int64", "int32"):
        return None
    return w, ids


def _rows(v: Node, n: object, k: object, column: bool) -> Node | None:
    """x [N, K] when v = reshape(x) to [N, K, 1] (column) or [N, 1, K] (row)."""
    want = (n, k, 1) if column else (n, 1, k)
    if v.op != "reshape" or v.type.rank != 3 or not all(dims_equal(a, b) for a, b in zip(v.type.shape, want, strict=True)):
        return None
    x = v.inputs[0]
    if x.type.rank != 2 or not (dims_equal(x.type.shape[0], n) and dims_equal(x.type.shape[1], k)):
        return None
    return x


def _match(n: Node) -> tuple[Node, Node] | None:
    """(n, expert_linear) for n = reshape(matmul(...)) to [N, M], else None."""
    if n.op != "reshape" or n.type.rank != 2 or n.inputs[0].op != "matmul":
        return None
    a, b = n.inputs[0].inputs
    if (found := _gathered(a)) is not None:
        # W [E, M, K] at ids times x as a column [N, K, 1] (Mixtral, Qwen2-MoE)
        w, ids = found
        x = _rows(b, ids.type.shape[0], w.type.shape[2], column=True)
        weight = w
    elif (found := _gathered(b)) is not None:
        # x as a row [N, 1, K] times W [E, K, M] at ids (gpt_oss): W's transpose is the weight
        w, ids = found
        x = _rows(a, ids.type.shape[0], w.type.shape[1], column=False)
        weight = make("permute", [w], dims=[0, 2, 1])
    else:
        return None
    if x is None:
        return None
    return n, make("expert_linear", [x, weight, ids])


@dataclass(frozen=True)
class ExpertLinear(Pass):
    """Matches: reshape(matmul(index(W, ids), reshape(x, [N, K, 1])), [N, M]) with W [E, M, K]
    weight-only (Mixtral, Qwen2-MoE), and reshape(matmul(reshape(x, [N, 1, K]), index(W, ids)),
    [N, M]) with W [E, K, M] (gpt_oss). Emits: expert_linear(x, W, ids) (W permuted to [E, M, K]
    in the second form, a weight-only permute that codegen folds), so no [N, M, K] gathered
    weight is built. Routing, expert biases and gpt_oss's clamped gate stay generic around it."""

    name = "expert-linear"

    def apply(self, graph: Graph) -> Graph:
        return substitute_matches(graph, (_match(n) for n in graph.nodes))
