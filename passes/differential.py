"""--verify: run a pass's output against its input on random inputs through the interpreter."""

from __future__ import annotations

import torch

from kiln.errors import VerifyError
from kiln.ir.graph import Graph
from kiln.ir.interpreter import WeightFn, run_graph
from kiln.ir.step_inputs import (
    CU_SEQLENS,
    INPUT_IDS,
    LOGITS_INDICES,
    LORA_INDEX,
    POSITION_IDS,
    is_cache_input,
    is_lora_input,
    whole_sequence_inputs,
)
from kiln.ir.types import FLOAT_DTYPES, torch_dtype

# Max |a - b| relative to max |reference| per compute dtype: float32 reorderings (a merged
# GEMM sums in another order) stay far below 1e-4; half precisions round each op.
TOLERANCE = {"float32": 1e-4, "float64": 1e-9, "float16": 2e-2, "bfloat16": 5e-2}


def sample_batch(vocab: int, seed: int, lengths: tuple[int, ...] = (5, 11, 3)) -> dict[str, torch.Tensor]:
    """A flattened batch of random token ids in the step-input schema's names."""
    g = torch.Generator().manual_seed(seed)
    cu = whole_sequence_inputs(lengths, (), {}, PAGED_BLOCK_SIZE)[CU_SEQLENS.name]
    return {
        INPUT_IDS.name: torch.randint(0, vocab, (sum(lengths),), generator=g),
        POSITION_IDS.name: torch.cat([torch.arange(n) for n in lengths]),
        CU_SEQLENS.name: cu,
        LOGITS_INDICES.name: cu[1:].long() - 1,
    }


PAGED_BLOCK_SIZE = 4


def _inputs_for(graph: Graph, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    cu = batch[CU_SEQLENS.name]
    lengths = (cu[1:] - cu[:-1]).tolist()
    caches = {n.name: n.type for n in graph.inputs if is_cache_input(n.name)}
    names = {n.name for n in graph.inputs}
    batch = {**batch, **whole_sequence_inputs(lengths, names, caches, PAGED_BLOCK_SIZE, shuffle_seed=len(lengths))}
    out = {}
    for node in graph.inputs:
        if node.name not in batch:
            raise VerifyError(f"--verify does not know how to make graph input '{node.name}'")
        t = batch[node.name]
        out[node.name] = t.reshape(1, -1) if node.type.rank == 2 and t.dim() == 1 else t
    return out


LORA_SLOTS = 2
"""Adapter slots of --verify's LoRA stacks."""


def lora_batch(before: Graph, after: Graph, tokens: int, seed: int) -> dict[str, torch.Tensor]:
    """Random LoRA slot stacks for `after`'s LoRA inputs and each token's slot: random (some
    tokens -1) when `before` reads LoRA too, else -1 everywhere (the lora pass itself adds
    nothing for the base model)."""
    g = torch.Generator().manual_seed(seed + 1)
    out = {}
    for n in after.inputs:
        if is_lora_input(n.name):
            shape = [LORA_SLOTS, *(int(d) for d in n.type.shape[1:])]
            out[n.name] = (torch.randn(shape, generator=g) * 0.1).to(torch_dtype(n.type.dtype))
    if LORA_INDEX.name in {n.name for n in before.inputs}:
        index = torch.randint(-1, LORA_SLOTS, (tokens,), generator=g)
    else:
        index = torch.full((tokens,), LORA_INDEX.pad)
    out[LORA_INDEX.name] = index.to(torch_dtype(LORA_INDEX.dtype))
    return out


def _comparable(before: Graph, after: Graph, x: torch.Tensor, y: torch.Tensor,
                batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """The two outputs in one shape: flattened alike, or, where only `after` projects the
    sampled rows (last-token-logits), `before` restricted to those rows."""
    if x.numel() == y.numel():
        return x.reshape(-1), y.reshape(-1)
    has = {n.name for n in after.inputs} - {n.name for n in before.inputs}
    if LOGITS_INDICES.name in has and x.dim() >= 2:
        rows = x.reshape(-1, x.shape[-1])[batch[LOGITS_INDICES.name]]
        if rows.numel() == y.numel():
            return rows.reshape(-1), y.reshape(-1)
    return x, y


def check_equivalent(name: str, before: Graph, after: Graph, weights: WeightFn, seed: int = 0) -> float:
    """Max relative error between the two graphs on one random batch; VerifyError past tolerance."""
    batch = sample_batch(int(before.meta.get("vocab_size", 2)), seed)
    batch |= lora_batch(before, after, batch[INPUT_IDS.name].shape[0], seed)
    with torch.no_grad():
        a = run_graph(before, _inputs_for(before, batch), weights)
        b = run_graph(after, _inputs_for(after, batch), weights)
    if len(a) != len(b):
        raise VerifyError(f"pass '{name}' changed the number of outputs ({len(a)} -> {len(b)})")
    worst = 0.0
    for i, (x, y) in enumerate(zip(a, b, strict=True)):
        x, y = _comparable(before, after, x.float(), y.float(), batch)
        if x.shape != y.shape:
            raise VerifyError(f"pass '{name}' changed output {i} from {tuple(x.shape)} to {tuple(y.shape)}")
        scale = max(x.abs().max().item(), 1e-6)
        err = (x - y).abs().max().item() / scale
        dtype = before.outputs[i].type.dtype
        tol = TOLERANCE.get(dtype, 0.0) if dtype in FLOAT_DTYPES else 0.0
        if not err <= tol:
            raise VerifyError(
                f"pass '{name}' changed what the graph computes: output {i} differs by {err:.3g} "
                f"(relative to max |ref| {scale:.3g}; tolerance {tol:g} for {dtype})"
            )
        worst = max(worst, err)
    return worst



