"""Tiny Hugging Face configs, one per supported decoder architecture.

Every config shares the same small shape so the checkpoints are a few hundred KB and a
forward pass takes milliseconds on CPU:

* ``vocab_size`` 256 (the byte-level tokenizer from :mod:`kiln.models.tokenizer`),
* hidden size 64, 2 layers, 4 attention heads (head_dim 16), 2 KV heads where GQA exists,
* intermediate size 128, 256 max positions,
* untied input/output embeddings unless tying is the point of the architecture,
* bos/eos/pad ids 0/1/2, matching the tokenizer's ``<s>``, ``</s>``, ``<pad>``.

Each factory's docstring names the feature that architecture exercises; the table in
``models/README.md`` mirrors them.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from transformers import AutoConfig, PretrainedConfig

from .tokenizer import BOS_ID, EOS_ID, PAD_ID

VOCAB_SIZE = 256
HIDDEN = 64
LAYERS = 2
HEADS = 4
KV_HEADS = 2
HEAD_DIM = HIDDEN // HEADS
INTERMEDIATE = 128
MAX_POSITIONS = 256
SLIDING_WINDOW = 8

# Keyword spellings of the common fields for the configs that follow the Llama naming.
_COMMON: dict[str, Any] = {
    "vocab_size": VOCAB_SIZE,
    "hidden_size": HIDDEN,
    "num_hidden_layers": LAYERS,
    "num_attention_heads": HEADS,
    "intermediate_size": INTERMEDIATE,
    "max_position_embeddings": MAX_POSITIONS,
    "tie_word_embeddings": False,
    "bos_token_id": BOS_ID,
    "eos_token_id": EOS_ID,
    "pad_token_id": PAD_ID,
}


def _make(model_type: str, **overrides: Any) -> PretrainedConfig:
    """Build ``model_type``'s config from the shared shape plus ``overrides``."""
    kwargs = {**_COMMON, **overrides}
    return AutoConfig.for_model(model_type, **kwargs)


def llama() -> PretrainedConfig:
    """Baseline: RMSNorm, RoPE, SwiGLU, GQA."""
    return _make("llama", num_key_value_heads=KV_HEADS)


def qwen2() -> PretrainedConfig:
    """Llama layout plus biases on the q/k/v projections."""
    return _make("qwen2", num_key_value_heads=KV_HEADS)


def mistral() -> PretrainedConfig:
    """Sliding-window attention (window 8) on every layer, GQA."""
    return _make("mistral", num_key_value_heads=KV_HEADS, sliding_window=SLIDING_WINDOW)


def phi3() -> PretrainedConfig:
    """Fused ``qkv_proj`` and ``gate_up_proj`` weights, GQA."""
    return _make("phi3", num_key_value_heads=KV_HEADS)


def gpt2() -> PretrainedConfig:
    """Learned absolute positions, LayerNorm with bias, fused Conv1D ``c_attn``, GELU MLP."""
    return AutoConfig.for_model(
        "gpt2",
        vocab_size=VOCAB_SIZE,
        n_embd=HIDDEN,
        n_layer=LAYERS,
        n_head=HEADS,
        n_inner=INTERMEDIATE,
        n_positions=MAX_POSITIONS,
        tie_word_embeddings=False,
        bos_token_id=BOS_ID,
        eos_token_id=EOS_ID,
        pad_token_id=PAD_ID,
    )


def mixtral() -> PretrainedConfig:
    """Sparse MoE: 4 experts, top-2 routing with renormalised weights, GQA."""
    return _make(
        "mixtral", num_key_value_heads=KV_HEADS, num_local_experts=4, num_experts_per_tok=2
    )


def gemma() -> PretrainedConfig:
    """Tied embeddings, ``(1 + weight)`` RMSNorm, sqrt(hidden) embedding scale, GeGLU."""
    return _make("gemma", num_key_value_heads=KV_HEADS, head_dim=HEAD_DIM, tie_word_embeddings=True)


def gemma2() -> PretrainedConfig:
    """Attention and final-logit soft-capping, window-8 sliding attention on alternate layers,
    pre+post sublayer norms, ``query_pre_attn_scalar`` scaling."""
    return _make(
        "gemma2",
        num_key_value_heads=KV_HEADS,
        head_dim=HEAD_DIM,
        tie_word_embeddings=True,
        sliding_window=SLIDING_WINDOW,
        query_pre_attn_scalar=HEAD_DIM,
        # Small caps so tanh is far from linear on these weights.
        attn_logit_softcapping=5.0,
        final_logit_softcapping=5.0,
    )


