"""Quantized serving on one GPU: kiln in bf16, fp8, int8 and int4 in the same run, on one random
checkpoint of a real model's shape (compile-model --quantize from the bf16 weights).

    python benchmarks/cuda_quant.py [--shape llama-3.1-8b] [--formats bf16,fp8,int8,int4]
                                    [--offline bf16,fp8] [--kernels] [--out FILE]

Per format: compile (and tune, --tune-budget seconds of `kiln tune`); batch-1 decode tok/s
(cuda.py's decode_rate: 128-token prompts, median of --reps) and its ratio to the format's own
weight-read limit: the bytes a decode step reads (the artifact's parameters, less the embedding
table that a step gathers one row of, plus the KV cache at the mean context) over the copy
bandwidth measured in this run; batch-32 decode; offline throughput (cuda.py's workload: 1000
requests, prompts and outputs uniform in 100..1024) for the formats --offline names.
--kernels adds one row per projection shape and batch (1 and 2048 rows): µs of one call of the
bf16 cuBLAS product and of each quantized kernel, replayed from a CUDA graph over weights that do
not fit in the L2, with the weight bytes read per second. Prints a table, writes JSON.
"""

from __future__ import annotations

import argparse
import functools
import json
import shutil
import sys
from pathlib import Path

import torch

import kiln
from kiln import LLM

sys.path.insert(0, str(Path(__file__).parent))
from cuda import DECODE, PROMPT, _free, _timed, build_artifact, decode_rate, offline_throughput  # noqa: E402
from cuda_kernels import copy_bandwidth  # noqa: E402

FORMATS = ("bf16", "fp8", "int8", "int4")


def step_bytes(art: Path, cfg: dict) -> int:
    """Parameter bytes a decode step reads: all of the artifact's but the embedding table (one row
    a token), unless the LM head is that table."""
    total = json.loads((art / "manifest.json").read_text())["parameters"]["bytes"]
    embed = 0 if cfg.get("tie_word_embeddings") else 2 * cfg["vocab_size"] * cfg["hidden_size"]
    return total - embed


