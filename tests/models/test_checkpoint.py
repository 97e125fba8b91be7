"""Tests for the tiny checkpoint builder, configs and tokenizer in ``kiln.models``."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer

from kiln.models.checkpoint import build_checkpoint, build_model, load_reference_model
from kiln.models.tiny_configs import TINY_CONFIGS, tiny_config
from kiln.models.tokenizer import BOS_ID, EOS_ID, PAD_ID

ROUND_TRIP_TEXT = "héllo wörld 😀 def f(x): return x"
# Longer than the sliding window (8) so mistral/gemma2 actually mask something.
PROMPT = "def add(a, b):\n    return a + b  # ünïcode"
MIN_LOGIT_STD = 0.1


def _assert_state_dicts_equal(
    actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]
) -> None:
    assert actual.keys() == expected.keys()
    for key, tensor in expected.items():
        assert actual[key].dtype == tensor.dtype, key
        assert torch.equal(actual[key], tensor), key


@pytest.mark.parametrize("arch", sorted(TINY_CONFIGS))
def test_build_reload_forward(arch: str, tmp_path: Path) -> None:
    out = build_checkpoint(arch, tmp_path / arch, seed=3)
    assert out == tmp_path / arch
    assert (out / "model.safetensors").is_file()
    assert json.loads((out / "generation_config.json").read_text())["eos_token_id"] == EOS_ID

    model = load_reference_model(out)
    assert not model.training
    assert model.config.model_type == arch
    assert model.config._attn_implementation == "eager"

    # Reloaded weights equal the ones built from the same seed (bit for bit), so nothing was
    # dropped or re-initialised on load and building is deterministic.
    _assert_state_dicts_equal(model.state_dict(), build_model(arch, seed=3).state_dict())

    tokenizer = AutoTokenizer.from_pretrained(out)
    ids = tokenizer(PROMPT, return_tensors="pt").input_ids
    assert ids.shape[1] > 8
    assert int(ids.max()) < model.config.vocab_size
    with torch.no_grad():
        logits = model(ids).logits
    assert logits.shape == (1, ids.shape[1], model.config.vocab_size)
    assert torch.isfinite(logits).all()
    assert logits.std(dim=-1).min() > MIN_LOGIT_STD


def test_seeds_differ() -> None:
    a = build_model("llama", seed=0).state_dict()
    b = build_model("llama", seed=1).state_dict()
    assert not torch.equal(a["model.embed_tokens.weight"], b["model.embed_tokens.weight"])


def test_sharded_build_loads(tmp_path: Path) -> None:
    out = build_checkpoint("mixtral", tmp_path, max_shard_size="20KB")
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = set(index["weight_map"].values())
    assert len(shards) > 1
    assert all((out / shard).is_file() for shard in shards)
    assert not (out / "model.safetensors").exists()
    model = load_reference_model(out)
    _assert_state_dicts_equal(model.state_dict(), build_model("mixtral").state_dict())


def test_bfloat16_build(tmp_path: Path) -> None:
    out = build_checkpoint("qwen3", tmp_path, dtype=torch.bfloat16)
    model = load_reference_model(out, dtype=torch.bfloat16)
    expected = build_model("qwen3").to(torch.bfloat16).state_dict()
    _assert_state_dicts_equal(model.state_dict(), expected)


def test_config_overrides(tmp_path: Path) -> None:
    out = build_checkpoint("mistral", tmp_path, config_overrides={"sliding_window": 4})
    assert json.loads((out / "config.json").read_text())["sliding_window"] == 4
    with pytest.raises(ValueError, match="no attribute"):
        build_model("llama", config_overrides={"not_a_field": 1})


def test_tiny_config_shape_and_errors() -> None:
    for arch in TINY_CONFIGS:
        config = tiny_config(arch)
        assert config.model_type == arch
        assert config.vocab_size == 256
        assert (config.bos_token_id, config.eos_token_id, config.pad_token_id) == (
            BOS_ID,
            EOS_ID,
            PAD_ID,
        )
    assert tiny_config("gemma").tie_word_embeddings
    assert not tiny_config("llama").tie_word_embeddings
    with pytest.raises(ValueError, match="llama"):
        tiny_config("not-an-arch")


def test_tokenizer_round_trip_and_specials(tmp_path: Path) -> None:
    out = build_checkpoint("llama", tmp_path)
    tokenizer = AutoTokenizer.from_pretrained(out)
    ids = tokenizer(ROUND_TRIP_TEXT).input_ids
    assert tokenizer.decode(ids) == ROUND_TRIP_TEXT
    # The emoji is one character but four UTF-8 bytes, hence several tokens.
    assert len(tokenizer("😀").input_ids) == 4
    assert max(ids) < 256 and len(tokenizer) <= 256
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id) == (
        BOS_ID,
        EOS_ID,
        PAD_ID,
    )

    chat = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]
    text = tokenizer.apply_chat_template(chat, tokenize=False)
    assert text == "<s><|user|>\nhi</s>\n<|assistant|>\nyo</s>\n"
    prompt = tokenizer.apply_chat_template(chat[:1], tokenize=False, add_generation_prompt=True)
    assert prompt.endswith("<|assistant|>\n")


def test_tokenizer_is_deterministic(tmp_path: Path) -> None:
    build_checkpoint("gpt2", tmp_path / "a")
    build_checkpoint("gpt2", tmp_path / "b")
    for name in ("tokenizer.json", "model.safetensors"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
