"""Turns a scheduled step into the artifact's inputs, in buffers allocated once.

Names, dtypes and padding rules come from `kiln.ir.step_inputs`. Every input is a view into a
persistent buffer sized for the engine's limits (T = max_num_batched_tokens tokens, S =
max_num_seqs sequences, MB = ceil(max_model_len / BS) blocks per table row), filled on the host
(pinned when the device is CUDA; the vectorized arithmetic runs on numpy views of them) and
copied to the device with non_blocking copies.

Block tables are kept per request: each running request owns one row of a persistent
[S, MB] table and only its newly allocated blocks are written into it, so a step gathers its
rows instead of rebuilding them. Slots come from one vectorized gather:

    token j of sequence s, at position p:   slot = table[row(s), p // BS] * BS + p % BS

    request table (persistent)          step block_tables = request_table[rows of the step],
    row 0: [b7 b2 b9  0  0 ...]         then all-zero rows for padded sequences
    row 1: [b4  0  0  0  0 ...]
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from kiln.ir.step_inputs import (
    BLOCK_TABLES,
    CU_SEQLENS,
    HOST_INTS,
    INPUT_IDS,
    LOGITS_INDICES,
    LORA_INDEX,
    POSITION_IDS,
    SEQ_LENS,
    SLOT_MAPPING,
    STEP_INPUTS,
    TOTAL_LENS,
    bucket_tokens,
)
from kiln.ir.types import torch_dtype
from kiln.runtime.kv_cache_manager import KVCacheManager
from kiln.runtime.request import Request
from kiln.runtime.scheduler import SchedulerOutput

MAX_SEQ_LEN, MAX_QUERY_LEN = HOST_INTS


@dataclass
class StepBatch:
    """One step's model inputs and what to do with its logits."""

    inputs: dict[str, torch.Tensor]
    """Schema name -> tensor (views into the runner's buffers, sized to the padded counts)."""
    host_ints: dict[str, int]
    """max_seq_len and max_query_len of the real sequences."""
    sampled: list[Request] = field(default_factory=list)
    """The requests whose logits rows are sampled, in logits_indices order (the first
    len(sampled) rows; a padded decode step's padded rows follow them and are not sampled)."""
    num_tokens: int = 0
    """Real token rows (the padded count is len(inputs["input_ids"]))."""


@dataclass
class _Row:
    """A running request's row of the request table."""

    index: int
    table: list
    """The KV cache manager's block list the row mirrors (a new list after preemption)."""
    known: int = 0
    """Leading blocks of the table already written into the row."""


