"""The quantize-weights pass's calibration: AWQ's activation-aware per-channel scales.

Runs the graph in the reference interpreter on calibration tokens, keeps evenly strided rows
of the input of every quantized linear (at most ROW_BUDGET bytes over all groups, in the model's
dtype; mean |x| is over every token), and for each group of linears sharing one input x [R, K]
searches (AWQ, Lin et al. 2023, its `auto_scale`)

    s = mean|x|^alpha / sqrt(max * min),   alpha in 0, 1/grid, ..., 1
    minimizing  sum over the group of  mean((x / s) @ Q(W * s)^T - x @ W^T)^2

where Q is the int4 round-to-nearest quantization the pass will apply (ir/ops/quantize.py).
alpha 0 is plain round-to-nearest, so a chosen scale is never worse on the calibration rows.
The pass multiplies W's columns by s and divides x by s (or the norm weight before it).

It lives in passes/ beside the pass it parametrizes (as rope_tables.py does for rope): it
reads only the IR, its interpreter and its ops; the compile driver tokenizes the text.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from tqdm.auto import tqdm

from kiln.errors import KilnError
from kiln.ir.graph import Graph, Node
from kiln.ir.interpreter import WeightFn, run_graph
from kiln.ir.ops.quantize import int_dequantize, int_quantize
from kiln.ir.step_inputs import INPUT_IDS, POSITION_IDS, whole_sequence_inputs
from kiln.ir.types import torch_dtype
from kiln.passes.quantize_weights import (
    DEFAULT_GROUP_SIZE,
    int4_group_size,
    quantized_linears,
    weight_name,
)

GRID = 10
"""alpha steps: 0, 0.1, ..., 1."""
MAX_ROWS = 4096
"""Calibration rows (tokens) a group's search uses at most (evenly strided over all rows)."""
ROW_BUDGET = 1 << 30
"""Bytes of calibration rows kept at once, all groups together (1 GiB: at Llama 3.1 8B in bfloat16
a row of every group is 1.7 MB, so each group keeps ~630 rows)."""
TOKENS_PER_STEP = 2048
"""Calibration tokens the interpreter runs at once at most (whole sequences, one at least)."""


def _inputs(graph: Graph, seqs: Sequence[Sequence[int]]) -> dict[str, torch.Tensor]:
    lengths = [len(s) for s in seqs]
    names = {n.name for n in graph.inputs}
    out = whole_sequence_inputs(lengths, names, {}, 16)
    out[INPUT_IDS.name] = torch.tensor([t for s in seqs for t in s], dtype=torch.long)
    out[POSITION_IDS.name] = torch.cat([torch.arange(n) for n in lengths])
    missing = [n.name for n in graph.inputs if n.name not in out]
    if missing:
        raise KilnError(f"calibration does not know how to make graph input(s) {', '.join(missing)}")
    return {n.name: out[n.name].reshape(1, -1) if n.type.rank == 2 and out[n.name].dim() == 1 else out[n.name]
            for n in graph.inputs}


def row_plan(xs: Sequence[Node], budget: int = ROW_BUDGET,
             tokens_per_step: int = TOKENS_PER_STEP) -> tuple[int, int]:
    """(rows each group keeps, tokens per interpreter step) for the input nodes xs: one row of
    every group takes sum(K * itemsize) bytes, so budget // that rows fit (MAX_ROWS at most, one
    at least); a step's values of xs stay within the budget as well (a whole sequence at least)."""
    row_bytes = sum(int(x.type.shape[-1]) * torch_dtype(x.type.dtype).itemsize for x in xs)
    fit = budget // row_bytes
    return max(1, min(MAX_ROWS, fit)), max(1, min(tokens_per_step, fit))


