"""The cuda target on one GPU, with transformers measured in the same run on the same checkpoint.

    python benchmarks/cuda.py --shapes llama-3.2-1b,llama-3.1-8b --out results/cuda.json

Per shape (random bf16 weights of the real model's shape, synthesized here: kiln.models.shapes):
compile time (kernel build included); cold start (a fresh process: artifact load, graph capture,
first token); decode tok/s at batch 1 / 32 / 256 (128-token prompts; (B * (N - 1)) tokens over
the time between a 1-token and an N-token generation, median of --reps) and batch 1's ratio to
the weight-read limit (weight + KV bytes per step over the copy bandwidth measured in this run);
time to first token of a 2048-token prompt; offline throughput of --offline-requests requests
(prompt and output lengths uniform in 100..1024, ignore EOS) on the shapes named by --offline,
served with up to --offline-max-seqs sequences and --offline-batched-tokens tokens per step.
Each artifact is tuned on this GPU first (`kiln tune`, --tune-budget seconds of search; its
before/after table is printed and kept in the JSON). Peers: transformers eager (batch 1 and 32 decode, 2048-token prefill) and static cache +
torch.compile(mode="reduce-overhead") batch 1 (--peers). Prints a table and writes JSON.
"""

from __future__ import annotations

import argparse
import functools
import gc
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

import kiln
from kiln import LLM, SamplingParams
from kiln.models.shapes import synthesize_checkpoint

sys.path.insert(0, str(Path(__file__).parent))
from cuda_kernels import copy_bandwidth  # noqa: E402

PROMPT = 128
DECODE = 129
BATCHES = (1, 32, 256)


def _prompts(n: int, length: int, vocab: int, seed: int) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    return [{"prompt_token_ids": torch.randint(10, vocab, (length,), generator=g).tolist()} for _ in range(n)]


def _timed(llm: LLM, prompts, max_tokens: int) -> float:
    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    torch.cuda.synchronize()
    t = time.perf_counter()
    llm.generate(prompts, params, use_tqdm=False)
    return time.perf_counter() - t


def decode_rate(gen, batch: int, vocab: int, reps: int) -> float:
    """Decode tok/s at `batch`: (batch * (DECODE - 1)) / (t(DECODE tokens) - t(1 token))."""
    rates = []
    for r in range(reps):
        prompts = _prompts(batch, PROMPT, vocab, seed=r)
        t1 = gen(prompts, 1)
        tn = gen(prompts, DECODE)
        rates.append(batch * (DECODE - 1) / (tn - t1))
    return statistics.median(rates)


_COLD = """
import sys, time, json
t0 = time.perf_counter()
import torch
from kiln import LLM, SamplingParams
t1 = time.perf_counter()
llm = LLM(sys.argv[1], device="cuda", max_model_len=4096)
t2 = time.perf_counter()
llm.generate([{"prompt_token_ids": [11, 12, 13]}], SamplingParams(temperature=0, max_tokens=1), use_tqdm=False)
torch.cuda.synchronize()
t3 = time.perf_counter()
print(json.dumps({"import_s": t1 - t0, "load_s": t2 - t1, "first_token_s": t3 - t2, "load_to_first_token_s": t3 - t1,
                  "graph_capture_s": llm.engine.graphs.capture_seconds, "graphs": len(llm.engine.graphs.graphs)}))
"""


def bench_kiln(art: Path, vocab: int, weight_bytes: int, kv_bytes_per_token: int, bw: float, a) -> dict:
    # From a neutral folder: a checkout's kiln/ in the working directory would shadow the installed kiln.
    cold = subprocess.run([sys.executable, "-c", _COLD, str(art.resolve())], capture_output=True, text=True,
                          cwd=tempfile.gettempdir())
    res: dict = {"cold_start": json.loads(cold.stdout.strip().splitlines()[-1]) if cold.returncode == 0
                 else {"error": cold.stderr[-2000:]}}
    llm = LLM(art, device="cuda", max_model_len=4096, max_num_seqs=256, max_num_batched_tokens=2048,
              enable_prefix_caching=False)
    _timed(llm, _prompts(4, PROMPT, vocab, 99), 8)  # warm
    gen = functools.partial(_timed, llm)
    for b in BATCHES:
        res[f"decode_b{b}_tok_s"] = decode_rate(gen, b, vocab, a.reps)
    ctx = PROMPT + DECODE // 2
    res["weight_read_limit_b1_tok_s"] = bw / (weight_bytes + kv_bytes_per_token * ctx)
    res["b1_fraction_of_limit"] = res["decode_b1_tok_s"] / res["weight_read_limit_b1_tok_s"]
    ttft = [_timed(llm, _prompts(1, 2048, vocab, 1000 + r), 1) for r in range(a.reps + 2)]
    res["ttft_2048_ms"] = 1e3 * statistics.median(ttft[2:])
    if a.profile_dir:
        profile(llm, vocab, Path(a.profile_dir) / a.shape)
    del gen, llm
    _free()
    if a.offline_requests and a.shape in a.offline:
        res["offline"] = offline_throughput(art, vocab, a.offline_requests, a.offline_max_seqs,
                                            a.offline_batched_tokens)
    return res


