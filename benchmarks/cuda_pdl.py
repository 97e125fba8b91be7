"""What programmatic dependent launch buys (kiln.kernels.triton_kernels.pdl): batch-1 decode and
time to first token of one artifact served with PDL off (KILN_PDL=0) and on, each in a fresh
process, on this GPU.

    python benchmarks/cuda_pdl.py --shapes llama-3.2-1b,llama-3.1-8b --out results/cuda-pdl.json

Per shape (random bf16 weights, kiln.models.shapes; compiled, then tuned for --tune-budget
seconds): decode tok/s at batch 1 as benchmarks/cuda.py measures it (median of --reps) and the
TTFT of a 2048-token prompt (median of --reps after 2 warm-ups). The artifact's kernels are
built with PDL on, so the PDL-off process compiles its variants at load (not timed). Prints a
table and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

import kiln

sys.path.insert(0, str(Path(__file__).parent))
from cuda import build_artifact  # noqa: E402

_RUN = """
import json, statistics, sys
import torch
sys.path.insert(0, sys.argv[3])
from cuda import _prompts, _timed, decode_rate
from kiln import LLM
from kiln.kernels.triton_kernels import pdl

llm = LLM(sys.argv[1], device="cuda", max_model_len=4096, max_num_seqs=8, max_num_batched_tokens=2048,
          enable_prefix_caching=False)
vocab, reps = llm.engine.model.vocab_size, int(sys.argv[2])
_timed(llm, _prompts(1, 128, vocab, 99), 8)
b1 = decode_rate(lambda p, n: _timed(llm, p, n), 1, vocab, reps)
ttft = [_timed(llm, _prompts(1, 2048, vocab, 1000 + r), 1) for r in range(reps + 2)]
print(json.dumps({"pdl": pdl.enabled(torch.empty(0, device="cuda")), "decode_b1_tok_s": b1,
                  "ttft_2048_ms": 1e3 * statistics.median(ttft[2:])}))
"""


def serve(art: Path, pdl: bool, reps: int) -> dict:
    """One fresh process serving `art` with PDL on or off: its figures, or the error it printed."""
    env = {**os.environ, "KILN_PDL": "1" if pdl else "0"}
    run = subprocess.run([sys.executable, "-c", _RUN, str(art.resolve()), str(reps), str(Path(__file__).parent.resolve())],
                         capture_output=True, text=True, env=env, cwd=tempfile.gettempdir())
    if run.returncode != 0:
        return {"error": run.stderr[-3000:]}
    return json.loads(run.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", default="llama-3.2-1b,llama-3.1-8b")
    ap.add_argument("--work", default="/tmp/kiln-bench", help="checkpoints and artifacts go here")
    ap.add_argument("--tune-budget", type=float, default=60.0)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--out", default="results/cuda-pdl.json")
    a = ap.parse_args()
    report: dict = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "kiln": kiln.__version__,
                    "shapes": {}}
    for shape in a.shapes.split(","):
        _, art, row = build_artifact(shape, Path(a.work), a.tune_budget)
        row["off"] = serve(art, False, a.reps)
        row["on"] = serve(art, True, a.reps)
        report["shapes"][shape] = row
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(json.dumps(report, indent=1))
    print(f"{'shape':14} {'metric':18} {'PDL off':>10} {'PDL on':>10} {'change':>8}")
    for shape, row in report["shapes"].items():
        for metric in ("decode_b1_tok_s", "ttft_2048_ms"):
            off, on = row["off"].get(metric), row["on"].get(metric)
            if off is None or on is None:
                print(f"{shape:14} {metric:18} failed: {row['off'].get('error') or row['on'].get('error')}")
                continue
            print(f"{shape:14} {metric:18} {off:10.1f} {on:10.1f} {100 * (on / off - 1):+7.1f}%")


if __name__ == "__main__":
    main()