def collect_inputs(graph: Graph, weights: WeightFn, seqs: Sequence[Sequence[int]],
                   tokens_per_step: int = TOKENS_PER_STEP, lm_head: bool = False,
                   budget: int = ROW_BUDGET) -> dict[Node, tuple[torch.Tensor, torch.Tensor]]:
    """For each input node of a quantized linear: (its rows [R, K] in the model's dtype, every
    stride-th row of the calibration tokens with R <= row_plan's, kept as each step runs; mean |x|
    [K] in float32 over every row). All groups' rows take at most `budget` bytes together."""
    xs = list(dict.fromkeys(n.inputs[0] for n in quantized_linears(graph, lm_head)))
    probe = graph.with_nodes(graph.inputs, xs)
    keep, step = row_plan(xs, budget, tokens_per_step)
    batches: list[list[Sequence[int]]] = [[]]
    for s in seqs:
        if batches[-1] and sum(map(len, batches[-1])) + len(s) > step:
            batches.append([])
        batches[-1].append(s)
    total = sum(map(len, seqs))
    stride = max(1, -(-total // keep))
    # rows[x]: [ceil(total / stride), K], filled in place (no concatenation doubling it)
    rows = {x: torch.empty(-(-total // stride), int(x.type.shape[-1]), dtype=torch_dtype(x.type.dtype)) for x in xs}
    sums: dict[Node, torch.Tensor] = {}
    done = kept = 0
    with torch.no_grad():
        for batch in tqdm(batches, desc="calibration", unit="batch", disable=None):
            first = -done % stride  # the batch's tokens at multiples of stride over all tokens
            n = len(range(first, sum(map(len, batch)), stride))
            for x, v in zip(xs, run_graph(probe, _inputs(graph, batch), weights), strict=True):
                v = v.reshape(-1, v.shape[-1])
                sums[x] = sums.get(x, 0) + v.float().abs().sum(dim=0)
                rows[x][kept : kept + n] = v[first::stride]
            done, kept = done + sum(map(len, batch)), kept + n
    return {x: (r, sums[x] / total) for x, r in rows.items()}


def _weight(w: Node, weights: WeightFn) -> torch.Tensor:
    return run_graph(Graph([], []).with_nodes([], [w]), {}, weights)[0].float()


def search_scale(x: torch.Tensor, ws: Sequence[torch.Tensor], group_size: int = DEFAULT_GROUP_SIZE,
                 grid: int = GRID, mean_abs: torch.Tensor | None = None) -> tuple[torch.Tensor | None, float, float]:
    """(the best scale [K] or None when alpha 0 wins, its alpha, its error / round-to-nearest's)
    for the linears ws [N_i, K] reading x [R, K]; mean_abs [K] defaults to x's."""
    k = x.shape[1]
    group = int4_group_size(k, group_size)
    mean = (x.abs().mean(dim=0) if mean_abs is None else mean_abs).clamp(min=1e-4)
    refs = [x @ w.T for w in ws]
    best: tuple[float, float, torch.Tensor | None] = (float("inf"), 0.0, None)
    base = None
    for i in range(grid + 1):
        alpha = i / grid
        s = mean.pow(alpha)
        s = s / (s.max() * s.min()).sqrt()
        err = 0.0
        for w, y in zip(ws, refs, strict=True):
            q, sc, z = int_quantize(w * s, 4, group)
            err += ((x / s) @ int_dequantize(q, sc, z, 4).T - y).pow(2).mean().item()
        base = err if base is None else base
        if err < best[0]:
            best = (err, alpha, s if i else None)
    return best[2], best[1], best[0] / base if base else 1.0


def awq_scales(graph: Graph, weights: WeightFn, seqs: Sequence[Sequence[int]],
               group_size: int = DEFAULT_GROUP_SIZE, lm_head: bool = False,
               budget: int = ROW_BUDGET) -> tuple[dict[str, tuple[float, ...]], dict[str, float]]:
    """(weight name -> scale [K] for the quantize-weights pass, weight name -> chosen alpha) from
    the calibration token sequences `seqs` (module docstring); the rows kept take at most `budget`
    bytes (collect_inputs), each group's are dropped once its scale is found."""
    xs = collect_inputs(graph, weights, seqs, lm_head=lm_head, budget=budget)
    members: dict[Node, list[Node]] = {}
    for n in quantized_linears(graph, lm_head):
        members.setdefault(n.inputs[0], []).append(n)
    scales: dict[str, tuple[float, ...]] = {}
    alphas: dict[str, float] = {}
    for x, linears in tqdm(members.items(), desc="awq search", unit="group", disable=None):
        ws = [_weight(m.inputs[1], weights) for m in linears]
        rows, mean_abs = xs.pop(x)
        s, alpha, _ = search_scale(rows.float(), ws, group_size, mean_abs=mean_abs)
        for m in linears:
            alphas[weight_name(m.inputs[1])] = alpha
            if s is not None:
                scales[weight_name(m.inputs[1])] = tuple(s.tolist())
    return scales, alphas