def offline_throughput(art: Path, vocab: int, requests: int, max_seqs: int, batched_tokens: int) -> dict:
    """Output tok/s of `requests` requests through LLM.generate (prompt and output lengths uniform
    in 100..1024, ignore EOS), served with up to max_seqs sequences and batched_tokens tokens a
    step (vLLM's offline defaults on an H200 class GPU schedule more than the decode runs)."""
    llm = LLM(art, device="cuda", max_model_len=4096, max_num_seqs=max_seqs, max_num_batched_tokens=batched_tokens,
              enable_prefix_caching=False)
    g = torch.Generator().manual_seed(7)
    lens = torch.randint(100, 1025, (requests, 2), generator=g).tolist()
    prompts = [{"prompt_token_ids": torch.randint(10, vocab, (p,), generator=g).tolist()} for p, _ in lens]
    params = [SamplingParams(temperature=0, max_tokens=o, ignore_eos=True) for _, o in lens]
    t = time.perf_counter()
    outs = llm.generate(prompts, params, use_tqdm=False)
    dt = time.perf_counter() - t
    toks = sum(len(o.outputs[0].token_ids) for o in outs)
    del llm
    _free()
    return {"requests": requests, "output_tokens": toks, "seconds": dt, "output_tok_s": toks / dt,
            "max_num_seqs": max_seqs, "max_num_batched_tokens": batched_tokens}


def profile(llm: LLM, vocab: int, out: Path) -> None:
    """Per-kernel GPU time of 32 batch-1 decode steps and of one 2048-token prefill (tables), and
    the host's Python profile of that prefill's generate call (where time to first token goes
    besides the GPU's)."""
    import cProfile
    import io
    import pstats

    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    out.mkdir(parents=True, exist_ok=True)
    prof = cProfile.Profile()
    prompts = _prompts(1, 2048, vocab, 7)
    prof.enable()
    _timed(llm, prompts, 1)
    prof.disable()
    text = io.StringIO()
    pstats.Stats(prof, stream=text).sort_stats("cumulative").print_stats(45)
    (out / "prefill_2048_host.txt").write_text(text.getvalue())
    for name, prompts, n in (("decode_b1", _prompts(1, PROMPT, vocab, 5), 33), ("prefill_2048", _prompts(1, 2048, vocab, 6), 1)):
        with torch_profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            _timed(llm, prompts, n)
        (out / f"{name}.txt").write_text(prof.key_averages().table(sort_by="self_device_time_total", row_limit=40))


def bench_transformers(ckpt: Path, vocab: int, a) -> dict:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.bfloat16, device_map="cuda").eval()

    def gen(prompts, n, **kw):
        ids = torch.tensor([p["prompt_token_ids"] for p in prompts], device="cuda")
        torch.cuda.synchronize()
        t = time.perf_counter()
        with torch.no_grad():
            model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                           do_sample=False, pad_token_id=0, **kw)
        torch.cuda.synchronize()
        return time.perf_counter() - t

    res: dict = {}
    gen(_prompts(1, PROMPT, vocab, 99), 4)
    res["eager_decode_b1_tok_s"] = decode_rate(gen, 1, vocab, a.reps)
    res["eager_decode_b32_tok_s"] = decode_rate(gen, 32, vocab, a.reps)
    ttft = [gen(_prompts(1, 2048, vocab, 1000 + r), 1) for r in range(a.reps + 2)]
    res["eager_ttft_2048_ms"] = 1e3 * statistics.median(ttft[2:])
    if "compile" in a.peers:
        # generate compiles the decode forward itself for a static cache (CompileConfig's default:
        # mode="reduce-overhead", fullgraph=True); wrapping forward too would clash with its graphs.
        model.generation_config.cache_implementation = "static"
        t = time.perf_counter()
        for _ in range(3):
            gen(_prompts(1, PROMPT, vocab, 98), DECODE)
        res["compile_warmup_s"] = time.perf_counter() - t
        res["compiled_decode_b1_tok_s"] = decode_rate(gen, 1, vocab, a.reps)
    return res


