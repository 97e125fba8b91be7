"""Hybrid and recurrent models are refused before tracing, with the reason: kiln keeps no
recurrent state. Tiny configs of falcon_h1, jamba, qwen3_next and lfm2 (transformers 5.24)."""

from __future__ import annotations

import pytest
import torch
import transformers
from safetensors.torch import save_file

import kiln
from kiln.errors import UnsupportedOpError
from kiln.frontend import recurrent
from kiln.models.tiny_configs import TINY_CONFIGS, tiny_config

_SMALL = {
    "vocab_size": 256,
    "hidden_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "intermediate_size": 128,
    "max_position_embeddings": 256,
}

HYBRIDS = {
    "falcon_h1": dict(
        head_dim=16, mamba_d_ssm=64, mamba_n_heads=4, mamba_d_head=16, mamba_d_state=8, mamba_chunk_size=16
    ),
    "jamba": dict(attn_layer_period=2, attn_layer_offset=1, num_experts=2, expert_layer_period=2, mamba_dt_rank=8),
    "qwen3_next": dict(
        head_dim=16, linear_key_head_dim=16, linear_value_head_dim=16, linear_num_key_heads=2,
        linear_num_value_heads=4, num_experts=4, moe_intermediate_size=32, shared_expert_intermediate_size=32,
        layer_types=["linear_attention", "full_attention"],
    ),
    "lfm2": dict(block_ff_dim=128, layer_types=["conv", "full_attention"]),
}

MESSAGE = "kiln's engine keeps no recurrent state"


def _config(model_type: str) -> transformers.PretrainedConfig:
    return transformers.AutoConfig.for_model(model_type, **_SMALL, **HYBRIDS[model_type])


@pytest.mark.parametrize("model_type", sorted(HYBRIDS))
def test_hybrid_model_is_refused_with_the_reason(model_type, tmp_path, monkeypatch):
    src = tmp_path / model_type
    src.mkdir()
    _config(model_type).save_pretrained(src)
    save_file({"unused": torch.zeros(1)}, src / "model.safetensors")
    traced = []
    monkeypatch.setattr(torch.export, "export", lambda *a, **k: traced.append(1))
    with pytest.raises(UnsupportedOpError) as e:
        kiln.compile(src, tmp_path / "a")
    msg = str(e.value)
    assert f"'{model_type}'" in msg and MESSAGE in msg and "not supported yet" in msg
    assert "recurrent / state-space layers" in msg
    assert not traced, "refused before tracing"
    assert not (tmp_path / "a").exists()


@pytest.mark.parametrize("model_type", sorted(HYBRIDS))
def test_module_tree_check_finds_the_stateful_layers(model_type):
    # Without the config check (say, a family whose config lists no layer kinds), the built
    # model's modules still give it away.
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(_config(model_type))
    with pytest.raises(UnsupportedOpError, match=MESSAGE):
        recurrent.check_modules(model, model_type)


def test_fields_without_a_layer_list_are_refused():
    cfg = transformers.PretrainedConfig(**_SMALL, mamba_d_state=8, mamba_d_conv=4)
    with pytest.raises(UnsupportedOpError, match="config fields mamba_d_conv, mamba_d_state"):
        recurrent.check_config(cfg)
    cfg = transformers.PretrainedConfig(**_SMALL, conv_L_cache=3)
    with pytest.raises(UnsupportedOpError, match="conv_L_cache"):
        recurrent.check_config(cfg)


@pytest.mark.parametrize("arch", sorted(TINY_CONFIGS))
def test_attention_only_models_pass(arch):
    cfg = tiny_config(arch)
    recurrent.check_config(cfg)
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(cfg)
    recurrent.check_modules(model, arch)
