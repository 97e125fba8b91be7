"""The artifact directory: layout, manifest, and validation on load.

    OUT/
      manifest.json      format and kiln versions, target, dtype, source hashes, pipeline, files
      graph.json         the lowered IR
      plan.json          the execution plan (runtime/plan.py)
      kernels/           compiled kernels of the target (none on reference)
      tuning.json        kernel configs chosen for the target (optional)
      weights/*.safetensors
      tokenizer/         the checkpoint's tokenizer files
      config.json, generation_config.json   copied from the checkpoint
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from kiln.errors import ArtifactError

FORMAT_VERSION = 2
MANIFEST = "manifest.json"
GRAPH = "graph.json"
PLAN = "plan.json"
TUNING = "tuning.json"
KERNELS_DIR = "kernels"
WEIGHTS_DIR = "weights"
TOKENIZER_DIR = "tokenizer"
# Small files whose full hash is checked at every load; weights are checked by size and header.
_HASHED_ON_LOAD = (GRAPH, PLAN, TUNING)


def sha256_file(path: str | Path, chunk: int = 1 << 24) -> str:
    """Hex sha256 of a file, read in chunks (the hash the manifest records)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def read_manifest(path: str | Path, target: str | None = None) -> dict[str, Any]:
    """The validated manifest of an artifact: ArtifactError names the file that is wrong."""
    root = Path(path)
    if not root.is_dir():
        raise ArtifactError(f"artifact directory '{root}' does not exist")
    mpath = root / MANIFEST
    if not mpath.is_file():
        raise ArtifactError(f"'{mpath}' is missing: '{root}' is not a kiln artifact (run compile-model)")
    try:
        manifest = json.loads(mpath.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ArtifactError(f"'{mpath}' is not valid JSON ({e}); recompile the artifact") from None
    version = manifest.get("format_version")
    if version != FORMAT_VERSION:
        raise ArtifactError(
            f"'{mpath}' has format version {version!r}; this kiln reads version {FORMAT_VERSION}: "
            "recompile the model with this kiln"
        )
    if target is not None and manifest.get("target") != target:
        raise ArtifactError(
            f"'{root}' was compiled for target '{manifest.get('target')}', not '{target}'; "
            f"recompile with --target {target}"
        )
    for rel, info in manifest.get("files", {}).items():
        f = root / rel
        if not f.is_file():
            raise ArtifactError(f"artifact file '{f}' is missing")
        size = f.stat().st_size
        if size != info["size"]:
            raise ArtifactError(
                f"artifact file '{f}' has {size} bytes, the manifest says {info['size']}: it is "
                "truncated or was modified; recompile the artifact"
            )
        if rel in _HASHED_ON_LOAD and sha256_file(f) != info["sha256"]:
            raise ArtifactError(f"artifact file '{f}' does not match its sha256 in the manifest")
    return manifest


def verify_hashes(path: str | Path) -> list[str]:
    """Every file whose sha256 differs from the manifest (slow on big weights)."""
    root = Path(path)
    manifest = read_manifest(root)
    return [rel for rel, info in manifest["files"].items() if sha256_file(root / rel) != info["sha256"]]


def read_json(root: Path, rel: str) -> Any:
    """A JSON file of the artifact; ArtifactError when unreadable."""
    try:
        return json.loads((root / rel).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ArtifactError(f"cannot read artifact file '{root / rel}': {e}") from None