def qwen3() -> PretrainedConfig:
    """Per-head RMSNorm on queries and keys (qk-norm), no qkv bias."""
    return _make("qwen3", num_key_value_heads=KV_HEADS, head_dim=HEAD_DIM)


def olmo2() -> PretrainedConfig:
    """Post-sublayer norms (no pre-norm) and RMSNorm over the full q/k projections."""
    return _make("olmo2", num_key_value_heads=KV_HEADS)


def stablelm() -> PretrainedConfig:
    """Partial rotary (25% of head_dim), LayerNorm with bias, q/k/v bias."""
    return _make(
        "stablelm", num_key_value_heads=KV_HEADS, use_qkv_bias=True, partial_rotary_factor=0.25
    )


def starcoder2() -> PretrainedConfig:
    """Biases on every linear, LayerNorm with bias, plain (non-gated) GELU MLP."""
    return _make("starcoder2", num_key_value_heads=KV_HEADS, use_bias=True)


def granite() -> PretrainedConfig:
    """Embedding, residual, attention and logits multipliers (all set away from 1)."""
    return _make(
        "granite",
        num_key_value_heads=KV_HEADS,
        embedding_multiplier=2.0,
        residual_multiplier=0.5,
        attention_multiplier=1.0 / HEAD_DIM,
        logits_scaling=2.0,
    )


def phi() -> PretrainedConfig:
    """Partial rotary (50%), parallel attention + MLP from one shared LayerNorm, dense bias."""
    return _make("phi", partial_rotary_factor=0.5)


def gpt_neox() -> PretrainedConfig:
    """Interleaved fused ``query_key_value``, partial rotary (25%), parallel residual."""
    return _make("gpt_neox", partial_rotary_factor=0.25, use_parallel_residual=True)


def cohere() -> PretrainedConfig:
    """Logit scale, bias-free LayerNorm, parallel attention + MLP, interleaved RoPE."""
    return _make("cohere", num_key_value_heads=KV_HEADS, logit_scale=0.25)


def qwen2_moe() -> PretrainedConfig:
    """Sparse MoE with a sigmoid-gated shared expert: 4 experts, top-2, un-normalised weights."""
    return _make(
        "qwen2_moe",
        num_key_value_heads=KV_HEADS,
        num_experts=4,
        num_experts_per_tok=2,
        moe_intermediate_size=32,
        shared_expert_intermediate_size=64,
    )


def gpt_oss() -> PretrainedConfig:
    """Attention sinks (a learned per-head logit), alternating sliding window, clamped MoE."""
    return _make(
        "gpt_oss",
        num_key_value_heads=KV_HEADS,
        head_dim=HEAD_DIM,
        num_local_experts=4,
        num_experts_per_tok=2,
        sliding_window=SLIDING_WINDOW,
        layer_types=["sliding_attention", "full_attention"],
    )


def gemma3_text() -> PretrainedConfig:
    """Local/global attention with different RoPE bases, q/k norm, sandwich norms."""
    return _make(
        "gemma3_text",
        num_key_value_heads=KV_HEADS,
        head_dim=HEAD_DIM,
        sliding_window=SLIDING_WINDOW,
        layer_types=["sliding_attention", "full_attention"],
        tie_word_embeddings=True,
    )


def opt() -> PretrainedConfig:
    """Learned positions with an offset, ReLU MLP, pre-LayerNorm with biases."""
    return _make("opt", ffn_dim=INTERMEDIATE, word_embed_proj_dim=HIDDEN, enable_bias=True)


# Multi-head latent attention: q and kv through low-rank projections, a 24-wide q/k head
# (16 without rotary + 8 with) and a 16-wide v head.
_MLA: dict[str, Any] = {
    "num_key_value_heads": HEADS,
    "kv_lora_rank": 16,
    "qk_nope_head_dim": 16,
    "qk_rope_head_dim": 8,
    "v_head_dim": 16,
    "moe_intermediate_size": 32,
    "first_k_dense_replace": 1,
}


