"""Engine limits fixed at start: the context never exceeds the model's position tables, and the
executor's arena is laid out once for the largest step."""

from __future__ import annotations

import pytest

from kiln.runtime.engine import LLMEngine
from kiln.runtime.sampling_params import SamplingParams


def test_max_model_len_beyond_the_position_tables_is_refused(artifact):
    path = artifact("llama", "float32")
    with pytest.raises(ValueError, match="max_position_embeddings 256"):
        LLMEngine(path, max_model_len=257, num_kv_blocks=64)


def test_arena_is_allocated_at_start_and_never_again(artifact):
    eng = LLMEngine(artifact("llama", "float32"), max_num_batched_tokens=64, max_num_seqs=4, num_kv_blocks=64)
    arena = eng.model.executor.arena
    assert arena is not None
    ids = [eng.add_request(None, {"prompt_token_ids": list(range(3, 3 + n))}, SamplingParams(max_tokens=5))
           for n in (40, 9, 17)]
    eng.run(ids)
    assert eng.model.executor.arena is arena
