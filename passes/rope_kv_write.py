"""rope-kv-write: a layer's q and k rotations and its KV-cache write become one op."""

from __future__ import annotations

from dataclasses import dataclass

from kiln.ir.graph import Graph, Node
from kiln.passes.base import Pass, make
from kiln.passes.patterns import sole_users


def _plain_rope(n: Node) -> bool:
    """A rope over one table pair (longrope's second pair and per-sequence choice stay apart)."""
    return n.op == "rope" and len(n.inputs) == 4


def _query_rope(graph_users: dict[Node, list[Node]], written_k: Node | None, k_rot: Node) -> Node | None:
    """The rope(q) of k_rot's layer: operand 0 of the paged_attention reading the written
    k cache, rotated by k_rot's positions and tables with k_rot's attributes."""
    if written_k is None:
        return None
    for a in graph_users[written_k]:
        if a.op != "paged_attention" or a.inputs[1] is not written_k:
            continue
        q_rot = a.inputs[0]
        if (_plain_rope(q_rot) and q_rot is not k_rot and q_rot.attrs == k_rot.attrs
                and all(x is y for x, y in zip(q_rot.inputs[1:], k_rot.inputs[1:], strict=True))):
            return q_rot
    return None


@dataclass(frozen=True)
class RopeKvWrite(Pass):
    """Matches: kv_cache_write(rope(k, pos, cos, sin), v, k_cache, v_cache, slots) whose
    rotated k nothing else reads, and the rope(q, pos, cos, sin) (same tables, positions and
    attributes; no longrope pair) that the paged_attention reading the written k cache takes as
    its query — what paged-attention leaves per layer. Emits: rope_kv_cache_write(q, k, v, pos,
    cos, sin, k_cache, v_cache, slots) with get_result 0/1 (the written caches) for the
    write's results and get_result 2 (q rotated) for every reader of rope(q): one kernel rotates
    q and k and stores k and v in their cache slots, where three read k back."""

    name = "rope-kv-write"

    def apply(self, graph: Graph) -> Graph:
        users = graph.users()
        sole = sole_users(graph)
        replace: dict[Node, Node] = {}
        for w in graph.nodes:
            if w.op != "kv_cache_write":
                continue
            k_rot, v, k_cache, v_cache, slots = w.inputs
            if not _plain_rope(k_rot) or sole.get(k_rot) is not w:
                continue
            results = {r.attrs["index"]: r for r in users[w] if r.op == "get_result"}
            q_rot = _query_rope(users, results.get(0), k_rot)
            if q_rot is None or q_rot in replace:
                continue
            q, pos, cos, sin = q_rot.inputs
            fused = make("rope_kv_cache_write", [q, k_rot.inputs[0], v, pos, cos, sin, k_cache, v_cache, slots],
                         **k_rot.attrs)
            # The write itself maps to the fused op (so it is dropped as an effect); its
            # projections and rope(q) read the fused op's results.
            replace[w] = fused
            for i, r in results.items():
                replace[r] = make("get_result", [fused], index=i)
            replace[q_rot] = make("get_result", [fused], index=2)
        if not replace:
            return graph
        return graph.substitute(replace)
