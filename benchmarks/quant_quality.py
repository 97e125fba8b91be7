"""Held-out loss of compile-time quantization on the bundled demo model, beside float32.

    python benchmarks/quant_quality.py [--target reference] [--windows 170]

Compiles models/demo once per variant (float32; --quantize fp8, int8, int4 round-to-nearest,
int4 with AWQ calibration; int8 and int4 + AWQ with --quantize-lm-head), runs kiln.load_artifact(OUT).forward over the demo's validation
split (models/demo_data.py: the held-out stdlib files, fixed non-overlapping 256-token windows,
as models/train_demo.py evaluates) and reports the mean next-token cross entropy and its
increase over float32. The AWQ calibration text is training-split files (never validation).
Bars (issue 13): +0.5% for fp8 and int8, +3% for int4 with calibration.
Prints a table and writes JSON (--out).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import platform
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import kiln
from kiln.models import demo_data

ROOT = Path(__file__).resolve().parent.parent
VARIANTS: list[tuple[str, dict, float | None]] = [
    ("float32", {}, None),
    ("fp8", {"quantize": "fp8"}, 0.5),
    ("int8", {"quantize": "int8"}, 0.5),
    ("int4 (round to nearest)", {"quantize": "int4"}, None),
    ("int4 + AWQ calibration", {"quantize": "int4", "calibration": True}, 3.0),
    ("int8, LM head too", {"quantize": "int8", "quantize_lm_head": True}, None),
    ("int4 + AWQ, LM head too", {"quantize": "int4", "calibration": True, "quantize_lm_head": True}, None),
]
"""(name, compile options, allowed loss increase in %)."""


def val_windows(model_dir: Path, count: int, context: int) -> torch.Tensor:
    """The demo's validation windows [n, context] (its own split and tokenizer)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    corpus = demo_data.load_corpus()
    return demo_data.fixed_windows(demo_data.encode_stream(tok, corpus.val_texts), count, context)


def calibration_text(path: Path, chars: int) -> Path:
    """Training-split files, concatenated up to `chars` characters, written to `path`."""
    corpus = demo_data.load_corpus()
    parts, n = [], 0
    # every 7th training file: varied modules, not one package's run
    for text in corpus.train_texts[::7]:
        parts.append(text)
        n += len(text)
        if n >= chars:
            break
    path.write_text("".join(parts)[:chars], encoding="utf-8")
    return path


def mean_loss(artifact: Path, windows: torch.Tensor, batch: int) -> float:
    """Mean next-token cross entropy (nats) over the windows, through the artifact's forward."""
    model = kiln.load_artifact(artifact)
    total, count = 0.0, 0
    with torch.no_grad():
        for chunk in windows.split(batch):
            b, t = chunk.shape
            logits = model.forward(chunk.reshape(-1), torch.arange(t).repeat(b), [t] * b)
            logits = logits.float().reshape(b, t, -1)[:, :-1]
            total += F.cross_entropy(logits.flatten(0, 1), chunk[:, 1:].flatten(), reduction="sum").item()
            count += chunk[:, 1:].numel()
    return total / count


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model-dir", type=Path, default=ROOT / "models" / "demo")
    p.add_argument("--target", default="reference", choices=["reference", "cpu"])
    p.add_argument("--windows", type=int, default=256, help="validation windows at most (the split has ~170)")
    p.add_argument("--context", type=int, default=256)
    p.add_argument("--batch", type=int, default=8, help="windows per forward call")
    p.add_argument("--calibration-chars", type=int, default=120_000)
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "quant-quality-demo.json")
    args = p.parse_args(argv)
    torch.manual_seed(0)
    windows = val_windows(args.model_dir, args.windows, args.context)
    print(f"validation: {windows.shape[0]} windows x {windows.shape[1]} tokens")
    rows = []
    with tempfile.TemporaryDirectory(prefix="kiln-quant-") as tmp:
        calib = calibration_text(Path(tmp) / "calibration.txt", args.calibration_chars)
        for name, options, bar in VARIANTS:
            opts = {**options, **({"calibration": calib} if options.get("calibration") else {})}
            t0 = time.time()
            out = kiln.compile(args.model_dir, Path(tmp) / name.replace(" ", "_"), target=args.target, **opts)
            compiled = time.time() - t0
            loss = mean_loss(out, windows, args.batch)
            size = sum(f.stat().st_size for f in (out / "weights").glob("*"))
            rows.append({"variant": name, "options": {k: str(v) for k, v in opts.items()}, "loss": loss,
                         "bar_percent": bar, "compile_s": round(compiled, 1), "eval_s": round(time.time() - t0 - compiled, 1),
                         "weights_bytes": size})
            print(f"{name}: loss {loss:.4f} ({compiled:.0f} s compile)", flush=True)
        calib_sha = hashlib.sha256(calib.read_bytes()).hexdigest()
    base = rows[0]["loss"]
    for r in rows:
        r["increase_percent"] = 100 * (r["loss"] / base - 1)
        r["passes"] = None if r["bar_percent"] is None else r["increase_percent"] <= r["bar_percent"]
    print("\n| variant | val loss (nats/token) | vs float32 | bar | weights |\n|---|---|---|---|---|")
    for r in rows:
        bar = "" if r["bar_percent"] is None else f"<= +{r['bar_percent']}% ({'met' if r['passes'] else 'MISSED'})"
        print(f"| {r['variant']} | {r['loss']:.4f} | {r['increase_percent']:+.2f}% | {bar} | "
              f"{r['weights_bytes'] / 1e6:.2f} MB |")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({
        "model": str(args.model_dir.relative_to(ROOT)) if args.model_dir.is_relative_to(ROOT) else str(args.model_dir),
        "target": args.target,
        "validation": {"windows": int(windows.shape[0]), "context": args.context, "tokens": int(windows.numel()),
                       "split": "models/demo_data.py held-out stdlib files (crc32 % 50 == 0), fixed windows"},
        "calibration": {"chars": args.calibration_chars, "source": "every 7th training-split file", "sha256": calib_sha},
        "python": platform.python_version(),
        "machine": platform.machine(),
        "results": rows,
    }, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
