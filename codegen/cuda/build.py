"""Building a cuda artifact's Triton kernels on the GPU that will serve it.

A child process loads the artifact with the engine's own limits (so it captures the same decode
CUDA graphs a server would), then serves a warm-up set of requests: prompts of lengths that
exercise every launch path (decode buckets, short and long prefills, chunked prefill mixed with
decodes) under each kind of sampling. Triton's cache manager in the child records every kernel
variant it looks up (compiling into the machine's Triton cache what is not there yet, so a
rebuild is fast) and reports its progress, which the parent shows as a bar; the parent stores exactly those cache entries under kernels/triton/ with
kernels/triton.json (the GPU and versions they are for), listed and hashed in the manifest.

    python -m kiln.codegen.cuda.build ARTIFACT [--max-num-seqs N] [--max-num-batched-tokens N]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from tqdm.auto import tqdm
from triton.runtime.cache import FileCacheManager

import kiln
from kiln.codegen.artifact_writer import replace_files
from kiln.errors import KilnError
from kiln.runtime.kernel_binaries import BINARIES, BUILD_INFO

PROGRESS = "KILN_BUILD_PROGRESS"
"""The child's stderr lines that report progress ("KILN_BUILD_PROGRESS done total")."""
SKIP = ("lock",)
"""Cache files that are Triton's bookkeeping, not kernels."""
RECORD_ENV = "KILN_KERNEL_RECORD"
MODULE = "kiln.codegen.cuda.build"


class RecordingCache(FileCacheManager):
    """Triton's file cache, noting each kernel key it is asked for in the file $KILN_KERNEL_RECORD."""

    def __init__(self, key, override=False, dump=False):
        super().__init__(key, override, dump)
        if not (override or dump):
            with open(os.environ[RECORD_ENV], "a") as f:
                f.write(key + "\n")


def build_kernels(artifact: str | Path, max_num_seqs: int = 256, max_num_batched_tokens: int = 2048) -> dict:
    """Compile every kernel the artifact's plan launches on this machine's GPU and store them in
    the artifact; returns the build record written to kernels/triton.json."""
    root = Path(artifact).resolve()
    started = time.perf_counter()
    with tempfile.NamedTemporaryFile(prefix="kiln-kernels-", suffix=".txt") as record_file:
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        env[RECORD_ENV] = record_file.name
        env["TRITON_CACHE_MANAGER"] = f"{MODULE}:RecordingCache"
        cmd = [sys.executable, "-m", MODULE, str(root), "--max-num-seqs", str(max_num_seqs),
               "--max-num-batched-tokens", str(max_num_batched_tokens), "--child"]
        # From a neutral folder: a checkout's own kiln/ in the working directory must not shadow the installed one.
        stdout, stderr, code = _run_child(cmd, env)
        if code != 0:
            raise KilnError(f"building the cuda kernels of '{root}' failed:\n{stderr[-4000:]}")
        record = json.loads(stdout.strip().splitlines()[-1])
        keys = sorted(set(Path(record_file.name).read_text().split()))
    cache = Path(record.pop("cache_dir"))
    files: dict[str, bytes] = {}
    for key in keys:
        for f in sorted((cache / key).iterdir()):
            if f.is_file() and f.name not in SKIP:
                files[f"{BINARIES}/{key}/{f.name}"] = f.read_bytes()
    record |= {"kiln": kiln.__version__, "variants": len(keys), "build_seconds": round(time.perf_counter() - started, 2)}
    files[BUILD_INFO] = json.dumps(record, indent=1).encode()
    replace_files(root, files, (BINARIES, BUILD_INFO))
    return record


