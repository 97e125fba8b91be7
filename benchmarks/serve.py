"""Online serving benchmark: replay N streaming completion requests against a running
OpenAI-compatible server, at a Poisson request rate or a fixed concurrency, and report TTFT,
TPOT, ITL and end-to-end latency (mean, p50, p90, p99) with request and token throughput.

    kiln serve artifacts/demo --port 8000 &
    python benchmarks/serve.py --base-url http://127.0.0.1:8000 --num-requests 200 --request-rate 20
    python benchmarks/serve.py --num-requests 200 --concurrency 16 --compare-offline artifacts/demo

Prompts are windows of exact token length cut from a tokenized text (the server's /tokenize);
outputs have exact lengths (ignore_eos), so every run of a workload does the same work. The
peer, with --compare-offline ARTIFACT, is the same workload through kiln's offline
`LLM.generate` in this process (no HTTP, no event loop): the ceiling the server approaches.
Prints a table and writes JSON (--out). Metrics follow vLLM's benchmark_serving: TTFT is the
time to the first streamed token, TPOT = (e2e - TTFT) / (output tokens - 1) per request, ITL
the gaps between streamed chunks.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import random
import statistics
import time
import urllib.request
from dataclasses import asdict, dataclass, field
from pathlib import Path

from openai import AsyncOpenAI

TEXT = (
    "The compiler traces a decoder into a small graph, fuses what matters for serving, lowers every op to a "
    "kernel and writes an artifact that starts in seconds. A runtime pages the key-value cache in blocks, "
    "batches requests continuously, samples tokens and streams them to many clients at once. "
)


@dataclass
class Result:
    """One request as the client saw it."""

    ok: bool = False
    prompt_tokens: int = 0
    output_tokens: int = 0
    ttft: float = 0.0
    e2e: float = 0.0
    itl: list[float] = field(default_factory=list)
    error: str = ""


def make_workload(base_url: str, n: int, prompt_len: tuple[int, int], output_len: tuple[int, int], seed: int,
                  api_key: str) -> list[tuple[list[int], int]]:
    """n (prompt token ids, output length) pairs with lengths drawn uniformly from the ranges."""
    body = json.dumps({"prompt": TEXT * 8, "add_special_tokens": False}).encode()
    req = urllib.request.Request(f"{base_url}/tokenize", data=body, headers={
        "Content-Type": "application/json", "Authorization": f"Bearer {api_key}"})
    with urllib.request.urlopen(req, timeout=30) as r:
        corpus = json.loads(r.read())["tokens"]
    rng = random.Random(seed)
    reqs = []
    for _ in range(n):
        plen = rng.randint(*prompt_len)
        start = rng.randrange(len(corpus))
        prompt = [corpus[(start + i) % len(corpus)] for i in range(plen)]
        reqs.append((prompt, rng.randint(*output_len)))
    return reqs


async def one_request(client: AsyncOpenAI, model: str, prompt: list[int], max_tokens: int) -> Result:
    res = Result(prompt_tokens=len(prompt))
    start = time.perf_counter()
    last = None
    try:
        stream = await client.completions.create(
            model=model, prompt=prompt, max_tokens=max_tokens, temperature=0, stream=True,
            stream_options={"include_usage": True}, extra_body={"ignore_eos": True})
        async for chunk in stream:
            now = time.perf_counter()
            if chunk.usage is not None:
                res.output_tokens = chunk.usage.completion_tokens
            if not chunk.choices or not chunk.choices[0].text:
                continue
            if last is None:
                res.ttft = now - start
            else:
                res.itl.append(now - last)
            last = now
        res.e2e = time.perf_counter() - start
        res.ok = res.output_tokens == max_tokens
        if not res.ok:
            res.error = f"got {res.output_tokens} tokens, asked {max_tokens}"
    except Exception as e:  # a failed request is counted, not fatal
        res.error = f"{type(e).__name__}: {e}"
    return res


async def run(args: argparse.Namespace, reqs: list[tuple[list[int], int]]) -> tuple[list[Result], float]:
    client = AsyncOpenAI(base_url=f"{args.base_url}/v1", api_key=args.api_key, max_retries=0, timeout=600)
    model = args.model or (await client.models.list()).data[0].id
    await one_request(client, model, reqs[0][0], 4)  # warm up the connection and the server
    limit = asyncio.Semaphore(args.concurrency or len(reqs))
    rng = random.Random(args.seed + 1)

    async def limited(prompt: list[int], out: int) -> Result:
        async with limit:
            return await one_request(client, model, prompt, out)

    tasks = []
    start = time.perf_counter()
    for prompt, out in reqs:
        tasks.append(asyncio.create_task(limited(prompt, out)))
        if args.request_rate != float("inf"):
            await asyncio.sleep(rng.expovariate(args.request_rate))  # Poisson arrivals
    results = await asyncio.gather(*tasks)
    duration = time.perf_counter() - start
    await client.close()
    return results, duration


def offline_peer(artifact: str, reqs: list[tuple[list[int], int]], engine_kwargs: dict,
                 threads: int | None) -> dict:
    import torch

    from kiln import LLM, SamplingParams

    if threads:
        torch.set_num_threads(threads)

    llm = LLM(artifact, **engine_kwargs)
    params = [SamplingParams(temperature=0, max_tokens=o, ignore_eos=True) for _, o in reqs]
    prompts = [{"prompt_token_ids": p} for p, _ in reqs]
    llm.generate(prompts[:2], params[:2], use_tqdm=False)  # warm up
    t = time.perf_counter()
    outs = llm.generate(prompts, params, use_tqdm=False)
    dt = time.perf_counter() - t
    toks = sum(len(o.outputs[0].token_ids) for o in outs)
    return {"seconds": dt, "output_tokens": toks, "output_tok_per_s": toks / dt, "req_per_s": len(reqs) / dt,
            "threads": torch.get_num_threads()}


def _stats(values: list[float]) -> dict[str, float]:
    if not values:
        return {"mean": float("nan"), "p50": float("nan"), "p90": float("nan"), "p99": float("nan")}
    q = statistics.quantiles(values, n=100, method="inclusive") if len(values) > 1 else values * 99
    return {"mean": statistics.fmean(values), "p50": q[49], "p90": q[89], "p99": q[98]}


def summarize(results: list[Result], duration: float) -> dict:
    ok = [r for r in results if r.ok]
    out_tokens = sum(r.output_tokens for r in ok)
    tpot = [(r.e2e - r.ttft) / (r.output_tokens - 1) for r in ok if r.output_tokens > 1]
    return {
        "completed": len(ok), "failed": len(results) - len(ok), "duration_s": duration,
        "request_throughput": len(ok) / duration, "output_token_throughput": out_tokens / duration,
        "total_token_throughput": (out_tokens + sum(r.prompt_tokens for r in ok)) / duration,
        "prompt_tokens": sum(r.prompt_tokens for r in ok), "output_tokens": out_tokens,
        "ttft_ms": {k: v * 1e3 for k, v in _stats([r.ttft for r in ok]).items()},
        "tpot_ms": {k: v * 1e3 for k, v in _stats(tpot).items()},
        "itl_ms": {k: v * 1e3 for k, v in _stats([x for r in ok for x in r.itl]).items()},
        "e2e_ms": {k: v * 1e3 for k, v in _stats([r.e2e for r in ok]).items()},
        "errors": sorted({r.error for r in results if r.error})[:5],
    }


def print_table(s: dict, args: argparse.Namespace, peer: dict | None) -> None:
    mode = f"concurrency {args.concurrency}" if args.concurrency else f"rate {args.request_rate} req/s"
    print(f"{args.num_requests} requests ({mode}), prompts {args.prompt_len}, outputs {args.output_len}, "
          f"client on {platform.processor() or platform.machine()}")
    print(f"completed {s['completed']}, failed {s['failed']}, in {s['duration_s']:.2f} s")
    print(f"request throughput      {s['request_throughput']:10.2f} req/s")
    print(f"output token throughput {s['output_token_throughput']:10.1f} tok/s")
    print(f"total token throughput  {s['total_token_throughput']:10.1f} tok/s")
    print(f"{'latency (ms)':14s} {'mean':>9s} {'p50':>9s} {'p90':>9s} {'p99':>9s}")
    for name in ("ttft", "tpot", "itl", "e2e"):
        v = s[f"{name}_ms"]
        print(f"{name.upper():14s} {v['mean']:9.2f} {v['p50']:9.2f} {v['p90']:9.2f} {v['p99']:9.2f}")
    if peer:
        print(f"offline LLM.generate (peer, {peer['threads']} threads): {peer['output_tok_per_s']:.1f} output tok/s, "
              f"{peer['req_per_s']:.2f} req/s; server reaches "
              f"{s['output_token_throughput'] / peer['output_tok_per_s']:.0%} of it")
    for e in s["errors"]:
        print("error:", e)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base-url", default="http://127.0.0.1:8000")
    ap.add_argument("--model", default=None, help="default: the first model of /v1/models")
    ap.add_argument("--api-key", default="none")
    ap.add_argument("--num-requests", type=int, default=100)
    ap.add_argument("--request-rate", type=float, default=float("inf"),
                    help="Poisson arrival rate in requests/s (default inf: all at once)")
    ap.add_argument("--concurrency", type=int, default=None, help="at most this many requests in flight")
    ap.add_argument("--prompt-len", type=int, nargs=2, default=(16, 128))
    ap.add_argument("--output-len", type=int, nargs=2, default=(16, 64))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--compare-offline", metavar="ARTIFACT", default=None,
                    help="also run the workload through LLM.generate on this artifact (same machine)")
    ap.add_argument("--peer-num-kv-blocks", type=int, default=None,
                    help="KV cache size of the offline peer (match the server's --num-kv-blocks)")
    ap.add_argument("--peer-threads", type=int, default=None,
                    help="torch threads of the offline peer (match the server's OMP_NUM_THREADS)")
    ap.add_argument("--out", default="benchmarks/results/serve.json")
    args = ap.parse_args()
    reqs = make_workload(args.base_url, args.num_requests, tuple(args.prompt_len), tuple(args.output_len),
                         args.seed, args.api_key)
    results, duration = asyncio.run(run(args, reqs))
    summary = summarize(results, duration)
    peer = None
    if args.compare_offline:
        kw = {"num_kv_blocks": args.peer_num_kv_blocks} if args.peer_num_kv_blocks else {}
        peer = offline_peer(args.compare_offline, reqs, kw, args.peer_threads)
    print_table(summary, args, peer)
    out = {"args": {k: (str(v) if isinstance(v, float) else v) for k, v in vars(args).items()},
           "summary": summary, "offline_peer": peer, "requests": [asdict(r) for r in results]}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1, default=str))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
