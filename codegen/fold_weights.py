"""Weight preprocessing: subgraphs that read only parameters are computed once, at compile time.

Passes describe weight transformations as ordinary ops on params (merge-projections emits a
`cat` of q/k/v weights, GPT-2's Conv1D a `permute`); this turns each such value into a new
param whose tensor the artifact stores, so the runtime never recomputes it.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import torch

from kiln.ir.graph import Graph, Node, param_node
from kiln.ir.interpreter import WeightFn, run_graph

RUNTIME_OPS = frozenset({"dequant_int", "dequant_int_offset", "dequant_fp8"})
"""Ops computed at run time even over params alone: a packed weight's decompression (folding it
would store the float weight and undo the quantization); what they read still folds."""


def _derived_name(n: Node, sources: list[str]) -> str:
    if len(sources) == 1:
        return f"{sources[0]}.{n.op}"
    prefix = os.path.commonprefix(sources)
    prefix = prefix[: prefix.rfind(".") + 1]
    suffix = os.path.commonprefix([s[::-1] for s in sources])[::-1]
    suffix = suffix[suffix.find(".") :] if "." in suffix else ""
    middles = [s[len(prefix) : len(s) - len(suffix)] for s in sources]
    return prefix + "+".join(middles) + suffix


def fold_weights(graph: Graph, weights: WeightFn) -> tuple[Graph, dict[str, Callable[[], torch.Tensor]]]:
    """The graph with every foldable weight-only value replaced by a param, and for each new
    param a function computing its tensor. A value folds when it depends on no graph input and
    is not larger than the params it reads (an expand or a broadcast stays in the graph), or
    when it is built on a static `arange`: a table over positions (rope's cos/sin, [P, R]
    from an inv_freq of R/2), stored once instead of recomputing transcendentals every step.
    RUNTIME_OPS (dequantization) never fold: the packed params they read are stored instead."""
    weight_only: dict[Node, list[Node]] = {}
    ranged: set[Node] = set()  # weight-only values computed from a static arange
    for n in graph.nodes:
        if n.op == "param":
            weight_only[n] = [n]
        elif n.op == "const":
            weight_only[n] = []
        elif n.op == "arange" and all(isinstance(d, int) for d in n.type.shape):
            weight_only[n] = []
            ranged.add(n)
        elif n.op not in ("input", *RUNTIME_OPS) and n.inputs and all(i in weight_only for i in n.inputs):
            weight_only[n] = list(dict.fromkeys(p for i in n.inputs for p in weight_only[i]))
            if any(i in ranged for i in n.inputs):
                ranged.add(n)
    users = graph.users()
    roots = [
        n for n in weight_only
        if n.op not in ("param", "const") and weight_only[n]
        and (any(u not in weight_only for u in users[n]) or n in graph.outputs)
        and n.type.shape and all(isinstance(d, int) for d in n.type.shape)
        and (n in ranged or n.type.numel() <= sum(p.type.numel() for p in weight_only[n]))
    ]
    taken = {p.name for p in graph.params}
    replace: dict[Node, Node] = {}
    producers: dict[str, Callable[[], torch.Tensor]] = {}
    for n in roots:
        name = _derived_name(n, [p.name for p in weight_only[n]])
        while name in taken:
            name += "'"
        taken.add(name)
        producers[name] = lambda n=n: run_graph(Graph([], []).with_nodes([], [n]), {}, weights)[0].contiguous()
        replace[n] = param_node(name, n.type)
    return (graph.substitute(replace) if replace else graph), producers
