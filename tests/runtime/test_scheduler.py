"""Scheduler + KV cache manager properties: random arrivals, aborts and lengths never leak a
block, never double-free, never exceed the budget, and every request finishes."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from kiln.runtime.block_pool import BlockPool
from kiln.runtime.kv_cache_manager import KVCacheManager
from kiln.runtime.request import Request, Status
from kiln.runtime.sampling_params import SamplingParams
from kiln.runtime.scheduler import Scheduler

request_spec = st.tuples(
    st.integers(1, 40),  # prompt length
    st.integers(1, 12),  # output length
    st.integers(0, 3),  # shared-prefix family (same leading tokens)
    st.integers(0, 6),  # arrival step
    st.one_of(st.none(), st.integers(0, 30)),  # abort at step
)


def _prompt(n: int, family: int, uid: int) -> list[int]:
    shared = [family * 100 + i for i in range(24)]
    return (shared + [10_000 + uid * 50 + i for i in range(n)])[:n] if family else [uid * 50 + i for i in range(n)]


@settings(max_examples=150, deadline=None)
@given(
    specs=st.lists(request_spec, min_size=1, max_size=12),
    num_blocks=st.integers(6, 30),
    block_size=st.sampled_from([2, 4, 8]),
    budget=st.integers(1, 64),
    max_seqs=st.integers(1, 6),
    caching=st.booleans(),
)
def test_scheduler_invariants(specs, num_blocks, block_size, budget, max_seqs, caching):
    pool = BlockPool(num_blocks, enable_caching=caching)
    kv = KVCacheManager(pool, block_size)
    sched = Scheduler(kv, budget, max_seqs)
    reqs = []
    for uid, (plen, olen, fam, arrive, abort) in enumerate(specs):
        r = Request(str(uid), _prompt(plen, fam, uid), SamplingParams(max_tokens=olen))
        reqs.append((r, olen, arrive, abort))
    step = 0
    while step < 2000:
        for r, _, arrive, _ in reqs:
            if arrive == step:
                if kv.num_blocks_for(r.num_tokens + 1) > num_blocks:
                    sched.finish(r, "error")  # the engine rejects prompts that can never fit
                else:
                    sched.add(r)
        for r, _, _, abort in reqs:
            if abort == step and not r.finished and r.status is not Status.FINISHED and (
                r in sched.running or r in sched.waiting
            ):
                sched.finish(r, "abort")
        for r in list(sched.running):  # as the engine does: a request the whole cache can't hold
            if kv.num_blocks_for(r.num_tokens) > num_blocks:
                sched.finish(r, "length")
        out = sched.schedule()
        assert out.total_tokens <= budget
        assert len(sched.running) <= max_seqs
        assert len(set(map(id, out.requests))) == len(out.requests)
        held = {}
        for r in sched.running:
            table = kv.tables[r.request_id]
            for b in table:
                held[b.block_id] = held.get(b.block_id, 0) + 1
        for b in pool.blocks:
            assert b.ref_cnt == held.get(b.block_id, 0)
        assert pool.num_free == num_blocks - len(held)
        for r, n in zip(out.requests, out.num_new_tokens, strict=True):
            assert n >= 1 and r.num_computed_tokens + n <= r.num_tokens
            assert len(kv.tables[r.request_id]) * block_size >= r.num_computed_tokens + n
            r.num_computed_tokens += n
            if r.num_computed_tokens == r.num_tokens:
                r.append_token(7)
                if r.num_output_tokens >= r.params.max_tokens:
                    sched.finish(r, "length")
        step += 1
        if step > max(a for _, _, a, _ in reqs) and not sched.has_work():
            break
    assert all(r.finished for r, *_ in reqs), "a request was lost"
    assert pool.num_free == num_blocks and all(b.ref_cnt == 0 for b in pool.blocks)
    assert not kv.tables


def test_prefix_blocks_are_shared():
    pool = BlockPool(16)
    kv = KVCacheManager(pool, 4)
    sched = Scheduler(kv, 100, 4)
    a = Request("a", list(range(10)), SamplingParams())
    sched.add(a)
    sched.schedule()
    a.num_computed_tokens = 10
    b = Request("b", list(range(9)) + [99], SamplingParams())
    sched.add(b)
    out = sched.schedule()
    assert out.requests[-1] is b and b.num_computed_tokens == 8 and b.num_cached_tokens == 8
    assert kv.tables["a"][:2] == kv.tables["b"][:2]
    assert kv.stats.hits == 8 and kv.stats.queries == 20
