"""Block pool: reference counts, prefix-cache index, O(1) LRU eviction order."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kiln.runtime.block_pool import BlockPool, FreeBlockQueue, KVBlock


def test_allocate_release_and_exhaustion():
    pool = BlockPool(4)
    a = pool.allocate(3)
    assert [b.ref_cnt for b in a] == [1, 1, 1] and pool.num_free == 1
    assert pool.allocate(2) is None and pool.num_free == 1  # nothing taken on failure
    pool.release(a)
    assert pool.num_free == 4
    with pytest.raises(RuntimeError, match="released more often"):
        pool.release(a[:1])


def test_cached_blocks_survive_release_and_are_evicted_lru():
    pool = BlockPool(3)
    a, b, c = pool.allocate(3)
    for blk, h in ((a, 1), (b, 2), (c, 3)):
        pool.cache(blk, h)
    pool.release([a])
    pool.release([c])
    pool.release([b])
    assert pool.lookup(1) is a  # still cached while free
    pool.touch([a])  # reused by a new sequence: leaves the free queue
    assert a.ref_cnt == 1 and pool.num_free == 2
    (fresh,) = pool.allocate(1)  # evicts the least recently freed: c
    assert fresh is c and pool.lookup(3) is None and pool.lookup(2) is b


def test_release_order_puts_sequence_tail_first():
    pool = BlockPool(3)
    seq = pool.allocate(3)
    pool.release(seq)
    assert pool.allocate(1)[0] is seq[-1]


def test_caching_disabled():
    pool = BlockPool(2, enable_caching=False)
    (a,) = pool.allocate(1)
    pool.cache(a, 7)
    assert pool.lookup(7) is None and a.block_hash is None


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["append", "popleft", "remove"]), st.integers(0, 9)), max_size=60))
def test_free_queue_matches_a_list(ops):
    blocks = [KVBlock(i) for i in range(10)]
    q = FreeBlockQueue(blocks[:5])
    model = blocks[:5]
    for op, i in ops:
        b = blocks[i]
        if op == "append" and b not in model:
            q.append(b)
            model.append(b)
        elif op == "remove" and b in model:
            q.remove(b)
            model.remove(b)
        elif op == "popleft" and model:
            assert q.popleft() is model.pop(0)
        assert len(q) == len(model)
    order, node = [], q.head.next
    while node is not q.tail:
        order.append(node)
        node = node.next
    assert order == model
