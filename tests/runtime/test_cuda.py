"""The runtime on a CUDA device (skipped without one): pinned persistent inputs copied without
blocking, the arena and KV caches on the GPU, sampling on the GPU."""

from __future__ import annotations

import pytest
import torch

from kiln import LLM, SamplingParams
from kiln.models.checkpoint import load_reference_model, reference_greedy

pytestmark = pytest.mark.gpu
PROMPTS = [[5, 9, 33, 2, 71], list(range(3, 40)), [100] * 9]


def test_greedy_on_cuda_matches_transformers(checkpoint, artifact):
    llm = LLM(artifact("llama", "float32"), device="cuda", max_num_seqs=4, num_kv_blocks=64)
    got = [o.outputs[0].token_ids for o in llm.generate(
        [{"prompt_token_ids": p} for p in PROMPTS], SamplingParams(temperature=0, max_tokens=10, ignore_eos=True))]
    assert got == reference_greedy(checkpoint("llama"), PROMPTS, 10, device="cuda")


def test_seeded_sampling_on_cuda_does_not_depend_on_the_batch(artifact):
    llm = LLM(artifact("llama", "float32"), device="cuda", max_num_seqs=4, num_kv_blocks=64)
    params = SamplingParams(temperature=0.9, top_p=0.8, seed=3, max_tokens=12, ignore_eos=True)
    alone = llm.generate({"prompt_token_ids": PROMPTS[0]}, params)[0].outputs[0].token_ids
    batched = llm.generate([{"prompt_token_ids": p} for p in PROMPTS], params)[0].outputs[0].token_ids
    assert alone == batched


def test_debug_forward_on_cuda_matches_transformers(checkpoint, artifact):
    from kiln.runtime.model import CompiledModel

    model = CompiledModel(artifact("llama", "float32"), device="cuda")
    ids = torch.tensor(PROMPTS[1])
    got = model(ids, torch.arange(len(ids)), [len(ids)]).cpu()
    ref = load_reference_model(checkpoint("llama"))
    with torch.no_grad():
        want = ref(ids[None]).logits[0]
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
