"""Host overhead of the runtime, now and at an earlier commit, in the same run.

    python benchmarks/host_overhead.py                  # vs. 6bedeba (before issue 8)
    python benchmarks/host_overhead.py --before HEAD~3

(a) Host time per engine step (scheduling, input building, output processing): the model call
returns a preallocated logits tensor and the sampler returns fixed tokens, nothing else is
subtracted; 1, 64 and 256 running decode sequences of --context-token contexts, median step.
(b) The sampler's time per step for --rows rows of a --vocab vocabulary (random logits):
greedy, and temperature 0.8 with top-p 0.9 on N(0, 1) logits (flat: top-p keeps most of the
vocabulary) and on N(0, 5^2) logits (peaked, as trained models' are), median.

The earlier commit is checked out into a temporary git worktree and measured in a subprocess
whose PYTHONPATH maps its folders to kiln.* (pyproject's package-dir); the current tree is
measured the same way. The measurement handles both the old API (build_step_inputs,
SamplingState with output lists) and the new one: it only uses LLMEngine, Sampler and
SamplingState(params, prompt_token_ids). Prints a table and writes JSON (--out).

(c) With --decode-shapes (a GPU, the current tree only): wall time per decode step of a real
model with async scheduling off and on, batch 1 and 32 (--decode-batches), 128-token prompts,
greedy; steps overlap when async, so the time is the whole run's over its steps.

    python benchmarks/host_overhead.py --decode-shapes llama-3.2-1b,llama-3.1-8b
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


# -- the measurement (runs in a subprocess against one tree) ---------------------------------------


def _host_step_ms(artifact: str, num_seqs: int, context: int, steps: int) -> float:
    import torch

    from kiln.runtime.engine import LLMEngine
    from kiln.runtime.sampler import SampleResult
    from kiln.runtime.sampling_params import SamplingParams

    # Requests admitted first decode while later ones prefill: leave room for that too.
    max_len = context + num_seqs * context // 2048 + num_seqs + steps + 64
    eng = LLMEngine(artifact, max_num_batched_tokens=2048, max_num_seqs=max(num_seqs, 1), block_size=16,
                    num_kv_blocks=num_seqs * -(-max_len // 16), max_model_len=max_len, enable_prefix_caching=True)
    logits = torch.zeros(max(num_seqs, 2048), eng.model.vocab_size)  # [rows, V], returned every step
    # the name as a literal: the old tree has no kiln.ir.step_inputs
    eng.model.executor.run = lambda inputs: [logits[: len(inputs["logits_indices"])]]
    eng.sampler = _FakeSampler(SampleResult)
    g = torch.Generator().manual_seed(0)
    params = SamplingParams(temperature=0, max_tokens=10 * (context + steps), ignore_eos=True)
    for i in range(num_seqs):
        ids = torch.randint(3, eng.model.vocab_size, (context,), generator=g).tolist()
        eng.add_request(str(i), {"prompt_token_ids": ids}, params)
    while len(eng.scheduler.running) < num_seqs or eng.scheduler.waiting or any(
            r.num_computed_tokens < r.num_tokens - 1 for r in eng.scheduler.running):
        eng.step()  # prefill (the fake model makes it cheap)
        if len(eng.scheduler.running) + len(eng.scheduler.waiting) < num_seqs:
            raise RuntimeError("a request finished before the measurement")
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        eng.step()
        times.append(time.perf_counter() - t)
    if len(eng.scheduler.running) < num_seqs:
        raise RuntimeError("a request finished during the measurement")
    return statistics.median(times) * 1e3


class _FakeSampler:
    """Token 5 for every row, as the old API (a call) and the new one (launch -> pending)."""

    def __init__(self, result_type):
        self.result_type = result_type

    def __call__(self, logits, states):
        return self.result_type([5] * len(states), [None] * len(states))

    def launch(self, logits, states):
        import torch

        tokens = torch.full((len(states),), 5, dtype=torch.int64, device=logits.device)
        return _FakePending(tokens, self(logits, states))

    def release(self, state) -> None:
        pass


class _FakePending:
    def __init__(self, tokens, result):
        self.tokens, self._result = tokens, result

    def result(self):
        return self._result


def _decode_step_ms(artifact: str, batch: int, steps: int, async_on: bool) -> float:
    """Wall ms per greedy decode step of `batch` 128-token prompts on CUDA (after prefill)."""
    import torch

    from kiln.runtime.engine import LLMEngine
    from kiln.runtime.sampling_params import SamplingParams

    eng = LLMEngine(artifact, device="cuda", max_num_seqs=max(batch, 1), max_model_len=128 + steps + 64,
                    async_scheduling=async_on)
    g = torch.Generator().manual_seed(0)
    params = SamplingParams(temperature=0, max_tokens=steps + 32, ignore_eos=True)
    for i in range(batch):
        eng.add_request(str(i), {"prompt_token_ids": torch.randint(3, eng.model.vocab_size, (128,),
                                                                   generator=g).tolist()}, params)
    for _ in range(8):  # prefill and a few decodes
        eng.step()
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(steps):
        eng.step()
    torch.cuda.synchronize()
    ms = (time.perf_counter() - t) / steps * 1e3
    if len(eng.scheduler.running) < batch:
        raise RuntimeError("a request finished during the measurement")
    del eng
    torch.cuda.empty_cache()
    return ms


def _decode_main(args: argparse.Namespace) -> None:
    """(c): per shape and batch, ms per decode step with async scheduling off and on."""
    import torch
    from cuda_timeline import shape_artifact

    res: dict = {"gpu": torch.cuda.get_device_name(), "shapes": {}}
    print(f"{'ms per decode step':<40}{'sync':>10}{'async':>10}{'speedup':>10}")
    for shape in args.decode_shapes.split(","):
        _, art = shape_artifact(shape, args.work)
        for b in args.decode_batches:
            sync, on = (_decode_step_ms(str(art), b, args.steps, a) for a in (False, True))
            res["shapes"].setdefault(shape, {})[str(b)] = {"sync_ms": sync, "async_ms": on}
            print(f"{shape + ', batch ' + str(b):<40}{sync:>10.3f}{on:>10.3f}{sync / on:>9.2f}x", flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(res, indent=2))
    print(f"wrote {args.out}")


def _sampler_ms(rows: int, vocab: int, reps: int) -> dict[str, float]:
    import torch

    from kiln.runtime.sampler import Sampler, SamplingState
    from kiln.runtime.sampling_params import SamplingParams

    g = torch.Generator().manual_seed(0)
    flat = torch.randn(rows, vocab, generator=g)  # [rows, V]
    cases = {"greedy": (flat, SamplingParams(temperature=0)),
             "top_p0.9_flat": (flat, SamplingParams(temperature=0.8, top_p=0.9)),
             "top_p0.9_peaked": (flat * 5, SamplingParams(temperature=0.8, top_p=0.9))}
    out = {}
    for name, (logits, params) in cases.items():
        sampler = Sampler()
        states = [SamplingState(params, [1, 2, 3]) for _ in range(rows)]
        sampler(logits, states)  # warm up
        times = []
        for _ in range(reps):
            t = time.perf_counter()
            sampler(logits, states)
            times.append(time.perf_counter() - t)
        out[name] = statistics.median(times) * 1e3
    return out


def _worker(args: argparse.Namespace) -> None:
    import torch

    torch.set_num_threads(args.threads) if args.threads else None
    res = {"host_step_ms": {str(n): _host_step_ms(args.artifact, n, args.context_tokens, args.steps)
                            for n in args.seqs},
           "sampler_ms": _sampler_ms(args.rows, args.vocab, args.reps)}
    Path(args.worker).write_text(json.dumps(res))


# -- the driver ----------------------------------------------------------------------------------


def _package_tree(src: Path, dst: Path) -> Path:
    """A folder holding kiln/ whose subpackages link to src's folders, as pyproject maps them."""
    dirs = tomllib.loads((src / "pyproject.toml").read_text())["tool"]["setuptools"]["package-dir"]
    pkg = dst / "kiln"
    pkg.mkdir(parents=True)
    for f in (src / dirs["kiln"]).iterdir():
        (pkg / f.name).symlink_to(f)
    for name, folder in dirs.items():
        if name != "kiln":
            link = pkg / name.removeprefix("kiln.")
            if link.is_symlink():
                link.unlink()
            link.symlink_to(src / folder)
    return dst


