"""KVCacheManager: prefix hits, incremental hashes equal the full recomputation,
forget_uncomputed un-hashes exactly the uncomputed blocks, free returns everything, and a
failed allocate changes nothing."""

from __future__ import annotations

from kiln.runtime.block_pool import BlockPool
from kiln.runtime.kv_cache_manager import BlockHasher, KVCacheManager
from kiln.runtime.request import Request
from kiln.runtime.sampling_params import SamplingParams

BS = 4


def _chain(tokens: list[int], block_hash: BlockHasher, adapter_id: int | None = None) -> list[bytes]:
    """Every full block's hash, recomputed from scratch."""
    out: list[int] = []
    for i in range(len(tokens) // BS):
        out.append(block_hash(out[-1] if out else None, tokens[i * BS : (i + 1) * BS], (adapter_id, False)))
    return out


def _req(rid: str, tokens: list[int]) -> Request:
    return Request(rid, tokens, SamplingParams())


def test_hashes_grow_incrementally_and_equal_the_recomputation():
    kv = KVCacheManager(BlockPool(32), BS)
    req = _req("a", list(range(10, 21)))  # 11 tokens
    assert kv.allocate(req, 7)  # a prefill chunk
    req.num_computed_tokens = 7
    assert kv.allocate(req, 4)
    req.num_computed_tokens = 11
    for t in range(30):  # decodes
        req.append_token(100 + t)
        assert kv.allocate(req, 1)
        req.num_computed_tokens += 1
        assert kv.hashes["a"] == _chain(req.all_token_ids, kv.block_hash)[: len(kv.hashes["a"])]
        assert len(kv.hashes["a"]) == req.num_computed_tokens // BS
    full = _chain(req.all_token_ids, kv.block_hash)
    assert [b.block_hash for b in kv.table(req)[: len(full)]] == full
    assert kv.pool.lookup(full[-1]) is kv.table(req)[len(full) - 1]


def test_prefix_hits_reuse_the_blocks_of_an_equal_prefix():
    kv = KVCacheManager(BlockPool(32), BS)
    a = _req("a", list(range(1, 14)))  # 13 tokens: 3 full blocks
    assert kv.allocate(a, 13)
    a.num_computed_tokens = 13
    b = _req("b", list(range(1, 10)) + [99, 98, 97])  # shares 2 full blocks (8 tokens) + 1 token
    prefix = kv.computed_prefix(b)
    assert prefix == kv.table(a)[:2]
    assert kv.allocate(b, b.num_tokens - 8, prefix)
    assert kv.table(b)[:2] == kv.table(a)[:2] and kv.table(b)[2] is not kv.table(a)[2]
    assert [blk.ref_cnt for blk in kv.table(a)] == [2, 2, 1, 1]
    assert kv.stats.queries == 13 + 12 and kv.stats.hits == 8
    whole = _req("c", list(range(1, 13)))  # exactly 3 full blocks: the last token is recomputed
    assert kv.computed_prefix(whole) == kv.table(a)[:2]


def test_forget_uncomputed_unhashes_only_the_uncomputed_blocks():
    kv = KVCacheManager(BlockPool(32), BS)
    req = _req("a", list(range(1, 17)))  # 16 tokens: 4 full blocks
    assert kv.allocate(req, 8)
    req.num_computed_tokens = 8
    assert kv.allocate(req, 8)  # this step fails: blocks 2 and 3 were hashed but never written
    hashes = list(kv.hashes["a"])
    kv.forget_uncomputed(req)
    assert [kv.pool.lookup(h) for h in hashes] == kv.table(req)[:2] + [None, None]
    assert kv.cached_upto["a"] == 2
    other = _req("b", list(range(1, 17)) + [5])
    assert len(kv.computed_prefix(other)) == 2


def test_free_returns_every_block_and_keeps_them_cached():
    pool = BlockPool(8)
    kv = KVCacheManager(pool, BS)
    req = _req("a", list(range(1, 10)))
    assert kv.allocate(req, 9)
    assert pool.num_free == 5
    kv.free(req)
    assert pool.num_free == 8 and all(b.ref_cnt == 0 for b in pool.blocks)
    assert not kv.tables and "a" not in kv.hashes
    again = _req("b", list(range(1, 10)))
    assert len(kv.computed_prefix(again)) == 2  # freed blocks stay in the prefix cache


def test_failed_allocate_changes_nothing():
    pool = BlockPool(4)
    kv = KVCacheManager(pool, BS)
    a = _req("a", list(range(1, 13)))
    assert kv.allocate(a, 12)
    b = _req("b", list(range(50, 59)))
    assert not pool.can_allocate(3)
    assert not kv.allocate(b, 9)
    assert "b" not in kv.tables and pool.num_free == 1 and kv.stats.queries == 12


def test_block_hashes_are_keyed_128_bit_digests():
    """Collision-resistant prefix keys: 16-byte keyed BLAKE2b digests under a per-manager
    secret, so a crafted prompt cannot be made to hash like another request's prefix."""
    tokens = list(range(2 * BS))
    k, j = BlockHasher(b"k" * 16), BlockHasher(b"j" * 16)
    a = k(None, tokens[:BS], (None, False))
    assert len(a) == 16 and a == k(None, tokens[:BS], (None, False))
    assert a != j(None, tokens[:BS], (None, False))  # another secret
    assert a != k(None, tokens[:BS], (1, False))  # another adapter
    assert k(a, tokens[BS:], (None, False)) != k(None, tokens[BS:], (None, False))  # another parent
    assert KVCacheManager(BlockPool(8), BS).block_hash.salt != KVCacheManager(BlockPool(8), BS).block_hash.salt
