"""Turns a scheduled step into the artifact's inputs (flattened tokens + paged metadata)."""

from __future__ import annotations

import torch

from kiln.runtime.kv_cache_manager import KVCacheManager
from kiln.runtime.request import Request
from kiln.runtime.scheduler import SchedulerOutput


def build_step_inputs(step: SchedulerOutput, kv: KVCacheManager) -> tuple[dict[str, torch.Tensor], list[Request]]:
    """Inputs for one forward pass and the requests whose last row is sampled.

    Request r contributes its tokens [computed, computed + n): positions continue from what
    is cached, slots come from its block table, and if the chunk reaches the end of its
    tokens its last row is in logits_indices (a prefill chunk that stops short is not sampled).
    """
    bs = kv.block_size
    ids: list[int] = []
    pos: list[int] = []
    slots: list[int] = []
    cu = [0]
    seq_lens: list[int] = []
    rows: list[int] = []
    sampled: list[Request] = []
    tables = []
    for req, n in zip(step.requests, step.num_new_tokens, strict=True):
        start = req.num_computed_tokens
        table = kv.block_ids(req)
        ids.extend(req.all_token_ids[start : start + n])
        pos.extend(range(start, start + n))
        slots.extend(table[j // bs] * bs + j % bs for j in range(start, start + n))
        cu.append(cu[-1] + n)
        seq_lens.append(start + n)
        tables.append(table)
        if start + n == req.num_tokens:
            rows.append(cu[-1] - 1)
            sampled.append(req)
    width = max(len(t) for t in tables)
    block_tables = torch.zeros(len(tables), width, dtype=torch.int32)
    for i, t in enumerate(tables):
        block_tables[i, : len(t)] = torch.tensor(t, dtype=torch.int32)
    inputs = {
        "input_ids": torch.tensor(ids, dtype=torch.int64),
        "position_ids": torch.tensor(pos, dtype=torch.int64),
        "cu_seqlens": torch.tensor(cu, dtype=torch.int32),
        "slot_mapping": torch.tensor(slots, dtype=torch.int64),
        "block_tables": block_tables,
        "seq_lens": torch.tensor(seq_lens, dtype=torch.int32),
        "logits_indices": torch.tensor(rows, dtype=torch.int64),
    }
    return inputs, sampled
