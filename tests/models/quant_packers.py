"""Tiny pre-quantized llama checkpoints for tests/models/test_quantized_checkpoints.py, packed
here from the formats' published layouts (GPTQ v1/v2, AWQ GEMM, FineGrainedFP8 blocks,
compressed-tensors int / float), written independently of kiln's loader: integer weights,
zeros and scales are drawn at random, so the dense weights are known exactly,
w = ((q - z) * s) in float32. Each writer also writes the dense checkpoint of those weights."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

# head_dim 32 so that every linear has K a multiple of 128 or 64 (o_proj: K = 4 * 32).
SHAPE = {"hidden_size": 128, "intermediate_size": 256, "head_dim": 32}
LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
           "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
MODULES = [f"model.layers.{i}.{m}" for i in range(2) for m in LINEARS]
AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)


def pack_rows(q: np.ndarray, bits: int) -> np.ndarray:
    """int32 words of unsigned `bits`-bit q [R, C] packed along R (GPTQ's qweight): word r
    holds rows r * 32/bits + j at bits j*bits.., low first."""
    per = 32 // bits
    q = q.astype(np.uint32).reshape(q.shape[0] // per, per, q.shape[1])
    words = np.zeros((q.shape[0], q.shape[2]), dtype=np.uint32)
    for j in range(per):
        words |= q[:, j, :] << np.uint32(bits * j)
    return words.view(np.int32)


def pack_cols(q: np.ndarray, bits: int, order: tuple[int, ...] | None = None) -> np.ndarray:
    """int32 words of q [R, C] packed along C: field i of word c holds column c*per + order[i]
    (GPTQ's qzeros with the identity order, AWQ's qweight / qzeros with AWQ_ORDER)."""
    per = 32 // bits
    order = order or tuple(range(per))
    q = q.astype(np.uint32).reshape(q.shape[0], q.shape[1] // per, per)
    words = np.zeros(q.shape[:2], dtype=np.uint32)
    for i, col in enumerate(order):
        words |= q[:, :, col] << np.uint32(bits * i)
    return words.view(np.int32)


def draw_int(gen: torch.Generator, n: int, k: int, bits: int, groups: int, sym: bool, desc_act: bool):
    """Random q [K, N], zeros [G, N], fp16 scales [G, N] and the group of each input channel."""
    q = torch.randint(0, 1 << bits, (k, n), generator=gen)
    half = 1 << (bits - 1)
    z = torch.full((groups, n), half) if sym else torch.randint(1, (1 << bits) - 1, (groups, n), generator=gen)
    s = (torch.rand(groups, n, generator=gen) + 0.5) * (0.25 / half)
    g = torch.arange(k) // (k // groups)
    if desc_act:
        g = g[torch.randperm(k, generator=gen)]
    return q, z, s.half(), g


def dense_int(q, z, s, g) -> torch.Tensor:
    """w [N, K] = (q - z) * s of channel k's group, in float32."""
    return ((q - z[g]).float() * s.float()[g]).T.contiguous()


def write_pair(base: Path, out: Path, tensors: dict[str, torch.Tensor], dense: dict[str, torch.Tensor],
               qc: dict) -> tuple[Path, Path]:
    """The quantized checkpoint (`tensors` over the base's others, config with `qc`) and the
    dense one of the known weights."""
    state = load_file(base / "model.safetensors")
    config = json.loads((base / "config.json").read_text())
    qdir, ddir = out / "quantized", out / "dense"
    for d, weights, cfg in [(qdir, tensors, {**config, "quantization_config": qc}), (ddir, dense, config)]:
        d.mkdir(parents=True)
        for f in base.iterdir():
            if f.name not in ("model.safetensors", "config.json"):
                shutil.copy(f, d / f.name)
        kept = {k: v for k, v in state.items() if k.removesuffix(".weight") not in MODULES}
        save_file({**kept, **{k: v.contiguous() for k, v in weights.items()}}, d / "model.safetensors")
        (d / "config.json").write_text(json.dumps(cfg, indent=2))
    return qdir, ddir


def gptq_checkpoint(base: Path, out: Path, bits=4, group_size=128, sym=True, desc_act=False, seed=0, v2=False,
                    **extra):
    """GPTQ's v1 layout ("gptq": qzeros store zero - 1), or GPTQModel's "gptq_v2" (zero as is)."""
    gen = torch.Generator().manual_seed(seed)
    tensors, dense = {}, {}
    shapes = {k.removesuffix(".weight"): v.shape for k, v in load_file(base / "model.safetensors").items()}
    for m in MODULES:
        n, k = shapes[m]
        groups = 1 if group_size == -1 else k // group_size
        q, z, s, g = draw_int(gen, n, k, bits, groups, sym, desc_act)
        tensors[f"{m}.qweight"] = torch.from_numpy(pack_rows(q.numpy(), bits))
        tensors[f"{m}.qzeros"] = torch.from_numpy(pack_cols((z if v2 else z - 1).numpy(), bits))
        tensors[f"{m}.scales"] = s
        tensors[f"{m}.g_idx"] = g.to(torch.int32)
        dense[f"{m}.weight"] = dense_int(q, z, s, g)
    qc = {"quant_method": "gptq", "bits": bits, "group_size": group_size, "sym": sym, "desc_act": desc_act,
          "damp_percent": 0.01, "true_sequential": True, "static_groups": False, "checkpoint_format": "gptq_v2" if v2 else "gptq",
          "model_name_or_path": None, "model_file_base_name": None, **extra}
    return write_pair(base, out, tensors, dense, qc)


def awq_checkpoint(base: Path, out: Path, group_size=64, seed=1, **extra):
    gen = torch.Generator().manual_seed(seed)
    tensors, dense = {}, {}
    shapes = {k.removesuffix(".weight"): v.shape for k, v in load_file(base / "model.safetensors").items()}
    for m in MODULES:
        n, k = shapes[m]
        q, z, s, g = draw_int(gen, n, k, 4, k // group_size, False, False)
        tensors[f"{m}.qweight"] = torch.from_numpy(pack_cols(q.numpy(), 4, AWQ_ORDER))
        tensors[f"{m}.qzeros"] = torch.from_numpy(pack_cols(z.numpy(), 4, AWQ_ORDER))
        tensors[f"{m}.scales"] = s
        dense[f"{m}.weight"] = dense_int(q, z, s, g)
    qc = {"quant_method": "awq", "bits": 4, "group_size": group_size, "zero_point": True, "version": "gemm",
          "modules_to_not_convert": None, **extra}
    return write_pair(base, out, tensors, dense, qc)


def fp8_checkpoint(base: Path, out: Path, seed=2, e8m0=False, **extra):
    """FineGrainedFP8: 128 x 128 blocks (k_proj / v_proj's 64 rows: a partial block); float32
    scales, or power-of-two float8_e8m0fnu ones."""
    gen = torch.Generator().manual_seed(seed)
    tensors, dense = {}, {}
    shapes = {k.removesuffix(".weight"): v.shape for k, v in load_file(base / "model.safetensors").items()}
    for m in MODULES:
        n, k = shapes[m]
        w8 = (torch.randn(n, k, generator=gen) * 100).to(torch.float8_e4m3fn)
        s = (torch.rand(-(-n // 128), -(-k // 128), generator=gen) + 0.5) * 1e-3
        if e8m0:
            s = torch.exp2(torch.randint(-12, -8, s.shape, generator=gen).float())
        tensors[f"{m}.weight"] = w8
        tensors[f"{m}.weight_scale_inv"] = s.to(torch.float8_e8m0fnu) if e8m0 else s
        dense[f"{m}.weight"] = w8.float() * s.repeat_interleave(128, 0)[:n].repeat_interleave(128, 1)[:, :k]
    qc = {"quant_method": "fp8", "activation_scheme": "dynamic", "weight_block_size": [128, 128],
          "modules_to_not_convert": None, **extra}
    return write_pair(base, out, tensors, dense, qc)


def compressed_tensors_checkpoint(base: Path, out: Path, kind="int", seed=3, weights=None, acts=None,
                                  weight_only=False, **extra):
    """llm-compressor's W8A8: int8 (or float8) weights with per-channel scales [N, 1] (or per
    tensor [1], per group [N, K / group_size], per block [ceil(N / bn), ceil(K / bk)]), dynamic
    per-token activations (none when `weight_only`)."""
    gen = torch.Generator().manual_seed(seed)
    tensors, dense = {}, {}
    shapes = {k.removesuffix(".weight"): v.shape for k, v in load_file(base / "model.safetensors").items()}
    strategy = (weights or {}).get("strategy", "channel")
    for m in MODULES:
        n, k = shapes[m]
        bn, bk = {"tensor": (n, k), "channel": (1, k)}.get(strategy) or \
            ((1, (weights or {}).get("group_size")) if strategy == "group" else tuple(weights["block_structure"]))
        scale_shape = (1,) if strategy == "tensor" else (-(-n // bn), -(-k // bk))
        if kind == "int":
            q = torch.randint(-127, 128, (n, k), generator=gen, dtype=torch.int8)
            s = ((torch.rand(scale_shape, generator=gen) + 0.5) * 2e-3).half()
        else:
            q = (torch.randn(n, k, generator=gen) * 100).to(torch.float8_e4m3fn)
            s = (torch.rand(scale_shape, generator=gen) + 0.5) * 1e-3
        tensors[f"{m}.weight"], tensors[f"{m}.weight_scale"] = q, s
        s2 = s.float().reshape(-(-n // bn), -(-k // bk))
        dense[f"{m}.weight"] = q.float() * s2.repeat_interleave(bn, 0)[:n].repeat_interleave(bk, 1)[:, :k]
    scheme = {"num_bits": 8, "type": kind, "symmetric": True, "dynamic": False, "strategy": "channel",
              "group_size": None, "block_structure": None, "actorder": None, "observer": "minmax",
              "observer_kwargs": {}, **(weights or {})}
    act = {"num_bits": 8, "type": kind, "symmetric": True, "dynamic": True, "strategy": "token",
           "group_size": None, "block_structure": None, "actorder": None, "observer": None,
           "observer_kwargs": {}, **(acts or {})}
    fmt = "int-quantized" if kind == "int" else "float-quantized"
    qc = {"quant_method": "compressed-tensors", "format": fmt, "quantization_status": "compressed",
          "config_groups": {"group_0": {"targets": ["Linear"], "weights": scheme,
                                        "input_activations": None if weight_only else act,
                                        "output_activations": None, "format": fmt}},
          "ignore": ["lm_head"], "kv_cache_scheme": None, "sparsity_config": {}, "global_compression_ratio": None,
          **extra}
    return write_pair(base, out, tensors, dense, qc)
