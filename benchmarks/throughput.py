"""Offline throughput: N requests with random prompt and output lengths through kiln's LLM,
and the same workload through transformers' generate in the same run.

    python benchmarks/throughput.py --model-dir models/demo --num-requests 32

Prints a table and writes JSON (--out). Greedy decoding with ignore_eos, so both sides produce
exactly the requested number of tokens. transformers runs each request alone (batch 1, its
own KV cache): the loop a user writes without a serving engine.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch

import kiln
from kiln import LLM, SamplingParams


def workload(n: int, vocab: int, seed: int, prompt_range: tuple[int, int], out_range: tuple[int, int]):
    g = torch.Generator().manual_seed(seed)
    reqs = []
    for _ in range(n):
        plen = int(torch.randint(prompt_range[0], prompt_range[1] + 1, (1,), generator=g))
        olen = int(torch.randint(out_range[0], out_range[1] + 1, (1,), generator=g))
        reqs.append((torch.randint(3, vocab, (plen,), generator=g).tolist(), olen))
    return reqs


def run_kiln(artifact: Path, reqs, engine_kwargs) -> dict:
    llm = LLM(artifact, **engine_kwargs)
    params = [SamplingParams(temperature=0, max_tokens=o, ignore_eos=True) for _, o in reqs]
    prompts = [{"prompt_token_ids": p} for p, _ in reqs]
    llm.generate(prompts[:2], params[:2], use_tqdm=False)  # warm up
    t = time.perf_counter()
    outs = llm.generate(prompts, params, use_tqdm=False)
    dt = time.perf_counter() - t
    toks = sum(len(o.outputs[0].token_ids) for o in outs)
    return {"seconds": dt, "output_tokens": toks, "output_tok_per_s": toks / dt,
            "stats": llm.engine.scheduler_stats(), "outputs": [o.outputs[0].token_ids for o in outs]}


def run_transformers(model_dir: Path, reqs, dtype: torch.dtype) -> dict:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).eval()
    outs = []
    with torch.no_grad():
        model.generate(torch.tensor([reqs[0][0]]), max_new_tokens=2, do_sample=False)  # warm up
        t = time.perf_counter()
        for p, o in reqs:
            ids = torch.tensor([p])
            gen = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=o, min_new_tokens=o,
                                 do_sample=False, pad_token_id=0)
            outs.append(gen[0, len(p):].tolist())
        dt = time.perf_counter() - t
    toks = sum(len(x) for x in outs)
    return {"seconds": dt, "output_tokens": toks, "output_tok_per_s": toks / dt, "outputs": outs}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model-dir", default="models/demo")
    ap.add_argument("--artifact", default=None, help="reuse a compiled artifact (default: compile into a temp dir)")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--num-requests", type=int, default=32)
    ap.add_argument("--prompt-len", type=int, nargs=2, default=(16, 128))
    ap.add_argument("--output-len", type=int, nargs=2, default=(16, 64))
    ap.add_argument("--max-num-batched-tokens", type=int, default=1024)
    ap.add_argument("--max-num-seqs", type=int, default=32)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    ap.add_argument("--out", default="benchmarks/results/throughput.json")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        artifact = Path(args.artifact) if args.artifact else kiln.compile(args.model_dir, Path(tmp) / "a", dtype=args.dtype)
        vocab = kiln.load_artifact(artifact).vocab_size
        reqs = workload(args.num_requests, vocab, args.seed, tuple(args.prompt_len), tuple(args.output_len))
        k = run_kiln(artifact, reqs, {"max_num_batched_tokens": args.max_num_batched_tokens,
                                      "max_num_seqs": args.max_num_seqs})
    h = run_transformers(Path(args.model_dir), reqs, getattr(torch, args.dtype))
    same = sum(a == b for a, b in zip(k.pop("outputs"), h.pop("outputs"), strict=True))
    rows = [("kiln LLM (reference target)", k), ("transformers generate, batch 1", h)]
    print(f"{args.num_requests} requests, prompts {args.prompt_len}, outputs {args.output_len}, "
          f"{args.dtype}, {torch.get_num_threads()} threads, {platform.processor() or platform.machine()}")
    print(f"{'engine':34s} {'seconds':>8s} {'out tokens':>10s} {'out tok/s':>10s}")
    for name, r in rows:
        print(f"{name:34s} {r['seconds']:8.2f} {r['output_tokens']:10d} {r['output_tok_per_s']:10.1f}")
    print(f"speedup {k['output_tok_per_s'] / h['output_tok_per_s']:.2f}x; identical greedy outputs: {same}/{len(reqs)}")
    result = {"args": vars(args), "kiln": k, "transformers": h, "identical_outputs": same,
              "speedup": k["output_tok_per_s"] / h["output_tok_per_s"],
              "median_prompt_len": statistics.median(len(p) for p, _ in reqs)}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