def _measure(tree: Path, tmp: Path, label: str, args: argparse.Namespace) -> dict:
    """Compile the demo model with tree's code and run the worker there."""
    path = _package_tree(tree, tmp / f"pkg-{label}")
    env = {**os.environ, "PYTHONPATH": str(path)}
    artifact = tmp / f"artifact-{label}"
    # The demo model's config allows 256 positions; the measurement holds 1,000-token contexts,
    # so compile a copy whose position tables reach far enough (the fake model never reads them).
    model = tmp / f"model-{label}"
    shutil.copytree(tree / args.model_dir, model, dirs_exist_ok=True)
    config = json.loads((model / "config.json").read_text())
    config["max_position_embeddings"] = max(config.get("max_position_embeddings", 0), 8192)
    (model / "config.json").write_text(json.dumps(config))
    compile_cmd = ("import sys; from kiln.cli import compile_model_main; "
                   f"sys.argv = ['compile-model', {str(model)!r}, '-o', {str(artifact)!r}, '--force']; "
                   "sys.exit(compile_model_main())")
    subprocess.run([sys.executable, "-c", compile_cmd], env=env, check=True, cwd=tmp, stdout=subprocess.DEVNULL)
    out = tmp / f"result-{label}.json"
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", str(out), "--artifact", str(artifact),
           "--context-tokens", str(args.context_tokens), "--steps", str(args.steps), "--rows", str(args.rows),
           "--vocab", str(args.vocab), "--reps", str(args.reps), "--seqs", *map(str, args.seqs)]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    subprocess.run(cmd, env=env, check=True, cwd=tmp)
    return json.loads(out.read_text())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--before", default="6bedeba", help="the commit to compare with")
    ap.add_argument("--model-dir", default="models/demo")
    ap.add_argument("--seqs", type=int, nargs="+", default=[1, 64, 256])
    ap.add_argument("--context-tokens", type=int, default=1000)
    ap.add_argument("--steps", type=int, default=50, help="decode steps timed per batch size")
    ap.add_argument("--rows", type=int, default=256)
    ap.add_argument("--vocab", type=int, default=128_000)
    ap.add_argument("--reps", type=int, default=5, help="timed sampler calls per case")
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    ap.add_argument("--out", default="benchmarks/results/host_overhead.json")
    ap.add_argument("--decode-shapes", default=None, help="(c) only: shapes to time decode steps of, on a GPU")
    ap.add_argument("--decode-batches", type=int, nargs="+", default=[1, 32])
    ap.add_argument("--work", default="/tmp/kiln-bench", help="(c): checkpoints and artifacts go here")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--artifact", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        _worker(args)
        return
    if args.decode_shapes:
        if args.out == ap.get_default("out"):
            args.out = "benchmarks/results/async_scheduling.json"
        _decode_main(args)
        return
    with tempfile.TemporaryDirectory(prefix="kiln-host-") as d:
        tmp = Path(d)
        wt = tmp / "before"
        subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(wt), args.before],
                       check=True, capture_output=True)
        try:
            before = _measure(wt, tmp, "before", args)
        finally:
            subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(wt)], check=False)
        after = _measure(ROOT, tmp, "after", args)
    rows = [(f"host step, {n} decodes of {args.context_tokens} tokens", "host_step_ms", str(n)) for n in args.seqs]
    rows += [(f"sampler {args.rows}x{args.vocab}, {case}", "sampler_ms", case) for case in before["sampler_ms"]]
    print(f"{'ms (median)':<48}{'before ' + args.before:>18}{'after':>12}{'speedup':>10}")
    for label, kind, key in rows:
        b, a = before[kind][key], after[kind][key]
        print(f"{label:<48}{b:>18.3f}{a:>12.3f}{b / a:>9.1f}x")
    result = {"before_ref": args.before, "before": before, "after": after, "args": vars(args),
              "machine": {"platform": platform.platform(), "cpus": os.cpu_count()}}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
