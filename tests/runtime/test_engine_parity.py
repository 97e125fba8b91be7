"""Greedy generation through the engine is token-identical to transformers' generate, for
every architecture, with ample cache, with a cache so small that requests are preempted, with a
token budget so small that every prompt is chunked, and with prompts sharing a long prefix."""

from __future__ import annotations

import pytest
import torch

from kiln import LLM, SamplingParams
from kiln.models.checkpoint import reference_greedy
from kiln.models.tiny_configs import TINY_CONFIGS

MAX_TOKENS = 12
PROMPT_LENGTHS = [3, 17, 9, 30, 5, 22, 1, 12]


def _prompts(shared_prefix: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(1)
    prefix = torch.randint(3, 256, (shared_prefix,), generator=g).tolist()
    return [prefix + torch.randint(3, 256, (n,), generator=g).tolist() for n in PROMPT_LENGTHS]


SCENARIOS = {
    "ample": {},
    "preempt": {"num_kv_blocks": 12, "block_size": 4},  # 48 slots: the longest request fits alone
    "chunked": {"max_num_batched_tokens": 4},
}


@pytest.mark.parametrize("arch", sorted(TINY_CONFIGS))
def test_greedy_matches_transformers(checkpoint, artifact, arch):
    prompts = _prompts()
    want = reference_greedy(checkpoint(arch), prompts, MAX_TOKENS)
    params = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True)
    for name, kwargs in SCENARIOS.items():
        llm = LLM(artifact(arch), **kwargs)
        outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
        got = [o.outputs[0].token_ids for o in outs]
        assert got == want, f"{arch}: scenario {name} differs"
        assert all(o.outputs[0].finish_reason == "length" for o in outs)
        assert llm.engine.pool.num_free == llm.engine.pool.num_blocks
        if name == "preempt":
            assert llm.engine.scheduler_stats()["preemptions"] > 0, "the small cache never preempted"


@pytest.mark.parametrize("arch", sorted(TINY_CONFIGS))
def test_shared_prefix_hits_cache(checkpoint, artifact, arch):
    prompts = _prompts(shared_prefix=40)
    want = reference_greedy(checkpoint(arch), prompts, MAX_TOKENS)
    llm = LLM(artifact(arch), max_num_seqs=1, block_size=4)  # one at a time: later ones hit
    params = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outs] == want
    stats = llm.engine.kv.stats
    assert stats.hits >= 7 * 40 - 7 * 4, stats
    assert all(o.num_cached_tokens >= 36 for o in outs[1:])
