"""Build tiny random-weight Hugging Face checkpoints and load them back as reference models.

``build_checkpoint("llama", tmp_path)`` writes a complete, offline-loadable model directory:
``config.json``, ``model.safetensors`` (or shards plus ``model.safetensors.index.json``),
``generation_config.json`` and the byte-level tokenizer from :mod:`kiln.models.tokenizer`.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn
from transformers import AutoModelForCausalLM, GenerationConfig, PretrainedConfig, PreTrainedModel

from .tiny_configs import tiny_config
from .tokenizer import BOS_ID, EOS_ID, PAD_ID, build_tokenizer

# Re-initialisation scales. HF's default (normal, std 0.02) gives nearly uniform logits, which
# makes parity tests pass for broken kernels; these give logits spread over several units.
WEIGHT_STD = 0.2
NORM_NOISE_STD = 0.1
BIAS_STD = 0.05


def _norm_parameter_ids(model: nn.Module) -> set[int]:
    """ids of the parameters owned by normalisation layers (LayerNorm, RMSNorm and friends)."""
    ids: set[int] = set()
    for module in model.modules():
        if "norm" in type(module).__name__.lower():
            ids.update(id(p) for p in module.parameters(recurse=False))
    return ids


@torch.no_grad()
def reinit_weights(model: nn.Module, seed: int) -> None:
    """Overwrite every parameter of ``model`` with non-degenerate values drawn from ``seed``.

    * matrices, embeddings and expert tensors: normal, std :data:`WEIGHT_STD`;
    * norm scales: 1 + noise, or just noise for zero-centred ``(1 + weight)`` norms such as
      Gemma's (recognised because HF initialises them to exactly 0);
    * biases and any other vector: small nonzero noise (std :data:`BIAS_STD`).

    Draws happen in ``named_parameters`` order from one CPU generator, in float32, so the result
    depends only on the architecture, config and seed. Tied parameters are visited once.
    """
    gen = torch.Generator().manual_seed(seed)
    norm_ids = _norm_parameter_ids(model)
    for name, param in model.named_parameters():
        noise = torch.randn(param.shape, generator=gen, dtype=torch.float32)
        if id(param) in norm_ids and not name.endswith("bias"):
            zero_centred = bool(torch.all(param == 0))
            value = noise * NORM_NOISE_STD + (0.0 if zero_centred else 1.0)
        elif param.ndim <= 1:
            value = noise * BIAS_STD
        else:
            value = noise * WEIGHT_STD
        param.copy_(value.to(param.dtype))


def build_model(
    arch: str, *, seed: int = 0, config_overrides: dict[str, Any] | None = None
) -> PreTrainedModel:
    """Construct the tiny ``arch`` model in float32, eval mode, with :func:`reinit_weights` applied."""
    config = tiny_config(arch)
    for key, value in (config_overrides or {}).items():
        if not hasattr(config, key):
            raise ValueError(f"{type(config).__name__} has no attribute {key!r} to override")
        setattr(config, key, value)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    reinit_weights(model, seed)
    return model.eval()


def build_checkpoint(
    arch: str,
    out_dir: str | os.PathLike[str],
    *,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    max_shard_size: str | None = None,
    config_overrides: dict[str, Any] | None = None,
) -> Path:
    """Write a tiny random-weight checkpoint of ``arch`` (a key of ``TINY_CONFIGS``) to ``out_dir``.

    Args:
        arch: Hugging Face ``model_type`` of the architecture, e.g. ``"llama"``.
        out_dir: Directory to create or overwrite files in.
        seed: Seeds model construction and :func:`reinit_weights`; same seed, same bytes.
        dtype: Storage dtype of the weights (drawn in float32, then cast).
        max_shard_size: e.g. ``"20KB"`` to force several shards plus
            ``model.safetensors.index.json``; ``None`` writes one ``model.safetensors``.
        config_overrides: Attributes set on the tiny config before the model is built.

    Returns:
        ``out_dir`` as a :class:`pathlib.Path`.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model = build_model(arch, seed=seed, config_overrides=config_overrides).to(dtype)
    model.config.dtype = dtype
    # transformers 5 always writes safetensors (the old `safe_serialization` flag is gone).
    save_kwargs: dict[str, Any] = {}
    if max_shard_size is not None:
        save_kwargs["max_shard_size"] = max_shard_size
    model.save_pretrained(out, **save_kwargs)
    GenerationConfig(bos_token_id=BOS_ID, eos_token_id=EOS_ID, pad_token_id=PAD_ID).save_pretrained(
        out
    )
    tokenizer = build_tokenizer(out, vocab_size=model.config.vocab_size)
    assert len(tokenizer) <= model.config.vocab_size
    return out


def write_weightless_checkpoint(config: PretrainedConfig, out_dir: str | os.PathLike[str]) -> Path:
    """A checkpoint directory holding ``config`` and an empty weights file: enough for kiln's
    frontend, which traces on the meta device and reads no weight (graph-level measurements of
    large shapes without materializing them). Compiling it into an artifact would fail."""
    out = Path(out_dir)
    config.save_pretrained(out)
    save_file({}, out / "model.safetensors")
    return out


def load_reference_model(
    model_dir: str | os.PathLike[str], dtype: torch.dtype = torch.float32
) -> PreTrainedModel:
    """Load a checkpoint with the plainest HF code paths, for parity tests.

    Uses eager attention and, for MoE models, the eager per-expert loop (each routed token runs
    through its experts with ordinary matmuls, no grouped/batched kernels).
    """
    model = AutoModelForCausalLM.from_pretrained(
        model_dir, dtype=dtype, attn_implementation="eager", experts_implementation="eager"
    )
    return model.eval()


def reference_greedy(
    model_dir: str | os.PathLike[str], prompts: list[list[int]], max_new_tokens: int, device: str = "cpu"
) -> list[list[int]]:
    """transformers' greedy continuation of each prompt alone (no EOS stop): what kiln's greedy
    generation is compared with."""
    model = load_reference_model(model_dir).to(device)
    outs = []
    with torch.no_grad():
        for p in prompts:
            ids = torch.tensor([p], device=device)
            gen = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                                 do_sample=False, eos_token_id=None, pad_token_id=0)
            outs.append(gen[0, len(p):].tolist())
    return outs
