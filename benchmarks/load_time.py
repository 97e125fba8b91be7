"""Artifact load time with and without content verification, on an artifact of about 1.35 GB.

    python benchmarks/load_time.py [--artifact DIR] [--reps 7]

Without --artifact, builds a random-weight Llama checkpoint (hidden 2048, intermediate 5632,
vocab 32000, 4 layers, float32) and compiles it into a temporary directory first (a minute or
two). Times `kiln.load_artifact` alone and load plus the first 8-token forward (verification
hashes every byte at load; without it the weights are only mapped and page in as the forward
touches them, so the second column is the fair comparison). Prints a table of medians and
writes JSON (--out).

Then where verification's time goes: the weight files mapped and faulted in without hashing
(MADV_POPULATE_READ), and hashed once their pages are resident, on 1 and 2 threads. The hash of
resident pages is one more read of every byte at memory bandwidth: the floor of what content
verification can add on this machine, since the CPU forward reads the weights in place (there
is no copy pass a hash could ride along with).
"""

from __future__ import annotations

import argparse
import json
import mmap
import statistics
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
import xxhash

import kiln
from kiln.models.checkpoint import build_checkpoint

SHAPE = dict(hidden_size=2048, intermediate_size=5632, vocab_size=32000, num_hidden_layers=4,
             num_attention_heads=16, num_key_value_heads=16, head_dim=128)


def _once(artifact: Path, verify: bool) -> tuple[float, float]:
    t = time.perf_counter()
    model = kiln.load_artifact(artifact, verify=verify)
    loaded = time.perf_counter() - t
    model.forward(torch.arange(1, 9), torch.arange(8), [8])
    return loaded, time.perf_counter() - t


def _hash_parts(view: memoryview, parts: int, pool: ThreadPoolExecutor) -> None:
    n = len(view)

    def run(i: int) -> None:
        h = xxhash.xxh3_128()
        for pos in range(i * n // parts, (i + 1) * n // parts, 1 << 24):
            h.update(view[pos : min(pos + (1 << 24), (i + 1) * n // parts)])

    list(pool.map(run, range(parts)))


def floor(artifact: Path, reps: int) -> dict[str, float]:
    """Best-of-reps seconds to fault the weight files in, and to hash them when resident."""
    files = sorted((Path(artifact) / "weights").glob("*.safetensors"))
    out: dict[str, list[float]] = {"fault_in": [], "hash_resident_1_thread": [], "hash_resident_2_threads": []}
    with ThreadPoolExecutor(2) as pool:
        for _ in range(reps):
            maps = []
            for f in files:
                with open(f, "rb") as fh:
                    maps.append(mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_COPY))
            t = time.perf_counter()
            list(pool.map(lambda m: m.madvise(getattr(mmap, "MADV_POPULATE_READ", 22)), maps))
            out["fault_in"].append(time.perf_counter() - t)
            views = [memoryview(m) for m in maps]
            for threads in (1, 2):
                t = time.perf_counter()
                for v in views:
                    _hash_parts(v, threads, pool)
                out[f"hash_resident_{threads}_thread{'s' if threads > 1 else ''}"].append(time.perf_counter() - t)
            for v, m in zip(views, maps, strict=True):
                v.release()
                m.close()
    return {k: min(v) for k, v in out.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--artifact", type=Path, default=None, help="an existing artifact (default: build one)")
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/load-time.json"))
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        artifact = args.artifact
        if artifact is None:
            ckpt = build_checkpoint("llama", Path(tmp) / "ckpt", config_overrides=SHAPE)
            artifact = kiln.compile(ckpt, Path(tmp) / "art", dtype="float32")
        size = sum(f.stat().st_size for f in Path(artifact).rglob("*") if f.is_file())
        _once(artifact, False)  # warm the page cache
        runs: dict[str, list[tuple[float, float]]] = {"verify": [], "no verify": []}
        for _ in range(args.reps):
            for name in runs:
                runs[name].append(_once(artifact, name == "verify"))
        weights = sum(f.stat().st_size for f in (Path(artifact) / "weights").glob("*.safetensors"))
        parts = floor(artifact, args.reps)
    rows = {name: {"load_s": statistics.median(r[0] for r in rs), "load_and_first_forward_s":
                   statistics.median(r[1] for r in rs)} for name, rs in runs.items()}
    print(f"artifact {size / 1e9:.2f} GB, medians of {args.reps} (page cache warm)")
    print(f"{'':10s} {'load_artifact':>14s} {'+ first forward':>16s}")
    for name, r in rows.items():
        print(f"{name:10s} {r['load_s']:13.3f}s {r['load_and_first_forward_s']:15.3f}s")
    extra = rows["verify"]["load_and_first_forward_s"] / rows["no verify"]["load_and_first_forward_s"] - 1
    print(f"verification adds {extra:.1%} to the time to the first logits")
    base = rows["no verify"]["load_and_first_forward_s"]
    print(f"weights {weights / 1e9:.2f} GB, best of {args.reps}:")
    for name, s in parts.items():
        print(f"  {name:24s} {s * 1e3:6.1f} ms  ({weights / s / 1e9:5.1f} GB/s, {s / base:.1%} of the no-verify time)")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"bytes": size, "reps": args.reps, "rows": rows, "overhead": extra,
                                    "weight_bytes": weights, "floor_s": parts}, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
