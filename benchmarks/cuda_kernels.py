"""Per-kernel timings on the GPU against their floors, and the config sweeps they suggest:
paged attention (prefill of 2048 tokens beside torch's flash SDPA on the same shapes; decode at
batch 1, 32 and 256), every dense linear of the 1B and 8B shapes (cuBLAS through torch vs the
Triton GEMM's best config) and the sampler's row kernel. Prints tables, writes JSON.

    python benchmarks/cuda_kernels.py [--shapes llama-3.1-8b,llama-3.2-1b] [--out FILE]
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
from dataclasses import asdict, replace
from pathlib import Path

import torch
import triton
from triton.testing import do_bench

from kiln.kernels.triton_kernels import attention, linear, sampling
from kiln.models.shapes import shape_config

BS = 16
CAPACITY = 4096
"""Tokens of a block-table row (max_model_len 4096, as benchmarks/cuda.py serves)."""


def _time(fn) -> float:
    """Median microseconds of fn (L2 flushed between calls)."""
    return 1e3 * do_bench(fn, warmup=10, rep=60, return_mode="median")


def _attention_case(hq, hkv, d, seqs: list[int], q_lens: list[int], dtype=torch.bfloat16):
    dev = "cuda"
    mb = CAPACITY // BS
    nb = len(seqs) * mb + 1
    kc = torch.randn(nb, BS, hkv, d, device=dev, dtype=dtype)
    vc = torch.randn(nb, BS, hkv, d, device=dev, dtype=dtype)
    bt = (torch.randperm(nb - 1, device=dev)[: len(seqs) * mb].view(len(seqs), mb) + 1).int()
    t = sum(q_lens)
    q = torch.randn(t, hq, d, device=dev, dtype=dtype)
    out = torch.empty_like(q)
    cu = torch.tensor([0, *itertools.accumulate(q_lens)], device=dev, dtype=torch.int32)
    args = [q, kc, vc, bt, torch.tensor(seqs, device=dev, dtype=torch.int32), cu]
    attrs = {"scale": d ** -0.5, "causal": True, "sliding_window": None, "softcap": None}
    return out, args, attrs


def _flops(seqs, q_lens, hq, d) -> float:
    return sum(4.0 * hq * d * sum(c - q + i + 1 for i in range(q)) for c, q in zip(seqs, q_lens, strict=True))


def attention_sweep(cfg) -> dict:
    hq, hkv, d = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    res: dict = {}
    prefill = dict(
        block_m=(64, 128), block_n=(32, 64, 128), num_warps=(4, 8), num_stages=(2, 3, 4))
    decode = dict(block_n=(32, 64, 128), num_warps=(2, 4), num_stages=(2, 3), num_splits=(8, 16, 32))
    cases = {"prefill_2048": ([2048], [2048], prefill), "decode_b1_ctx1024": ([1024], [1], decode),
             "decode_b32_ctx1024": ([1024] * 32, [1] * 32, decode),
             "decode_b256_ctx1024": ([1024] * 256, [1] * 256, decode)}
    for name, (seqs, q_lens, space) in cases.items():
        out, args, attrs = _attention_case(hq, hkv, d, seqs, q_lens)
        kv_bytes = sum(seqs) * hkv * d * 2 * 2
        trials = []
        for values in itertools.product(*space.values()):
            c = replace(attention.DEFAULT_CONFIG, **dict(zip(space, values, strict=True)))
            if name.startswith("decode_b256") and c.num_splits != attention.DEFAULT_CONFIG.num_splits:
                continue  # the unified path: splits do not matter
            try:
                fn = attention.make_launcher(c)
                us = _time(lambda fn=fn: fn([out], args, attrs))
            except Exception as e:  # noqa: BLE001 - a config the compiler rejects (shared memory)
                trials.append({"config": asdict(c), "error": str(e).splitlines()[0][:120]})
                continue
            trials.append({"config": {k: getattr(c, k) for k in space}, "us": us})
        fn = attention.make_launcher()
        default = _time(lambda: fn([out], args, attrs))
        ok = [r for r in trials if "us" in r]
        best = min(ok, key=lambda r: r["us"])
        row = {"default_us": default, "best_us": best["us"], "best": best["config"], "tried": len(trials),
               "kv_floor_us": kv_bytes / 4.0e6, "tflops_default": _flops(seqs, q_lens, hq, d) / default / 1e6,
               "tflops_best": _flops(seqs, q_lens, hq, d) / best["us"] / 1e6}
        if name.startswith("prefill"):
            qs = torch.randn(1, hq, 2048, d, device="cuda", dtype=torch.bfloat16)
            ks = torch.randn(1, hkv, 2048, d, device="cuda", dtype=torch.bfloat16)
            vs = torch.randn_like(ks)
            sdpa = _time(lambda: torch.nn.functional.scaled_dot_product_attention(
                qs, ks, vs, is_causal=True, enable_gqa=True))
            row |= {"torch_sdpa_us": sdpa, "tflops_sdpa": _flops(seqs, q_lens, hq, d) / sdpa / 1e6}
        res[name] = row
        print(f"attention {name:<22} default {default:9.1f} us  best {best['us']:9.1f} us  {best['config']}"
              + (f"  sdpa {row['torch_sdpa_us']:.1f} us" if "torch_sdpa_us" in row else ""), flush=True)
    return res


SMALL = [linear.GemmConfig(16, n, k, 8, w, s) for n in (16, 32, 64) for k in (128, 256) for w in (4,)
         for s in (3, 4, 5)]
LARGE = [linear.GemmConfig(m, n, 64, 8, w, s) for m, n in ((64, 128), (128, 128), (128, 256)) for w in (4, 8)
         for s in (3, 4)]


def linear_sweep(cfg) -> dict:
    h, inter = cfg.hidden_size, cfg.intermediate_size
    hq, hkv, d = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    shapes = {"qkv": (h, (hq + 2 * hkv) * d), "o": (hq * d, h), "gate_up": (h, 2 * inter), "down": (inter, h),
              "lm_head": (h, cfg.vocab_size)}
    res: dict = {}
    for name, (k, n) in shapes.items():
        w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02
        for m in (1, 8, 32, 256, 2048):
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            y = torch.empty(m, n, device="cuda", dtype=torch.bfloat16)
            vendor = _time(lambda x=x, y=y, w=w: torch.mm(x, w.t(), out=y))
            best, best_cfg = math.inf, None
            for c in (SMALL if m <= 32 else LARGE):
                try:
                    us = _time(lambda x=x, y=y, w=w, c=c: linear.gemm(y, x, w, None, c))
                except Exception:  # noqa: BLE001,S112 - shared memory too small for this config
                    continue
                if us < best:
                    best, best_cfg = us, c
            nbytes = (n * k + m * k + m * n) * 2
            res[f"{name}_m{m}"] = {"k": k, "n": n, "m": m, "cublas_us": vendor, "triton_us": best,
                                   "triton_config": asdict(best_cfg) if best_cfg else None,
                                   "bytes_floor_us": nbytes / 4.0e6, "flop_floor_us": 2 * m * n * k / 793e6}
            print(f"linear {name:<8} m={m:<5} cublas {vendor:8.1f} us  triton {best:8.1f} us  "
                  f"floor {max(nbytes / 4.0e6, 2 * m * n * k / 793e6):7.1f} us  {best_cfg}", flush=True)
    return res


def sampling_sweep(vocab: int) -> dict:
    res: dict = {}
    for b in (1, 32, 256):
        x = torch.randn(b, vocab, device="cuda")
        fp, ip = sampling.pack_params([[0.0, 1, 0, 0, 1, 0]] * b,
                                      [[0, 0, 0, sampling.MODE_GREEDY, -1, 0, 0]] * b, torch.device("cuda"))
        for block, warps in itertools.product((1024, 2048, 4096), (4, 8, 16)):
            us = _time(lambda x=x, fp=fp, ip=ip, block=block, warps=warps: sampling.sample_rows(
                x, fp, ip, block=block, num_warps=warps))
            res[f"b{b}_block{block}_w{warps}"] = us
            print(f"sample greedy b={b:<4} block {block:<5} warps {warps:<3} {us:8.1f} us", flush=True)
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", default="llama-3.1-8b,llama-3.2-1b")
    ap.add_argument("--attention-shape", default="llama-3.1-8b", help="the shape whose attention configs are swept")
    ap.add_argument("--out", default="benchmarks/results/cuda-kernels.json")
    a = ap.parse_args()
    report: dict = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
                    "shapes": {}}
    for shape in a.shapes.split(","):
        cfg = shape_config(shape)
        report["shapes"][shape] = {"linear": linear_sweep(cfg)}
        if shape == a.attention_shape:
            report["shapes"][shape]["attention"] = attention_sweep(cfg)
    report["sampling_greedy_us"] = sampling_sweep(128256)
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