def deepseek_v2() -> PretrainedConfig:
    """MLA without a q low-rank projection (V2-Lite), RoPE written as a complex rotation, MoE (4 routed experts, top-2 greedy,
    2 shared experts) after a first dense layer."""
    return _make(
        "deepseek_v2",
        **_MLA,
        q_lora_rank=None,
        n_routed_experts=4,
        num_experts_per_tok=2,
        n_shared_experts=2,
        topk_method="greedy",
        routed_scaling_factor=1.0,
    )


def deepseek_v3() -> PretrainedConfig:
    """MLA with low-rank q and kv (interleaved RoPE on the rotary part), sigmoid-scored MoE
    with group-limited top-2 of 4 routed experts, a shared expert, scaling 2.5, a first dense
    layer."""
    return _make(
        "deepseek_v3",
        **_MLA,
        q_lora_rank=32,
        n_routed_experts=4,
        num_experts_per_tok=2,
        n_shared_experts=1,
        n_group=2,
        topk_group=1,
        norm_topk_prob=True,
        routed_scaling_factor=2.5,
    )


TINY_CONFIGS: dict[str, Callable[[], PretrainedConfig]] = {
    "llama": llama,
    "qwen2": qwen2,
    "mistral": mistral,
    "phi3": phi3,
    "gpt2": gpt2,
    "mixtral": mixtral,
    "gemma": gemma,
    "gemma2": gemma2,
    "qwen3": qwen3,
    "olmo2": olmo2,
    "stablelm": stablelm,
    "starcoder2": starcoder2,
    "granite": granite,
    "phi": phi,
    "gpt_neox": gpt_neox,
    "cohere": cohere,
    "qwen2_moe": qwen2_moe,
    "gpt_oss": gpt_oss,
    "gemma3_text": gemma3_text,
    "opt": opt,
    "deepseek_v2": deepseek_v2,
    "deepseek_v3": deepseek_v3,
}


def tiny_config(arch: str) -> PretrainedConfig:
    """Return a fresh tiny config for ``arch`` (a Hugging Face ``model_type``).

    Raises:
        ValueError: ``arch`` is not a key of :data:`TINY_CONFIGS`; the message lists them.
    """
    try:
        factory = TINY_CONFIGS[arch]
    except KeyError:
        accepted = ", ".join(sorted(TINY_CONFIGS))
        raise ValueError(f"unknown tiny architecture {arch!r}; accepted: {accepted}") from None
    return factory()


# Shapes of a ~1B-parameter model, for measurements that need realistic proportions (how much
# of the FLOPs sits in GEMMs vs. elementwise glue) but no weights: graphs trace on meta.
_REALISTIC: dict[str, int] = {
    "vocab_size": 32000,
    "hidden_size": 2048,
    "n_embd": 2048,
    "word_embed_proj_dim": 2048,
    "intermediate_size": 8192,
    "ffn_dim": 8192,
    "n_inner": 8192,
    "moe_intermediate_size": 1024,
    "shared_expert_intermediate_size": 4096,
    "num_attention_heads": 16,
    "n_head": 16,
    "num_key_value_heads": 4,
    "head_dim": 128,
    "query_pre_attn_scalar": 128,
    "max_position_embeddings": 4096,
    "n_positions": 4096,
}


def realistic_config(arch: str) -> PretrainedConfig:
    """``arch``'s tiny config with the hidden, head, MLP and vocabulary sizes of a ~1B model
    (2 layers); every other field, and so every feature it exercises, is kept."""
    config = tiny_config(arch)
    present = config.to_dict()
    for key, value in _REALISTIC.items():
        if present.get(key) is not None:
            setattr(config, key, value)
    if present.get("attention_multiplier") is not None:
        config.attention_multiplier = 1.0 / _REALISTIC["head_dim"]
    if present.get("kv_lora_rank") is not None:  # MLA: DeepSeek-V2-Lite's latent widths
        for key, value in _REALISTIC_MLA.items():
            if key != "q_lora_rank" or present.get(key) is not None:
                setattr(config, key, value)
        config.num_key_value_heads = config.num_attention_heads
        config.head_dim = config.qk_rope_head_dim
    return config


_REALISTIC_MLA: dict[str, int] = {
    "q_lora_rank": 1536,
    "kv_lora_rank": 512,
    "qk_nope_head_dim": 128,
    "qk_rope_head_dim": 64,
    "v_head_dim": 128,
}
