"""Sliding-window models hold KV cache in proportion to the window: the manager releases the
blocks behind every layer's window (holes keep the table positional), prefix hits need only the
blocks in the first query's window, paged attention never reads a released block (NaN in one
does not matter), and greedy generation with a pool too small for whole sequences matches
transformers, with preemption; a model with a global layer keeps every block."""

from __future__ import annotations

import sys

import pytest
import torch

import kiln
from kiln import LLM, SamplingParams
from kiln.ir.ops.attention import paged_attention
from kiln.models.checkpoint import reference_greedy
from kiln.runtime.block_pool import BlockPool
from kiln.runtime.kv_cache_manager import KVCacheManager
from kiln.runtime.request import Request

BS = 4
W = 6
SLIDING = {  # every layer within a 6-token window (gemma2 alternates with global layers by default)
    "mistral": {"sliding_window": W},
    "gemma2": {"sliding_window": W, "layer_types": ["sliding_attention", "sliding_attention"]},
}


@pytest.fixture(scope="module")
def windowed(tmp_path_factory, checkpoint):
    """windowed(arch) -> (checkpoint, artifact) of the tiny model with every layer in window W."""
    cache = {}

    def get(arch: str):
        if arch not in cache:
            ckpt = checkpoint(arch, config_overrides=SLIDING[arch])
            cache[arch] = ckpt, kiln.compile(ckpt, tmp_path_factory.mktemp(f"windowed-{arch}") / "art")
        return cache[arch]

    return get


def _req(rid: str, tokens: list[int]) -> Request:
    return Request(rid, tokens, SamplingParams())


def _grow(kv: KVCacheManager, req: Request, steps: int) -> list[int]:
    """Decode `steps` tokens (prefill first); the blocks held after each allocation."""
    assert kv.allocate(req, req.num_tokens - req.num_computed_tokens)
    req.num_computed_tokens = req.num_tokens
    held = []
    for t in range(steps):
        req.append_token(100 + t)
        assert kv.allocate(req, 1)
        req.num_computed_tokens += 1
        held.append(kv.num_held(req))
    return held


def test_a_growing_sequence_holds_about_window_over_block_size_plus_one_blocks():
    pool = BlockPool(64)
    kv = KVCacheManager(pool, BS, window=W)
    req = _req("a", list(range(1, 12)))
    held = _grow(kv, req, 60)
    assert max(held) <= kv.peak_blocks(10**6) == -(-W // BS) + 1 == 3
    table = kv.table(req)
    assert len(table) == kv.num_blocks_for(req.num_computed_tokens)  # still positional
    holes = table.index(next(b for b in table if b is not kv.hole))  # released: a leading run
    first = (req.num_computed_tokens - 1 - W + 1) // BS  # the last query's first block
    assert first - 1 <= holes <= first and all(b is not kv.hole for b in table[holes:])
    assert pool.num_free == 64 - kv.num_held(req)
    kv.free(req)
    assert pool.num_free == 64 and all(b.ref_cnt == 0 for b in pool.blocks)


def test_without_a_window_every_block_stays():
    kv = KVCacheManager(BlockPool(64), BS)
    req = _req("a", list(range(1, 12)))
    assert _grow(kv, req, 40)[-1] == kv.num_blocks_for(51)
    assert kv.hole not in kv.table(req)


def test_prefix_hit_after_release_needs_only_the_window_before_the_first_query():
    pool = BlockPool(40)
    kv = KVCacheManager(pool, BS, window=W)
    a = _req("a", list(range(1, 30)))  # 29 tokens, computed in 3 chunks: early blocks released
    for n in (10, 10, 9):
        assert kv.allocate(a, n)
        a.num_computed_tokens += n
    blocks = list(kv.hashes["a"])
    kv.free(a)  # everything free, still hashed
    # Evict the first two blocks' hashes: a prefix needing them must not pretend to hold them.
    for h in blocks[:2]:
        pool.uncache(pool.lookup(h))
    b = _req("b", list(range(1, 26)) + [250, 251])  # shares 6 full blocks (24 tokens) with a
    prefix = kv.computed_prefix(b)
    # 6 blocks computed: the first query (position 24) reads from position 19, i.e. block 4 on.
    assert len(prefix) == 6 and prefix[:4] == [kv.hole] * 4
    assert [p.block_hash for p in prefix[4:]] == blocks[4:6]
    assert kv.allocate(b, b.num_tokens - 24, prefix)
    b.num_computed_tokens = b.num_tokens
    assert kv.num_held(b) == 3 and kv.table(b)[:4] == [kv.hole] * 4
    assert [blk.ref_cnt for blk in kv.table(b)[4:]] == [1, 1, 1]
    # Evicting a block inside the window shortens the hit to the longest valid prefix.
    kv.free(b)
    pool.uncache(pool.lookup(blocks[5]))
    c = _req("c", list(range(1, 26)) + [7])
    prefix = kv.computed_prefix(c)
    assert len(prefix) == 5 and prefix[:3] == [kv.hole] * 3  # first query 20 reads from 15: block 3
    assert all(p.block_hash == h for p, h in zip(prefix[3:], blocks[3:5], strict=True))
    # Without a window the chain stops at the first evicted block.
    plain = KVCacheManager(pool, BS)
    plain.block_hash = kv.block_hash
    assert plain.computed_prefix(_req("d", list(range(1, 26)) + [7])) == []


def test_paged_attention_reads_only_the_window_of_the_first_query():
    g = torch.Generator().manual_seed(0)
    nb, hkv, d, ctx, nq = 8, 2, 8, 14, 3
    k_cache, v_cache = torch.randn(nb, BS, hkv, d, generator=g), torch.randn(nb, BS, hkv, d, generator=g)
    q = torch.randn(nq, 4, d, generator=g)
    table = torch.tensor([[5, 2, 7, 1]], dtype=torch.int32)
    args = dict(scale=0.3, causal=True, sliding_window=W, softcap=0.0)
    lens, cu = torch.tensor([ctx]), torch.tensor([0, nq])
    want = paged_attention(q, k_cache, v_cache, table, lens, cu, **args)
    # Queries at 11..13 read keys from 6 on (block 1): block 0 may be freed and full of NaN.
    k_cache[0], v_cache[0] = float("nan"), float("nan")
    got = paged_attention(q, k_cache, v_cache, torch.tensor([[0, 2, 7, 1]], dtype=torch.int32), lens, cu, **args)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    assert not got.isnan().any()
    # The whole table in place of the holes gives the same result as without a window's reads.
    full = paged_attention(q, k_cache, v_cache, table, lens, cu, **args)
    torch.testing.assert_close(full, want, rtol=0, atol=1e-6)


def _prompts() -> list[list[int]]:
    g = torch.Generator().manual_seed(3)
    return [torch.randint(3, 256, (n,), generator=g).tolist() for n in (21, 5, 14, 9)]


MAX_TOKENS = 60


@pytest.mark.parametrize("arch", sorted(SLIDING))
def test_long_generation_in_a_pool_smaller_than_the_sequences_matches_transformers(windowed, arch):
    ckpt, art = windowed(arch)
    want = reference_greedy(ckpt, _prompts(), MAX_TOKENS)
    params = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True)
    # 8 blocks of 4 = 32 slots: no sequence (up to 81 tokens) fits whole; 4 at once preempt.
    llm = LLM(art, num_kv_blocks=8, block_size=BS, max_num_seqs=4, max_num_batched_tokens=16)
    assert llm.engine.kv.window == W and llm.engine.kv.max_seq_tokens == sys.maxsize  # no length cap
    outs = llm.generate([{"prompt_token_ids": p} for p in _prompts()], params, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outs] == want
    assert all(o.outputs[0].finish_reason == "length" for o in outs)
    assert llm.engine.scheduler_stats()["preemptions"] > 0
    assert llm.engine.pool.num_free == llm.engine.pool.num_blocks