def _free() -> None:
    gc.collect()
    torch.cuda.empty_cache()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", default="llama-3.2-1b,llama-3.1-8b")
    ap.add_argument("--work", default="/tmp/kiln-bench", help="checkpoints and artifacts go here")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--offline", default="llama-3.1-8b", help="shapes that run the offline throughput workload")
    ap.add_argument("--offline-requests", type=int, default=1000)
    ap.add_argument("--offline-max-seqs", type=int, default=512)
    ap.add_argument("--offline-batched-tokens", type=int, default=8192)
    ap.add_argument("--tune-budget", type=float, default=120.0,
                    help="seconds of `kiln tune` search on each artifact before measuring (0: untuned)")
    ap.add_argument("--peers", default="eager,compile", help="transformers peers: eager, compile, or none")
    ap.add_argument("--out", default="results/cuda.json")
    ap.add_argument("--profile-dir", help="write per-kernel profiler tables here")
    a = ap.parse_args()
    work = Path(a.work)
    bw = copy_bandwidth()
    report: dict = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "kiln": kiln.__version__,
                    "copy_bandwidth_GBps": bw / 1e9, "shapes": {}}
    print(f"{report['gpu']}: copy {bw / 1e12:.2f} TB/s (read + write)", flush=True)
    for shape in a.shapes.split(","):
        a.shape = shape
        ckpt, art, row = build_artifact(shape, work, a.tune_budget)
        manifest = json.loads((art / "manifest.json").read_text())
        cfg = json.loads((ckpt / "config.json").read_text())
        vocab = cfg["vocab_size"]
        kv = 2 * cfg["num_hidden_layers"] * cfg["num_key_value_heads"] * cfg["head_dim"] * 2
        row["weight_bytes"] = manifest["parameters"]["bytes"]
        row["weight_bytes_read_per_step"] = _bytes_read_per_step(cfg)
        row["kiln"] = bench_kiln(art, vocab, row["weight_bytes_read_per_step"], kv, bw, a)
        report["shapes"][shape] = row
        _write(report, a.out)  # kept if a later stage fails or runs out of time
        _free()
        if a.peers != "none":
            row["transformers"] = bench_transformers(ckpt, vocab, a)
            _write(report, a.out)
            _free()
    print(_table(report))


def build_artifact(shape: str, work: Path, tune_budget: float, quantize: str | None = None) -> tuple[Path, Path, dict]:
    """(checkpoint, artifact, {compile_s, tune_s, tune_table}) of `shape` under `work`: the
    checkpoint synthesized once, compiled for cuda in bf16 (quantized: compile-model --quantize),
    then tuned for tune_budget seconds (0: untuned; the before/after table is printed)."""
    ckpt, art = work / shape / "ckpt", work / shape / f"artifact-{quantize or 'bf16'}"
    if not (ckpt / "config.json").exists():
        synthesize_checkpoint(shape, ckpt, torch.bfloat16, "cuda")
    t = time.perf_counter()
    kiln.compile(ckpt, art, target="cuda", dtype="bfloat16", overwrite=True, quantize=quantize)
    row: dict = {"compile_s": time.perf_counter() - t}
    if tune_budget > 0:
        from kiln.codegen.cuda.tune import tune

        t = time.perf_counter()
        tuned = tune(art, budget=tune_budget)
        row["tune_s"] = time.perf_counter() - t
        row["tune_table"] = tuned["table"]
        print(tuned["table"], flush=True)
    return ckpt, art, row


def _write(report: dict, out: str) -> None:
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(json.dumps(report, indent=1))
    print(json.dumps(report["shapes"], indent=1), flush=True)


def _bytes_read_per_step(cfg: dict) -> int:
    """bf16 weight bytes a decode step reads: every layer, the final norm and the LM head (the
    embedding table is gathered one row per token; a tied model's LM head is that table)."""
    h, i, d = cfg["hidden_size"], cfg["intermediate_size"], cfg["head_dim"]
    attn = h * d * (2 * cfg["num_attention_heads"] + 2 * cfg["num_key_value_heads"])
    layer = attn + 3 * h * i + 2 * h
    return 2 * (cfg["num_hidden_layers"] * layer + h + cfg["vocab_size"] * h)


def _table(report: dict) -> str:
    lines = [f"{'shape':14} {'metric':34} {'kiln':>10} {'hf eager':>10} {'hf compile':>10}"]
    for shape, row in report["shapes"].items():
        k, h = row["kiln"], row.get("transformers", {})
        rows = [
            ("decode b1 tok/s", k["decode_b1_tok_s"], h.get("eager_decode_b1_tok_s"), h.get("compiled_decode_b1_tok_s")),
            ("b1 weight-read limit tok/s", k["weight_read_limit_b1_tok_s"], None, None),
            ("decode b32 tok/s", k["decode_b32_tok_s"], h.get("eager_decode_b32_tok_s"), None),
            ("decode b256 tok/s", k["decode_b256_tok_s"], None, None),
            ("TTFT 2048 ms", k["ttft_2048_ms"], h.get("eager_ttft_2048_ms"), None),
            ("offline output tok/s", k.get("offline", {}).get("output_tok_s"), None, None),
            ("cold start to first token s", k["cold_start"].get("load_to_first_token_s"), None, None),
            ("compile s", row["compile_s"], None, None),
            ("kiln tune s", row.get("tune_s"), None, None),
        ]
        for name, *vals in rows:
            cells = [f"{v:10.1f}" if isinstance(v, float | int) else f"{'-':>10}" for v in vals]
            lines.append(f"{shape:14} {name:34} {' '.join(cells)}")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
