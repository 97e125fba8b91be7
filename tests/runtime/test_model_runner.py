"""ModelRunner: its inputs equal a straightforward recomputation from the requests and block
tables, step after step (prefill chunks, decodes, preemption and re-admission); the block
table keeps one width; decode-only steps pad by the schema's rules."""

from __future__ import annotations

import pytest
import torch

from kiln.ir.step_inputs import (
    BLOCK_TABLES,
    CU_SEQLENS,
    INPUT_IDS,
    LOGITS_INDICES,
    POSITION_IDS,
    SEQ_LENS,
    SLOT_MAPPING,
    TOTAL_LENS,
    bucket_tokens,
)
from kiln.runtime.block_pool import BlockPool
from kiln.runtime.kv_cache_manager import KVCacheManager
from kiln.runtime.model_runner import MAX_QUERY_LEN, MAX_SEQ_LEN, ModelRunner
from kiln.runtime.request import Request
from kiln.runtime.sampling_params import SamplingParams
from kiln.runtime.scheduler import Scheduler, SchedulerOutput

BS = 4
MAX_LEN = 64
WIDTH = MAX_LEN // BS


def _reference(step: SchedulerOutput, kv: KVCacheManager) -> dict[str, list]:
    """The inputs of a step computed token by token from each request's whole block table."""
    ids, pos, slots, cu, lens, totals, rows, tables = [], [], [], [0], [], [], [], []
    for req, n in zip(step.requests, step.num_new_tokens, strict=True):
        start, table = req.num_computed_tokens, kv.block_ids(req)
        ids += req.all_token_ids[start : start + n]
        pos += list(range(start, start + n))
        slots += [table[j // BS] * BS + j % BS for j in range(start, start + n)]
        cu.append(cu[-1] + n)
        lens.append(start + n)
        totals.append(req.num_tokens)
        tables.append(table + [0] * (WIDTH - len(table)))
        if start + n == req.num_tokens:
            rows.append(cu[-1] - 1)
    return {INPUT_IDS.name: ids, POSITION_IDS.name: pos, SLOT_MAPPING.name: slots, CU_SEQLENS.name: cu,
            SEQ_LENS.name: lens, TOTAL_LENS.name: totals, LOGITS_INDICES.name: rows, BLOCK_TABLES.name: tables}


def _engine(num_blocks: int, budget: int, max_seqs: int, pad: bool):
    kv = KVCacheManager(BlockPool(num_blocks), BS)
    return kv, Scheduler(kv, budget, max_seqs), ModelRunner(kv, budget, max_seqs, MAX_LEN, pad=pad)


def _advance(step: SchedulerOutput, runner: ModelRunner, sched: Scheduler, token: int) -> None:
    """What the engine does after a step: computed counts catch up, sampled requests grow."""
    for req, n in zip(step.requests, step.num_new_tokens, strict=True):
        req.num_computed_tokens += n
        if req.num_computed_tokens == req.num_tokens:
            req.append_token(token)
            if req.num_output_tokens >= req.params.max_tokens:
                sched.finish(req, "length")
                runner.release(req)


@pytest.mark.parametrize("num_blocks", [40, 14])  # 14: too few for all, so requests get preempted
def test_inputs_equal_recomputation_over_many_steps(num_blocks):
    kv, sched, runner = _engine(num_blocks, budget=12, max_seqs=4, pad=False)
    g = torch.Generator().manual_seed(0)
    reqs = []
    for i, plen in enumerate([9, 3, 17, 5, 6]):
        ids = torch.randint(1, 100, (plen,), generator=g).tolist()
        reqs.append(Request(str(i), ids, SamplingParams(max_tokens=12)))
        sched.add(reqs[-1])
    kinds = set()
    for step_no in range(200):
        if not sched.has_work():
            break
        step = sched.schedule()
        batch = runner.prepare(step)
        want = _reference(step, kv)
        for name, value in want.items():
            got = batch.inputs[name]
            assert got.dtype == {BLOCK_TABLES.name: torch.int32, CU_SEQLENS.name: torch.int32,
                                 SEQ_LENS.name: torch.int32, TOTAL_LENS.name: torch.int32}.get(name, torch.int64), name
            assert got.tolist() == value, f"step {step_no}: {name}"
        assert batch.inputs[BLOCK_TABLES.name].shape[1] == WIDTH  # one width, every step
        assert batch.sampled == [r for r, n in zip(step.requests, step.num_new_tokens, strict=True)
                                 if r.num_computed_tokens + n == r.num_tokens]
        assert batch.host_ints == {MAX_SEQ_LEN: max(want[SEQ_LENS.name]), MAX_QUERY_LEN: max(step.num_new_tokens)}
        kinds.add((max(step.num_new_tokens) > 1, min(step.num_new_tokens) == 1))
        _advance(step, runner, sched, token=100 + step_no)
    assert all(r.finished for r in reqs)
    assert (True, True) in kinds  # some step mixed a prefill chunk with decodes
    if num_blocks == 14:
        assert sched.num_preemptions > 0  # re-admitted requests got fresh rows that matched
    assert not runner._rows and sorted(runner._free_rows) == list(range(4))


def test_block_rows_are_written_incrementally():
    kv, sched, runner = _engine(40, budget=64, max_seqs=2, pad=False)
    req = Request("a", list(range(1, 7)), SamplingParams(max_tokens=20))
    sched.add(req)
    writes = []
    for _ in range(12):
        step = sched.schedule()
        row = runner._rows.get("a")
        before = row.known if row else 0
        batch = runner.prepare(step)
        writes.append(runner._rows["a"].known - before)
        assert batch.inputs[BLOCK_TABLES.name][0].tolist()[: len(kv.table(req))] == kv.block_ids(req)
        _advance(step, runner, sched, token=7)
    # the 6-token prompt fills 2 blocks; token 8, 12, 16 (steps 3, 7, 11) each start one more
    assert writes == [2, 0, 0, 1, 0, 0, 0, 1, 0, 0, 0, 1]


@pytest.mark.parametrize("num_seqs", [1, 3, 5, 9, 17])
def test_decode_steps_pad_to_the_bucket(num_seqs):
    max_seqs = 32
    kv, sched, runner = _engine(200, budget=256, max_seqs=max_seqs, pad=True)
    reqs = [Request(str(i), [i + 1] * (3 + i), SamplingParams(max_tokens=50)) for i in range(num_seqs)]
    for r in reqs:
        sched.add(r)
    first = runner.prepare(step := sched.schedule())  # prefill: never padded
    assert len(first.inputs[INPUT_IDS.name]) == first.num_tokens == sum(3 + i for i in range(num_seqs))
    _advance(step, runner, sched, token=5)
    step = sched.schedule()
    batch = runner.prepare(step)
    want = _reference(step, kv)
    b, n = bucket_tokens(num_seqs, max_seqs), num_seqs
    x = {k: v.tolist() for k, v in batch.inputs.items()}
    assert batch.num_tokens == n
    assert x[INPUT_IDS.name] == want[INPUT_IDS.name] + [INPUT_IDS.pad] * (b - n)
    assert x[POSITION_IDS.name] == want[POSITION_IDS.name] + [POSITION_IDS.pad] * (b - n)
    assert x[SLOT_MAPPING.name] == want[SLOT_MAPPING.name] + [-1] * (b - n)
    assert x[SEQ_LENS.name] == want[SEQ_LENS.name] + [0] * (b - n)
    assert x[CU_SEQLENS.name] == want[CU_SEQLENS.name] + [n] * (b - n)
    assert x[BLOCK_TABLES.name] == want[BLOCK_TABLES.name] + [[0] * WIDTH] * (b - n)
    # padded rows are listed (one graph per bucket) but only the first n, the requests', are sampled
    assert x[LOGITS_INDICES.name] == list(range(n)) + [LOGITS_INDICES.pad] * (b - n)
    assert batch.sampled == reqs


def test_rejects_a_request_longer_than_the_table():
    kv = KVCacheManager(BlockPool(40), BS)
    runner = ModelRunner(kv, 64, 2, max_model_len=8)
    req = Request("a", list(range(1, 13)), SamplingParams())
    assert kv.allocate(req, 12)
    with pytest.raises(ValueError, match="holds 3 blocks; the table has 2"):
        runner.prepare(SchedulerOutput([req], [12]))


@pytest.mark.parametrize("num_seqs", [1, 3, 16])
def test_decode_inputs_are_the_buffers_of_real_decode_steps(num_seqs):
    kv, sched, runner = _engine(200, budget=256, max_seqs=32, pad=True)
    placeholder = runner.decode_inputs(bucket_tokens(num_seqs, 32))
    assert placeholder[SLOT_MAPPING.name].tolist() == [-1] * len(placeholder[SLOT_MAPPING.name])  # writes nothing
    assert placeholder[CU_SEQLENS.name].tolist() == list(range(len(placeholder[SEQ_LENS.name]) + 1))
    reqs = [Request(str(i), [i + 1] * 4, SamplingParams(max_tokens=50)) for i in range(num_seqs)]
    for r in reqs:
        sched.add(r)
    _advance(sched.schedule(), runner, sched, token=5)
    batch = runner.prepare(sched.schedule())
    for name, t in batch.inputs.items():  # same storage and shape: a graph captured on one replays the other
        assert (t.data_ptr(), t.shape) == (placeholder[name].data_ptr(), placeholder[name].shape), name