def bench_format(fmt: str, a, bw: float) -> dict:
    ckpt, art, row = build_artifact(a.shape, Path(a.work), a.tune_budget, None if fmt == "bf16" else fmt)
    cfg = json.loads((ckpt / "config.json").read_text())
    vocab = cfg["vocab_size"]
    kv = 2 * cfg["num_hidden_layers"] * cfg["num_key_value_heads"] * cfg["head_dim"] * 2
    row["weight_bytes_read_per_step"] = step_bytes(art, cfg)
    llm = LLM(art, device="cuda", max_model_len=4096, max_num_seqs=256, max_num_batched_tokens=2048,
              enable_prefix_caching=False)
    _timed(llm, [{"prompt_token_ids": list(range(10, 10 + PROMPT))}] * 4, 8)  # warm
    gen = functools.partial(_timed, llm)
    row["decode_b1_tok_s"] = decode_rate(gen, 1, vocab, a.reps)
    row["decode_b32_tok_s"] = decode_rate(gen, 32, vocab, a.reps)
    row["weight_read_limit_b1_tok_s"] = bw / (row["weight_bytes_read_per_step"] + kv * (PROMPT + DECODE // 2))
    row["b1_fraction_of_limit"] = row["decode_b1_tok_s"] / row["weight_read_limit_b1_tok_s"]
    del gen, llm
    _free()
    if fmt in a.offline.split(","):
        row["offline"] = offline_throughput(art, vocab, a.offline_requests, 512, 8192)
    shutil.rmtree(art)  # four 8B artifacts do not fit the disk together
    return row


def kernel_rows(shape: str) -> list[dict]:
    """µs per call of each projection's product at 1 and 2048 rows: bf16 through cuBLAS, and the
    quantized_linear launcher on int4 (group 128, zeros), W8A8 int8 and fp8 (per-channel) weights
    compile-model --quantize makes; fp8 at 2048 rows also through cuBLAS's _scaled_mm."""
    from kiln.codegen.cuda.tune import COLD_BYTES, graph_time_us
    from kiln.ir.ops.quantize import quantize_fp8, quantize_int
    from kiln.kernels.triton_kernels.quant_act import quant_codes
    from kiln.kernels.triton_kernels.quant_linear import LAUNCHERS
    from kiln.models.shapes import shape_config

    cfg = shape_config(shape, torch.bfloat16)
    h, i, d = cfg.hidden_size, cfg.intermediate_size, cfg.head_dim
    shapes = {"qkv": (h, d * (cfg.num_attention_heads + 2 * cfg.num_key_value_heads)), "o": (d * cfg.num_attention_heads, h),
              "gate_up": (h, 2 * i), "down": (i, h)}
    launch = LAUNCHERS["quantized_linear"]
    rows = []
    for name, (k, n) in shapes.items():
        w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02
        packed = {
            "int4": ([quantize_int(w, part=p, bits=4, group_size=128) for p in ("qweight", "scales", "zeros")],
                     dict(format="int", bits=4, group_size=128, act="none", has_zeros=True)),
            "int8": ([quantize_int(w, part=p, bits=8, group_size=k) for p in ("qweight", "scales")],
                     dict(format="int", bits=8, group_size=k, act="int8", has_zeros=False)),
            "fp8": ([quantize_fp8(w, part=p) for p in ("qweight", "scales")],
                    dict(format="fp8", block_n=1, block_k=k, act="float8_e4m3fn", has_zeros=False)),
        }
        for m in (1, 2048):
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            y = torch.empty(m, n, device="cuda", dtype=torch.bfloat16)
            copies = max(1, min(16, COLD_BYTES // (n * k * 2)))

            def timed(call, parts, copies=copies):
                """µs of call(parts) over `copies` copies of the weight's parts (past the L2)."""
                reps = [[p.clone() for p in parts] for _ in range(copies)]
                return graph_time_us([functools.partial(call, r) for r in reps])

            row = {"proj": name, "k": k, "n": n, "m": m,
                   "bf16_us": timed(functools.partial(_bf16_mm, x, y), [w])}
            for fmt, (parts, attrs) in packed.items():
                attrs = {**attrs, "dtype": "bfloat16", "has_g_idx": False, "has_bias": False}
                row[f"{fmt}_us"] = timed(functools.partial(_quantized, launch, x, y, attrs), parts)
            if m > 1:
                q, sx = quant_codes(x, "float8_e4m3fn")
                row["fp8_cublas_us"] = timed(functools.partial(_cublas_fp8, q, sx, y), packed["fp8"][0])
            for key in [c for c in row if c.endswith("_us")]:
                fmt = key.split("_")[0]
                nbytes = n * k * {"bf16": 2, "int4": 0.5, "int8": 1, "fp8": 1}[fmt]
                row[key.replace("_us", "_TBps" if m == 1 else "_TFLOPs")] = (
                    nbytes / row[key] / 1e6 if m == 1 else 2 * m * n * k / row[key] / 1e6)
            rows.append(row)
            print(json.dumps(row), flush=True)
        del w, packed
        _free()
    return rows


def _bf16_mm(x, y, parts) -> None:
    torch.mm(x, parts[0].t(), out=y)


def _quantized(launch, x, y, attrs, parts) -> None:
    launch([y], [x, *parts], attrs)


def _cublas_fp8(q, sx, y, parts) -> None:
    from kiln.kernels.triton_kernels.scaled_mm import ScaledConfig, scaled_linear

    scaled_linear(y, q, sx, parts[0], parts[1], None, 1, q.shape[1], ScaledConfig(provider="cublas"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", default="llama-3.1-8b")
    ap.add_argument("--formats", default=",".join(FORMATS))
    ap.add_argument("--offline", default="bf16,fp8", help="formats that run the offline throughput workload")
    ap.add_argument("--offline-requests", type=int, default=1000)
    ap.add_argument("--kernels", action="store_true", help="time the projections' kernels too")
    ap.add_argument("--work", default="/tmp/kiln-bench")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--tune-budget", type=float, default=30.0)
    ap.add_argument("--out", default="results/cuda-quant.json")
    a = ap.parse_args()
    bw = copy_bandwidth()
    report: dict = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "kiln": kiln.__version__,
                    "shape": a.shape, "copy_bandwidth_GBps": bw / 1e9, "formats": {}}
    print(f"{report['gpu']}: copy {bw / 1e12:.2f} TB/s (read + write)", flush=True)
    if a.kernels:
        report["kernels"] = kernel_rows(a.shape)
        _write(report, a.out)
    for fmt in [f for f in a.formats.split(",") if f]:
        if fmt not in FORMATS:
            raise SystemExit(f"--formats: {fmt!r} is not one of {', '.join(FORMATS)}")
        report["formats"][fmt] = bench_format(fmt, a, bw)
        _write(report, a.out)
    print(_table(report))


def _write(report: dict, out: str) -> None:
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(json.dumps(report, indent=1))


def _table(report: dict) -> str:
    lines = [f"{'format':6} {'b1 tok/s':>9} {'limit':>7} {'of limit':>8} {'vs bf16':>7} {'b32 tok/s':>9} "
             f"{'offline tok/s':>13} {'vs bf16':>7}"]
    base = report["formats"].get("bf16", {})
    for fmt, r in report["formats"].items():
        off = r.get("offline", {}).get("output_tok_s")
        base_off = base.get("offline", {}).get("output_tok_s")
        lines.append(f"{fmt:6} {r['decode_b1_tok_s']:9.1f} {r['weight_read_limit_b1_tok_s']:7.1f} "
                     f"{r['b1_fraction_of_limit']:8.0%} "
                     f"{r['decode_b1_tok_s'] / base['decode_b1_tok_s'] if base else float('nan'):7.2f} "
                     f"{r['decode_b32_tok_s']:9.1f} {off or float('nan'):13.1f} "
                     f"{off / base_off if off and base_off else float('nan'):7.2f}")
    for r in report.get("kernels", []):
        cells = " ".join(f"{k[:-3]} {v:8.1f}" for k, v in r.items() if k.endswith("_us"))
        lines.append(f"{r['proj']:8} m={r['m']:<5} µs: {cells}")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
