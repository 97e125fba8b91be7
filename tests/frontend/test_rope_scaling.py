"""RoPE scaling schemes compile to rope tables with logits parity: the static ones, dynamic NTK
(its original frequencies: the engine stays within max_position_embeddings, where transformers
uses them too), and longrope, which switches to its long factors per sequence (in a flattened
batch and while generating)."""

from __future__ import annotations

import pytest
import torch

import kiln
from kiln import LLM, SamplingParams
from kiln.models.checkpoint import build_checkpoint, load_reference_model, reference_greedy

ORIGINAL = 64  # original_max_position_embeddings of the scaled configs
LENGTHS = [5, 100, 3]  # one sequence past ORIGINAL: longrope's long factors apply to it alone

SCALINGS = {
    "linear": ("llama", {"rope_type": "linear", "factor": 2.0}),
    "llama3": ("llama", {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                         "original_max_position_embeddings": ORIGINAL}),
    "yarn": ("llama", {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": ORIGINAL}),
    "dynamic": ("llama", {"rope_type": "dynamic", "factor": 2.0}),
    "longrope": ("phi3", {"rope_type": "longrope", "partial_rotary_factor": 1.0,
                          "original_max_position_embeddings": ORIGINAL,
                          "short_factor": [1.0 + 0.1 * i for i in range(8)],
                          "long_factor": [2.0 + 0.3 * i for i in range(8)]}),
}


def _build(tmp_path, name: str):
    arch, rope = SCALINGS[name]
    overrides = {"rope_parameters": {"rope_theta": 10000.0, **rope}}
    if name == "longrope":
        overrides["original_max_position_embeddings"] = ORIGINAL
    return build_checkpoint(arch, tmp_path / name, config_overrides=overrides)


@pytest.mark.parametrize("name", sorted(SCALINGS))
def test_scaled_rope_parity(tmp_path, name):
    ckpt = _build(tmp_path, name)
    model = kiln.load_artifact(kiln.compile(ckpt, tmp_path / "art", verify_passes=True))
    assert any(k.startswith("torch:rope") for k in model.manifest["ops"])
    ref = load_reference_model(ckpt)
    g = torch.Generator().manual_seed(0)
    seqs = [torch.randint(3, model.vocab_size, (n,), generator=g) for n in LENGTHS]
    got = model.forward(torch.cat(seqs), torch.cat([torch.arange(n) for n in LENGTHS]), LENGTHS)
    with torch.no_grad():
        want = torch.cat([ref(s[None]).logits[0] for s in seqs])
    assert ((got - want).abs().max() / want.abs().max()).item() < 1e-4


def test_longrope_generation_crosses_the_original_length(tmp_path):
    """Prompts of 58 and 20 tokens, 12 new tokens each: the first crosses 64 while decoding,
    from where the whole sequence runs on the long factors. The reference is transformers
    without a KV cache (the model's own definition): with its cache, 5.24 drops the cache at the
    switch and agrees, while 5.17 keeps the short keys (it no longer sees the whole input there)."""
    ckpt = _build(tmp_path, "longrope")
    llm = LLM(kiln.compile(ckpt, tmp_path / "art"), num_kv_blocks=64, block_size=4)
    prompts = [torch.randint(3, 256, (n,), generator=torch.Generator().manual_seed(n)).tolist() for n in (58, 20)]
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts],
                        SamplingParams(temperature=0, max_tokens=12, ignore_eos=True), use_tqdm=False)
    ref = load_reference_model(ckpt)
    for p, out in zip(prompts, outs, strict=True):
        with torch.no_grad():
            want = ref.generate(torch.tensor([p]), max_new_tokens=12, do_sample=False, eos_token_id=None,
                                pad_token_id=0, use_cache=False)[0, len(p):].tolist()
        assert out.outputs[0].token_ids == want


def test_dynamic_ntk_generation_matches_transformers(tmp_path):
    """Greedy generation up to the model's context: transformers keeps the original frequencies
    there, and so does kiln; the engine refuses a longer context."""
    ckpt = _build(tmp_path, "dynamic")
    path = kiln.compile(ckpt, tmp_path / "art")
    with pytest.raises(ValueError, match="max_position_embeddings"):
        LLM(path, max_model_len=257, num_kv_blocks=64)
    llm = LLM(path, num_kv_blocks=128, block_size=4)
    prompt = torch.randint(3, 256, (200,), generator=torch.Generator().manual_seed(1)).tolist()
    out = llm.generate({"prompt_token_ids": prompt}, SamplingParams(temperature=0, max_tokens=20, ignore_eos=True),
                       use_tqdm=False)[0].outputs[0].token_ids
    assert out == reference_greedy(ckpt, [prompt], 20)[0]