def test_freed_blocks_poisoned_with_nan_change_nothing(windowed):
    params = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    prompts = [{"prompt_token_ids": p} for p in _prompts()]

    def run(poison: bool) -> list[list[int]]:
        llm = LLM(windowed("mistral")[1], num_kv_blocks=12, block_size=BS, max_num_seqs=4,
                  enable_prefix_caching=False)
        engine = llm.engine
        ids = [engine.add_request(None, p, params) for p in prompts]
        tokens: dict[str, list[int]] = {i: [] for i in ids}
        while engine.has_unfinished_requests():
            for out in engine.step():
                tokens[out.request_id] += out.outputs[0].delta_token_ids
            if poison:  # every block no running sequence holds: released, reused or never used
                free = torch.tensor([b.block_id for b in engine.pool.blocks if b.ref_cnt == 0], dtype=torch.long)
                for cache in engine.kv_caches.values():
                    cache[free] = float("nan")
        return [tokens[i] for i in ids]

    assert run(poison=True) == run(poison=False)


def test_a_model_with_a_global_layer_keeps_every_block(artifact):
    llm = LLM(artifact("gemma2"), num_kv_blocks=64, block_size=BS)
    assert llm.engine.kv.window is None and llm.engine.kv.max_seq_tokens == 64 * BS
    with pytest.raises(ValueError, match="KV blocks"):
        LLM(artifact("gemma2"), num_kv_blocks=4, block_size=BS).generate(
            [{"prompt_token_ids": list(range(3, 40))}], SamplingParams(max_tokens=2), use_tqdm=False)


def test_prefix_hits_after_release_match_transformers(windowed):
    """Prompts sharing a 40-token prefix, one at a time in a pool of 40 blocks (a request
    allocates ~26 over its life): the shared blocks left the window and were released (the
    first ones get evicted), yet each later prompt takes the blocks its window needs and
    matches transformers."""
    ckpt, art = windowed("mistral")
    g = torch.Generator().manual_seed(5)
    shared = torch.randint(3, 256, (40,), generator=g).tolist()
    prompts = [shared + torch.randint(3, 256, (n,), generator=g).tolist() for n in (3, 9, 1, 6)]
    want = reference_greedy(ckpt, prompts, MAX_TOKENS)
    llm = LLM(art, num_kv_blocks=40, block_size=BS, max_num_seqs=1)
    params = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outs] == want
    assert [o.num_cached_tokens for o in outs] == [0, 40, 40, 40]  # 10 shared blocks, 2 of them held
