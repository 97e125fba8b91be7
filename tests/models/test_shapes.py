"""Synthesized real-model shapes: the tensors written are exactly the ones transformers' model of
that config has, with the same shapes."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from kiln.models import shapes


@pytest.mark.parametrize("name", sorted(shapes.SHAPES))
def test_tensors_match_the_transformers_model(name):
    config = shapes.shape_config(name)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    if config.tie_word_embeddings:
        expected.pop("lm_head.weight")
    assert dict(shapes._tensors(config)) == expected


def test_synthesized_checkpoint_loads_in_transformers(tmp_path, monkeypatch):
    monkeypatch.setitem(shapes.SHAPES, "tiny", dict(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        head_dim=16, tie_word_embeddings=False, rope_parameters=dict(shapes._LLAMA3_ROPE)))
    monkeypatch.setattr(shapes, "SHARD_BYTES", 1 << 20)
    out = shapes.synthesize_checkpoint("tiny", tmp_path, dtype=torch.float32)
    assert len(list(out.glob("*.safetensors"))) > 1
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.config.rope_parameters["rope_type"] == "llama3"
    assert torch.isfinite(model(torch.tensor([[1, 2, 3]])).logits).all()
