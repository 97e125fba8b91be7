"""What a graph costs, and how much of it the kernel op set covers (for `kiln inspect`).

FLOPs are counted for one nominal step (NOMINAL: a 512-token prefill of one sequence whose
queries attend to 512 cached tokens); only the step's computation counts: values that depend on
weights alone are folded at compile time and cost nothing per step. Matmul-like ops count
2 * multiply-adds; attention 2 * T * context * heads * (D + Dv); elementwise ops and the rest
one FLOP per output element (reductions: per input element); data movement none.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field

from kiln.ir.dims import evaluate
from kiln.ir.graph import SOURCE_OPS, Graph, Node
from kiln.ir.ops import get_op

NOMINAL: dict[str, int] = {"T": 512, "S": 1, "R": 1, "NB": 32, "BS": 16, "MB": 32, "NL": 4}
"""Symbol values of the nominal step."""
CONTEXT = 512
"""Keys each query of the nominal step attends to."""

# Ops that only move or relabel data.
MOVEMENT = frozenset({
    "reshape", "permute", "expand", "slice", "cat", "stack", "index", "index_select", "gather_rows",
    "embedding", "get_result", "repeat", "repeat_interleave", "kv_cache_write", "cast", "contiguous",
})  # fmt: skip


def node_flops(n: Node, b: Mapping[str, int] = NOMINAL) -> int:
    """FLOPs of one op node at bindings b (see the module docstring)."""
    if n.op in SOURCE_OPS or n.op in MOVEMENT:
        return 0
    ins = [i.type for i in n.inputs]
    if n.op in ("linear", "quantized_linear"):  # N from the result: the weight's layout places it
        return 2 * ins[0].numel(b) * evaluate(n.type.shape[-1], b)
    if n.op == "expert_linear":
        x, w = ins[0], ins[1]
        return 2 * x.numel(b) * evaluate(w.shape[-2], b)
    if n.op == "lora":  # shrink x [T, K] to rank R, expand to N: per token R * (K + N) multiply-adds (+ N: base)
        _, rank, k = (evaluate(d, b) for d in ins[1].shape)
        t, out = evaluate(ins[0].shape[0], b), evaluate(n.type.shape[-1], b)
        return 2 * t * rank * (k + out) + (t * out if len(ins) == 5 else 0)
    if n.op == "matmul":
        k = evaluate(ins[0].shape[-1], b)
        return 2 * n.type.numel(b) * k
    if n.op == "einsum":
        lhs = n.attrs["equation"].replace(" ", "").split("->")[0].split(",")
        sizes = {c: evaluate(d, b) for term, t in zip(lhs, ins, strict=False) for c, d in zip(term, t.shape, strict=False)}
        return 2 * math.prod(sizes.values())
    if n.op in ("attention", "paged_attention"):
        q, out = ins[0], n.type
        heads_d = q.numel(b) // evaluate(q.shape[0], b)
        heads_dv = out.numel(b) // evaluate(out.shape[0], b)
        return 2 * evaluate(q.shape[0], b) * CONTEXT * (heads_d + heads_dv)
    if get_op(n.op).kind in ("reduce", "dim"):
        return ins[0].numel(b)
    if n.op == "fused_elementwise":  # one FLOP per element per step of the group
        return len(n.attrs["expr"]) * n.type.numel(b)
    return sum(t.numel(b) for t in n.type.types)


def _step_nodes(graph: Graph) -> list[Node]:
    """The op nodes that run per step: those depending on some graph input."""
    live: set[Node] = set()
    out = []
    for n in graph.nodes:
        if n.op == "input" or any(i in live for i in n.inputs):
            live.add(n)
            if n.op not in SOURCE_OPS:
                out.append(n)
    return out


@dataclass
class Coverage:
    """How much of a graph runs in kernel-set ops."""

    flops: int
    kernel_flops: int
    weight_bytes: int
    kernel_weight_bytes: int
    kernel_ops: Counter[str] = field(default_factory=Counter)
    other_ops: Counter[str] = field(default_factory=Counter)
    """Every op outside the kernel set, with its count (movement ops included)."""
    other_flops: Counter[str] = field(default_factory=Counter)

    @property
    def flop_share(self) -> float:
        return self.kernel_flops / self.flops if self.flops else 1.0

    @property
    def weight_share(self) -> float:
        return self.kernel_weight_bytes / self.weight_bytes if self.weight_bytes else 1.0


def kernel_coverage(graph: Graph, bindings: Mapping[str, int] = NOMINAL) -> Coverage:
    """FLOPs and weight bytes of the per-step graph, split by kernel-set ops and the rest.
    A weight counts as covered when every step op that reads it (directly, or through a
    weight-only subgraph) is a kernel-set op."""
    steps = _step_nodes(graph)
    cov = Coverage(0, 0, 0, 0)
    readers: dict[Node, list[Node]] = {}
    for n in steps:
        kernel = get_op(n.op).kernel
        f = node_flops(n, bindings)
        cov.flops += f
        if kernel:
            cov.kernel_flops += f
            cov.kernel_ops[n.op] += 1
        elif n.op != "get_result":
            cov.other_ops[n.op] += 1
            cov.other_flops[n.op] += f
        for p in _params_read(n, set(steps)):
            readers.setdefault(p, []).append(n)
    for p, users in readers.items():
        size = p.type.nbytes(bindings)
        cov.weight_bytes += size
        if all(get_op(u.op).kernel for u in users):
            cov.kernel_weight_bytes += size
    return cov


def _params_read(n: Node, step: set[Node]) -> set[Node]:
    """Params a step op reads, directly or through weight-only values."""
    found: set[Node] = set()
    stack = [i for i in n.inputs if i not in step]
    seen: set[Node] = set()
    while stack:
        x = stack.pop()
        if x in seen:
            continue
        seen.add(x)
        if x.op == "param":
            found.add(x)
        stack.extend(x.inputs)
    return found
