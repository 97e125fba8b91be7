"""Multi-LoRA serving against the base model, same run, same random checkpoint (issue 14's bars).

    python benchmarks/cuda_lora.py [--shape llama-3.1-8b] [--adapters 8] [--rank 16] [--out FILE]

The checkpoint (random weights of the real model's shape) is compiled twice: plain, and with
`--max-lora-rank RANK` (all seven projections). --adapters random PEFT adapters of rank RANK
(nonzero A and B) are written in PEFT's format. Measured: offline throughput (cuda.py's
workload: --offline-requests requests, prompt and output lengths uniform in 100..1024) of the
plain artifact, and of the LoRA artifact with the adapters spread round-robin over the requests
(max_loras = the adapter count); batch-1 decode (cuda.py's decode_rate) of the plain artifact and
of the LoRA artifact with one adapter. Bars: multi-LoRA offline >= 80% of the base, batch 1 with
an adapter >= 85%. Prints a table, writes JSON. --device cpu --target reference --shape NAME runs
the same on a small shape without a GPU (a smoke run).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

import kiln
from kiln import LLM, LoRARequest, SamplingParams
from kiln.models.shapes import synthesize_checkpoint

sys.path.insert(0, str(Path(__file__).parent))
from cuda import DECODE, PROMPT, _free, _prompts  # noqa: E402

MODULES = {"self_attn": ("q_proj", "k_proj", "v_proj", "o_proj"), "mlp": ("gate_proj", "up_proj", "down_proj")}


def write_adapters(cfg: dict, out: Path, count: int, rank: int) -> list[LoRARequest]:
    """`count` random PEFT adapters of `rank` on every projection of every layer."""
    h, i, d = cfg["hidden_size"], cfg["intermediate_size"], cfg["head_dim"]
    qo, kv = d * cfg["num_attention_heads"], d * cfg["num_key_value_heads"]
    shapes = {"q_proj": (h, qo), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (qo, h),
              "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)}  # (in, out)
    reqs = []
    for a in range(count):
        g = torch.Generator().manual_seed(a)
        tensors = {}
        for layer in range(cfg["num_hidden_layers"]):
            for block, names in MODULES.items():
                for name in names:
                    k, n = shapes[name]
                    key = f"base_model.model.model.layers.{layer}.{block}.{name}"
                    tensors[f"{key}.lora_A.weight"] = (torch.randn(rank, k, generator=g) / k**0.5).to(torch.bfloat16)
                    tensors[f"{key}.lora_B.weight"] = (torch.randn(n, rank, generator=g) * 0.01).to(torch.bfloat16)
        path = out / f"adapter-{a}"
        path.mkdir(parents=True, exist_ok=True)
        save_file(tensors, path / "adapter_model.safetensors")
        (path / "adapter_config.json").write_text(json.dumps({
            "peft_type": "LORA", "r": rank, "lora_alpha": 2 * rank, "use_rslora": False,
            "target_modules": [n for names in MODULES.values() for n in names], "bias": "none"}))
        reqs.append(LoRARequest(f"adapter-{a}", a + 1, str(path)))
    return reqs


def offline(llm: LLM, vocab: int, requests: int, loras: list[LoRARequest] | None) -> float:
    g = torch.Generator().manual_seed(7)
    lens = torch.randint(100, 1025, (requests, 2), generator=g).tolist()
    prompts = [{"prompt_token_ids": torch.randint(10, vocab, (p,), generator=g).tolist()} for p, _ in lens]
    params = [SamplingParams(temperature=0, max_tokens=o, ignore_eos=True) for _, o in lens]
    spread = [loras[r % len(loras)] for r in range(requests)] if loras else None
    t = time.perf_counter()
    outs = llm.generate(prompts, params, use_tqdm=False, lora_request=spread)
    return sum(len(o.outputs[0].token_ids) for o in outs) / (time.perf_counter() - t)


def decode_b1(llm: LLM, vocab: int, reps: int, lora: LoRARequest | None) -> float:
    """Batch-1 tok/s: (DECODE - 1) tokens over t(DECODE tokens) - t(1 token), median of reps."""
    def timed(prompts, n):
        params = SamplingParams(temperature=0, max_tokens=n, ignore_eos=True)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        t = time.perf_counter()
        llm.generate(prompts, params, use_tqdm=False, lora_request=lora)
        return time.perf_counter() - t

    timed(_prompts(1, PROMPT, vocab, 99), 8)  # warm (and load the adapter)
    rates = []
    for r in range(reps):
        p = _prompts(1, PROMPT, vocab, r)
        rates.append((DECODE - 1) / (timed(p, DECODE) - timed(p, 1)))
    return statistics.median(rates)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", default="llama-3.1-8b")
    ap.add_argument("--adapters", type=int, default=8)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--offline-requests", type=int, default=1000)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--target", default="cuda")
    ap.add_argument("--work", default="/tmp/kiln-bench")
    ap.add_argument("--out", default="results/cuda-lora.json")
    a = ap.parse_args()
    work = Path(a.work) / a.shape
    ckpt = work / "ckpt"
    if not (ckpt / "config.json").exists():
        synthesize_checkpoint(a.shape, ckpt, torch.bfloat16, a.device)
    cfg = json.loads((ckpt / "config.json").read_text())
    vocab = cfg["vocab_size"]
    loras = write_adapters(cfg, work / "adapters", a.adapters, a.rank)
    kw = dict(target=a.target, dtype="bfloat16", overwrite=True)
    plain = kiln.compile(ckpt, work / "artifact-plain", **kw)
    with_lora = kiln.compile(ckpt, work / f"artifact-lora{a.rank}", max_lora_rank=a.rank, **kw)
    serve = dict(device=a.device, max_model_len=4096, enable_prefix_caching=False)
    report: dict = {"gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
                    "torch": torch.__version__, "kiln": kiln.__version__, "shape": a.shape, "rank": a.rank,
                    "adapters": a.adapters}
    runs = (("base", plain, {}, None, None), ("lora", with_lora, dict(enable_lora=True, max_loras=a.adapters,
                                                                       max_lora_rank=a.rank), loras, loras[0]))
    for name, art, extra, spread, one in runs:
        llm = LLM(art, max_num_seqs=512, max_num_batched_tokens=8192, **serve, **extra)
        report[f"{name}_offline_tok_s"] = offline(llm, vocab, a.offline_requests, spread)
        report[f"{name}_decode_b1_tok_s"] = decode_b1(llm, vocab, a.reps, one)
        del llm
        _free()
    report["offline_ratio"] = report["lora_offline_tok_s"] / report["base_offline_tok_s"]
    report["decode_b1_ratio"] = report["lora_decode_b1_tok_s"] / report["base_decode_b1_tok_s"]
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(report, indent=1))
    print(f"{'':24}{'base':>10}{'multi-LoRA':>12}{'ratio':>8}{'bar':>6}")
    for label, key, bar in (("offline tok/s", "offline", 0.80), ("batch-1 decode tok/s", "decode_b1", 0.85)):
        b, lo = report[f"base_{key}_tok_s"], report[f"lora_{key}_tok_s"]
        print(f"{label:24}{b:10.1f}{lo:12.1f}{lo / b:8.2f}{bar:6.2f}")


if __name__ == "__main__":
    main()
