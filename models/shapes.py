"""Random-weight checkpoints of real models' shapes, synthesized on the machine that benchmarks
them (nothing comes from a model hub): the config of the real model, weights drawn per tensor
(normal, std 0.02; norms 1) straight into safetensors shards, and the tiny byte-level tokenizer
(its ids are a subset of the vocabulary; benchmarks feed token ids).

    python -m kiln.models.shapes llama-3.1-8b OUT_DIR [--dtype bfloat16] [--device cuda]
    python -m kiln.models.shapes llama-100m OUT_DIR --dtype float32
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from tqdm.auto import tqdm
from transformers import GenerationConfig, LlamaConfig

from .tokenizer import BOS_ID, EOS_ID, PAD_ID, build_tokenizer

_LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                "original_max_position_embeddings": 8192, "rope_theta": 500000.0}

SHAPES: dict[str, dict[str, Any]] = {
    "llama-3.2-1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                         num_key_value_heads=8, head_dim=64, tie_word_embeddings=True,
                         rope_parameters={**_LLAMA3_ROPE, "factor": 32.0}),
    "llama-3.1-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                         num_key_value_heads=8, head_dim=128, tie_word_embeddings=False,
                         rope_parameters=dict(_LLAMA3_ROPE)),
    "llama-100m": dict(hidden_size=768, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=12,
                       num_key_value_heads=4, head_dim=64, tie_word_embeddings=True, vocab_size=32000,
                       max_position_embeddings=4096, rope_parameters={"rope_type": "default", "rope_theta": 10000.0}),
}
"""Name -> LlamaConfig fields: Meta's Llama 3.2 1B and 3.1 8B, and a ~100M-parameter Llama for
CPU benchmarks (SmolLM/TinyLlama-like proportions; not a released model)."""

SHARD_BYTES = 4 << 30


def shape_config(name: str, dtype: torch.dtype = torch.bfloat16) -> LlamaConfig:
    """The config of a real model's shape; KeyError naming the known shapes otherwise."""
    if name not in SHAPES:
        raise KeyError(f"unknown shape '{name}'; known: {', '.join(SHAPES)}")
    fields = {"vocab_size": 128256, "max_position_embeddings": 131072, **SHAPES[name]}
    return LlamaConfig(rms_norm_eps=1e-5, hidden_act="silu", bos_token_id=BOS_ID, eos_token_id=EOS_ID,
                       pad_token_id=PAD_ID, dtype=dtype, **fields)


def _tensors(c: LlamaConfig) -> list[tuple[str, tuple[int, ...]]]:
    h, d = c.hidden_size, c.head_dim
    out: list[tuple[str, tuple[int, ...]]] = [("model.embed_tokens.weight", (c.vocab_size, h))]
    for i in range(c.num_hidden_layers):
        p = f"model.layers.{i}."
        out += [
            (p + "input_layernorm.weight", (h,)),
            (p + "self_attn.q_proj.weight", (c.num_attention_heads * d, h)),
            (p + "self_attn.k_proj.weight", (c.num_key_value_heads * d, h)),
            (p + "self_attn.v_proj.weight", (c.num_key_value_heads * d, h)),
            (p + "self_attn.o_proj.weight", (h, c.num_attention_heads * d)),
            (p + "post_attention_layernorm.weight", (h,)),
            (p + "mlp.gate_proj.weight", (c.intermediate_size, h)),
            (p + "mlp.up_proj.weight", (c.intermediate_size, h)),
            (p + "mlp.down_proj.weight", (h, c.intermediate_size)),
        ]
    out.append(("model.norm.weight", (h,)))
    if not c.tie_word_embeddings:
        out.append(("lm_head.weight", (c.vocab_size, h)))
    return out


def synthesize_checkpoint(name: str, out_dir: str | os.PathLike[str], dtype: torch.dtype = torch.bfloat16,
                          device: str = "cpu", seed: int = 0) -> Path:
    """Write a random-weight checkpoint of shape `name` to `out_dir` (config, shards and index,
    generation config, tokenizer); weights are drawn on `device` (a GPU draws 16 GB in seconds)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    config = shape_config(name, dtype)
    config.save_pretrained(out)
    GenerationConfig(bos_token_id=BOS_ID, eos_token_id=EOS_ID, pad_token_id=PAD_ID).save_pretrained(out)
    build_tokenizer(out)
    gen = torch.Generator(device=device).manual_seed(seed)
    specs = _tensors(config)
    shards: list[list[tuple[str, tuple[int, ...]]]] = [[]]
    size = 0
    for n, shape in specs:
        nbytes = torch.Size(shape).numel() * dtype.itemsize
        if size and size + nbytes > SHARD_BYTES:
            shards.append([])
            size = 0
        shards[-1].append((n, shape))
        size += nbytes
    index: dict[str, str] = {}
    total = 0
    bar = tqdm(total=len(specs), desc=f"synthesize {name}", unit="tensor", disable=None)
    for i, shard in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        tensors = {}
        for n, shape in shard:
            if n.endswith("norm.weight"):
                t = torch.ones(shape, dtype=dtype)
            else:
                t = (torch.randn(shape, generator=gen, device=device, dtype=torch.float32) * 0.02).to(dtype).cpu()
            tensors[n] = t
            index[n] = fname
            total += t.nbytes
            bar.update()
        save_file(tensors, out / fname, metadata={"format": "pt"})
    bar.close()
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": index}))
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m kiln.models.shapes", description=__doc__.splitlines()[0])
    p.add_argument("shape", choices=sorted(SHAPES))
    p.add_argument("out")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    a = p.parse_args(argv)
    print(synthesize_checkpoint(a.shape, a.out, getattr(torch, a.dtype), a.device))


if __name__ == "__main__":
    main()
