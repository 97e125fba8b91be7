"""Peak memory of AWQ calibration (kiln.passes.awq.awq_scales) on the demo model or a random checkpoint.

    python benchmarks/awq_memory.py [--model DIR | --shape llama-100m] [--chars 120000] [--tokens N] [--dtype float32]
        [--budget-mib M]

Imports the model (models/demo by default), tokenizes benchmarks/quant_quality.py's calibration
text (--chars characters of training-split files; its first --tokens tokens) with the model's
tokenizer, runs the calibration and the scale search, and prints the process's peak RSS (VmHWM),
the bytes of calibration rows kept at once (the sum of the tensors collect_inputs returns), the
time, and the chosen alphas' mean (JSON with --out: every alpha).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from kiln.compile_quantize import calibration_sequences
from kiln.frontend import import_model
from kiln.frontend.checkpoint import load_checkpoint
from kiln.ir.types import torch_dtype
from kiln.passes import awq

ROOT = Path(__file__).resolve().parent.parent


def peak_rss_mib() -> float:
    """The process's peak resident set (VmHWM) in MiB."""
    line = next(x for x in Path("/proc/self/status").read_text().splitlines() if x.startswith("VmHWM"))
    return int(line.split()[1]) / 1024


def main(argv: list[str] | None = None) -> None:
    from quant_quality import calibration_text

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", type=Path, default=ROOT / "models" / "demo")
    p.add_argument("--shape", help="a kiln.models.shapes name: synthesize a random checkpoint of it instead")
    p.add_argument("--chars", type=int, default=120_000, help="calibration text characters")
    p.add_argument("--tokens", type=int, default=65536, help="calibration tokens at most")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--budget-mib", type=int, help="the rows' byte budget (default kiln.passes.awq.ROW_BUDGET)")
    p.add_argument("--out", type=Path)
    args = p.parse_args(argv)
    kept: list[int] = []
    collect = awq.collect_inputs

    def recording(*a, **kw):
        xs = collect(*a, **kw)
        kept.append(sum(rows.nbytes for rows, _ in xs.values()))
        return xs

    awq.collect_inputs = recording
    with tempfile.TemporaryDirectory(prefix="kiln-awq-mem-") as tmp:
        model = args.model
        if args.shape:
            from kiln.models.shapes import synthesize_checkpoint

            model = synthesize_checkpoint(args.shape, Path(tmp) / "ckpt", torch_dtype(args.dtype))
        ckpt = load_checkpoint(model)
        imported = import_model(ckpt, torch_dtype(args.dtype))
        seq_len = min(512, int(imported.graph.meta.get("max_position_embeddings") or 512))
        text = calibration_text(Path(tmp) / "calib.txt", args.chars).read_text()
        seqs = calibration_sequences(ckpt, text, seq_len)[: -(-args.tokens // seq_len)]
        seqs[-1] = seqs[-1][: args.tokens - (len(seqs) - 1) * seq_len]
        before = peak_rss_mib()
        t0 = time.time()
        with torch.no_grad():
            budget = {} if args.budget_mib is None else {"budget": args.budget_mib << 20}
            _, alphas = awq.awq_scales(imported.graph, imported.weights, seqs, **budget)
        seconds = time.time() - t0
    result = {"model": args.shape or str(model), "dtype": args.dtype, "tokens": sum(map(len, seqs)),
              "peak_rss_mib_before_calibration": round(before), "peak_rss_mib": round(peak_rss_mib()),
              "kept_rows_mib": round(kept[0] / 2**20, 1), "seconds": round(seconds, 1),
              "mean_alpha": round(sum(alphas.values()) / len(alphas), 4), "alphas": alphas}
    print(json.dumps({k: v for k, v in result.items() if k != "alphas"}))
    if args.out:
        args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