class ModelRunner:
    """Builds each step's inputs into persistent buffers; pad=True runs decode-only steps at
    bucketed sizes (`bucket_tokens`), so a decode batch of B sequences repeats one shape."""

    def __init__(self, kv: KVCacheManager, max_num_batched_tokens: int, max_num_seqs: int,
                 max_model_len: int, device: str | torch.device = "cpu", pad: bool = True):
        self.kv = kv
        self.device = torch.device(device)
        self.pad = pad
        self.max_tokens = max_num_batched_tokens
        self.max_seqs = max_num_seqs
        self.block_size = kv.block_size
        self.width = -(-max_model_len // kv.block_size)  # MB: fixed for the engine's life
        pin = self.device.type == "cuda"
        rows = {INPUT_IDS: self.max_tokens, POSITION_IDS: self.max_tokens, SLOT_MAPPING: self.max_tokens,
                CU_SEQLENS: self.max_seqs + 1, SEQ_LENS: self.max_seqs, TOTAL_LENS: self.max_seqs,
                LOGITS_INDICES: self.max_seqs, LORA_INDEX: self.max_tokens}
        self._host = {i.name: torch.zeros(n, dtype=torch_dtype(i.dtype), pin_memory=pin) for i, n in rows.items()}
        self._host[BLOCK_TABLES.name] = torch.zeros(self.max_seqs, self.width, dtype=torch_dtype(BLOCK_TABLES.dtype),
                                                    pin_memory=pin)
        self._np = {k: v.numpy() for k, v in self._host.items()}
        self._dev = self._host if not pin else {k: torch.empty_like(v, device=self.device) for k, v in self._host.items()}
        # The request table: one row per running request.
        self._req_np = np.zeros((self.max_seqs, self.width), dtype=self._np[BLOCK_TABLES.name].dtype)
        self._rows: dict[str, _Row] = {}
        self._free_rows = list(range(self.max_seqs - 1, -1, -1))
        self._arange = np.arange(self.max_tokens, dtype=np.int64)  # [T]
        self._fill_host = torch.zeros(2, self.max_seqs, dtype=torch.int64, pin_memory=pin)  # see _fill
        self._fill_np = self._fill_host.numpy()
        self._fill_dev = self._fill_host if not pin else torch.empty_like(self._fill_host, device=self.device)
        self._copied: torch.cuda.Event | None = None
        """Recorded after a step's host-to-device copies: the host buffers are not rewritten before."""

    # -- per-request rows ------------------------------------------------------------------------

    def release(self, req: Request) -> None:
        """Forget a finished or preempted request's row."""
        row = self._rows.pop(req.request_id, None)
        if row is not None:
            self._free_rows.append(row.index)

    def _row(self, req: Request) -> int:
        """The request's row index, with any newly allocated blocks written into it."""
        table = self.kv.table(req)
        row = self._rows.get(req.request_id)
        if row is None or row.table is not table:  # new, or re-admitted after preemption
            if row is None:
                row = self._rows[req.request_id] = _Row(self._free_rows.pop(), table)
            row.table, row.known = table, 0
            self._req_np[row.index] = BLOCK_TABLES.pad
        if len(table) > row.known:
            if len(table) > self.width:
                raise ValueError(f"request {req.request_id} holds {len(table)} blocks; the table has {self.width}")
            self._req_np[row.index, row.known : len(table)] = [b.block_id for b in table[row.known :]]
            row.known = len(table)
        return row.index

    # -- one step --------------------------------------------------------------------------------

    def prepare(self, step: SchedulerOutput, feed: torch.Tensor | None = None,
                feed_rows: dict[str, int] | None = None) -> StepBatch:
        """Inputs for one forward pass and the requests whose last row is sampled.

        Request r contributes its tokens [computed, computed + n): positions continue from what
        is cached, slots come from its block table, and if the chunk reaches the end of its
        tokens its last row is in logits_indices (a prefill chunk that stops short is not sampled).
        A token the host does not know yet (a PLACEHOLDER, async scheduling) is the previous
        step's sampled token feed[feed_rows[r]] on the device: copied into input_ids there, after
        the host's copy and in stream order, so a CUDA graph replays the same buffers.
        """
        if self._copied is not None:  # the previous step's copies must be done reading the host buffers
            self._copied.synchronize()
        for req in step.preempted:
            self.release(req)
        num_seqs = len(step.requests)
        if num_seqs == 0 or num_seqs > self.max_seqs:
            raise ValueError(f"a step has 1..{self.max_seqs} sequences, got {num_seqs}")
        ids: list[int] = []
        starts: list[int] = []
        rows: list[int] = []
        lora_slots: list[int] = []
        logits_rows: list[int] = []
        sampled: list[Request] = []
        end = 0
        totals: list[int] = []
        fill: list[tuple[int, int]] = []  # (input row, feed row) of the placeholders
        for req, n in zip(step.requests, step.num_new_tokens, strict=True):
            start = req.num_computed_tokens
            tokens = req.all_token_ids
            if req.num_pending and len(tokens) - req.num_pending < start + n:
                if feed_rows is None or req.request_id not in feed_rows or req.num_pending != 1:
                    raise ValueError(f"request {req.request_id} has a token on the device that no feed gives")
                fill.append((end + len(tokens) - 1 - start, feed_rows[req.request_id]))
            ids += tokens[start : start + n]
            starts.append(start)
            totals.append(len(tokens))
            rows.append(self._row(req))
            lora_slots.append(req.lora_slot)
            end += n
            if start + n == len(tokens):
                logits_rows.append(end - 1)
                sampled.append(req)
        num_tokens = end
        if num_tokens > self.max_tokens:
            raise ValueError(f"a step has at most {self.max_tokens} tokens, got {num_tokens}")
        padded_seqs, padded_tokens = num_seqs, num_tokens
        if self.pad and num_tokens == num_seqs:  # all decodes: run at the bucketed shape
            padded_seqs = padded_tokens = bucket_tokens(num_seqs, self.max_seqs)

        h = self._np  # numpy views of the host buffers: one small op costs ~1 us, a torch op ~10
        n_new = np.array(step.num_new_tokens, dtype=np.int64)  # [S]
        start = np.array(starts, dtype=np.int64)  # [S]
        row = np.array(rows, dtype=np.int64)  # [S]
        ends = np.cumsum(n_new)  # [S]
        cu = h[CU_SEQLENS.name]  # [S_max + 1]
        cu[1 : num_seqs + 1] = ends
        cu[num_seqs + 1 : padded_seqs + 1] = num_tokens  # padded sequences own no rows
        seq_of = np.searchsorted(ends, self._arange[:num_tokens], side="right")  # [T]: each token's sequence
        pos = h[POSITION_IDS.name][:num_tokens]  # [T]
        np.subtract(self._arange[:num_tokens], (ends - n_new - start)[seq_of], out=pos)
        blocks = self._req_np[row[seq_of], pos // self.block_size]  # [T]
        h[SLOT_MAPPING.name][:num_tokens] = blocks * self.block_size + pos % self.block_size
        h[INPUT_IDS.name][:num_tokens] = ids
        h[LORA_INDEX.name][:num_tokens] = np.repeat(np.array(lora_slots), n_new)  # each token its request's slot
        lens = h[SEQ_LENS.name]  # [S_max]
        lens[:num_seqs] = start + n_new
        h[BLOCK_TABLES.name][:num_seqs] = self._req_np[row]
        h[BLOCK_TABLES.name][num_seqs:padded_seqs] = BLOCK_TABLES.pad
        if padded_seqs > num_seqs:  # a padded decode step samples its padded rows too (one graph per bucket)
            logits_rows += [LOGITS_INDICES.pad] * (padded_seqs - num_seqs)
        h[LOGITS_INDICES.name][: len(logits_rows)] = logits_rows
        for name in (INPUT_IDS, POSITION_IDS, SLOT_MAPPING, LORA_INDEX):
            h[name.name][num_tokens:padded_tokens] = name.pad
        lens[num_seqs:padded_seqs] = SEQ_LENS.pad
        total = h[TOTAL_LENS.name]  # [S_max]
        total[:num_seqs] = totals
        total[num_seqs:padded_seqs] = TOTAL_LENS.pad

        sizes = {INPUT_IDS.name: padded_tokens, POSITION_IDS.name: padded_tokens, SLOT_MAPPING.name: padded_tokens,
                 LORA_INDEX.name: padded_tokens,
                 CU_SEQLENS.name: padded_seqs + 1, SEQ_LENS.name: padded_seqs, TOTAL_LENS.name: padded_seqs,
                 BLOCK_TABLES.name: padded_seqs,
                 LOGITS_INDICES.name: len(logits_rows)}
        inputs = self._on_device(sizes, non_blocking=True)
        if fill:
            self._fill(inputs[INPUT_IDS.name], feed, fill)
        if self._dev is not self._host:
            self._copied = torch.cuda.Event()
            self._copied.record()
        host_ints = {MAX_SEQ_LEN: int(lens[:num_seqs].max()), MAX_QUERY_LEN: int(n_new.max())}
        return StepBatch(inputs, host_ints, sampled, num_tokens)

    def _fill(self, input_ids: torch.Tensor, feed: torch.Tensor, fill: list[tuple[int, int]]) -> None:
        """input_ids[row] = feed[feed row] on the device for each (row, feed row) of fill."""
        k = len(fill)
        self._fill_np[:, :k] = np.array(fill, dtype=np.int64).T
        idx = self._fill_dev[:, :k]  # [2, k]: input rows, feed rows
        if self._fill_dev is not self._fill_host:
            idx.copy_(self._fill_host[:, :k], non_blocking=True)
        input_ids.index_copy_(0, idx[0], feed.index_select(0, idx[1]).to(input_ids.dtype))

    def decode_inputs(self, num_seqs: int) -> dict[str, torch.Tensor]:
        """The device buffers of a decode step of num_seqs sequences, filled with a valid
        placeholder step (one token each at position 0, written to no slot): what a CUDA graph
        of that bucket is captured with; real steps of the bucket reuse the same buffers."""
        h = self._np
        for name, value in ((INPUT_IDS, 0), (POSITION_IDS, 0), (SLOT_MAPPING, -1), (SEQ_LENS, 1), (TOTAL_LENS, 1),
                            (LORA_INDEX, LORA_INDEX.pad)):
            h[name.name][:num_seqs] = value
        h[CU_SEQLENS.name][: num_seqs + 1] = np.arange(num_seqs + 1)
        h[LOGITS_INDICES.name][:num_seqs] = np.arange(num_seqs)
        h[BLOCK_TABLES.name][:num_seqs] = BLOCK_TABLES.pad
        sizes = {n: num_seqs for n in STEP_INPUTS} | {CU_SEQLENS.name: num_seqs + 1}
        return self._on_device(sizes, non_blocking=False)

    def _on_device(self, sizes: dict[str, int], non_blocking: bool) -> dict[str, torch.Tensor]:
        """Each step input as the first sizes[name] rows of its device buffer, copied from the
        host buffer (the same tensor on the CPU)."""
        inputs = {}
        for name in STEP_INPUTS:
            inputs[name] = self._dev[name][: sizes[name]]
            if self._dev is not self._host:
                inputs[name].copy_(self._host[name][: sizes[name]], non_blocking=non_blocking)
        return inputs