def _run_child(cmd: list[str], env: dict[str, str]) -> tuple[str, str, int]:
    """Run the warm-up child, showing its progress lines (PROGRESS done total) as a bar; returns
    (stdout, the rest of stderr, exit code)."""
    with subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                          cwd=tempfile.gettempdir()) as child, \
            tqdm(desc="build cuda kernels", unit="step", disable=None) as bar:
        out: list[str] = []
        reader = threading.Thread(target=lambda: out.append(child.stdout.read()), daemon=True)
        reader.start()
        err: list[str] = []
        for line in child.stderr:
            if line.startswith(PROGRESS):
                done, total = map(int, line.split()[1:3])
                bar.total = total
                bar.update(done - bar.n)
            else:
                err.append(line)
        child.wait()
        reader.join()
    return "".join(out), "".join(err), child.returncode


def _progress(done: int, total: int) -> None:
    print(f"{PROGRESS} {done} {total}", file=sys.stderr, flush=True)


def _warm_up(artifact: str, max_num_seqs: int, max_num_batched_tokens: int) -> dict:
    import torch

    from kiln.runtime import kernel_binaries
    from kiln.runtime.engine import LLMEngine
    from kiln.runtime.sampling_params import SamplingParams

    kernel_binaries.BUILDING = True
    device = torch.device("cuda")
    engine = LLMEngine(artifact, device="cuda", max_num_seqs=max_num_seqs,
                       max_num_batched_tokens=max_num_batched_tokens)  # compiles and captures the decode graphs
    vocab = engine.model.vocab_size
    kinds = [
        SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True),
        SamplingParams(max_tokens=4, temperature=0.8, seed=0, ignore_eos=True),
        SamplingParams(max_tokens=4, temperature=0.8, top_k=20, top_p=0.9, min_p=0.05, seed=1, ignore_eos=True),
        SamplingParams(max_tokens=4, temperature=1.0, repetition_penalty=1.1, presence_penalty=0.5,
                       frequency_penalty=0.5, logprobs=2, seed=2, ignore_eos=True),
    ]
    longest = min(engine.max_model_len - 8, max_num_batched_tokens + 100)  # a chunked prefill where it fits
    lengths = sorted({n for n in (1, 7, 33, 300) if n < longest} | {longest})
    ids = iter(range(10**6))
    total = 2 + len(kinds) * len(lengths)
    _progress(1, total)
    for params in kinds:
        for n in lengths:
            engine.add_request(f"warm-{next(ids)}", {"prompt_token_ids": [(7 * i + 3) % vocab for i in range(n)]}, params)
    finished = 1
    while engine.has_unfinished_requests():
        finished += sum(o.finished for o in engine.step())
        _progress(finished, total)
    _warm_tuned_gemms(engine.model.plan, engine.model.tuning)
    _progress(total, total)
    torch.cuda.synchronize()
    from triton import knobs

    return kernel_binaries.environment(device) | {"graphs": len(engine.graphs.graphs), "cache_dir": knobs.cache.dir}


def _warm_tuned_gemms(plan, tuning: dict | None) -> None:
    """Launch every linear and gated_linear weight shape once per choice tuning.json made, at
    its bucket's bound, through the launcher the runtime uses (a bucket the warm-up requests
    missed must not compile at serve time; neither Triton kernel specializes on the token count)."""
    from kiln.codegen.cuda.tune import linear_call, weight, workload
    from kiln.kernels.triton_kernels import linear

    table = linear.parse_table(((tuning or {}).get("kernels") or {}).get("linear") or {})
    for shape in workload(plan)[0]:
        for choice in table.get((shape.k, shape.n), ()):
            linear_call(shape, choice.max_m, choice)(weight(shape, 0.0))


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m kiln.codegen.cuda.build", description=__doc__.splitlines()[0])
    p.add_argument("artifact")
    p.add_argument("--max-num-seqs", type=int, default=256)
    p.add_argument("--max-num-batched-tokens", type=int, default=2048)
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.child:
        print(json.dumps(_warm_up(a.artifact, a.max_num_seqs, a.max_num_batched_tokens)))
    else:
        print(json.dumps(build_kernels(a.artifact, a.max_num_seqs, a.max_num_batched_tokens), indent=1))


if __name__ == "__main__":
    main()
