"""Compiled Triton kernels shipped in a cuda-target artifact, so serving compiles nothing.

    kernels/triton.json          what they were built for: Triton and torch versions, GPU name
                                 and architecture (sm_XY), kiln version
    kernels/triton/<key>/...     Triton's own cache entries (binary, metadata), one folder per
                                 compiled kernel variant, every file listed and hashed in the
                                 manifest like the rest of the artifact

At load the entries are read (their hashes checked) into this process's kernel cache folder,
and Triton is pointed at it: a launch whose variant is there loads the binary; anything else
would compile, which `compiled_at_runtime` reports (the test that loading and serving compiles
nothing reads it). An artifact built for another GPU architecture or Triton version is refused.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import torch

from kiln.errors import ArtifactError
from kiln.runtime.artifact import KERNELS_DIR, Artifact

BUILD_INFO = f"{KERNELS_DIR}/triton.json"
BINARIES = f"{KERNELS_DIR}/triton"

BUILDING = False
"""Set by the cuda target's kernel build (kiln.codegen.cuda.build), which loads an artifact that
has no kernels yet and compiles them into a cache of its own."""

_cache: Path | None = None
_shipped: set[str] = set()


def interpreted() -> bool:
    """True when Triton runs kernels in its interpreter (TRITON_INTERPRET=1: CPU tests)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def environment(device: torch.device) -> dict[str, Any]:
    """What a binary depends on, for the GPU `device`."""
    import triton

    major, minor = torch.cuda.get_device_capability(device)
    return {
        "triton": triton.__version__,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "arch": f"sm_{major}{minor}",
        "gpu": torch.cuda.get_device_name(device),
    }


def cache_dir() -> Path:
    """This process's Triton cache folder (made once; Triton is pointed at it)."""
    global _cache
    if _cache is None:
        _cache = Path(tempfile.mkdtemp(prefix="kiln-triton-"))
        os.environ["TRITON_CACHE_DIR"] = str(_cache)
    return _cache


def install(artifact: Artifact, device: torch.device) -> None:
    """Make the artifact's compiled kernels the ones Triton launches on `device`; ArtifactError
    when it has none for this GPU and Triton. On a CPU device the kernels can only run in
    Triton's interpreter (tests), which compiles nothing."""
    where = artifact.root
    if BUILDING:
        return
    if device.type != "cuda":
        if interpreted():
            return
        raise ArtifactError(
            f"'{where}' is a cuda-target artifact: serve it on a CUDA device (device='cuda'), or compile the "
            "model with --target reference or cpu for this machine"
        )
    here = environment(device)
    if not artifact.has(BUILD_INFO):
        raise ArtifactError(
            f"'{where}' holds no compiled kernels (it was compiled without a GPU): run `kiln tune {where}` on "
            f"the GPU that will serve it ({here['gpu']}), or run compile-model there"
        )
    built = artifact.read_json(BUILD_INFO)
    for key, what in (("arch", "GPU architecture"), ("triton", "Triton version")):
        if built.get(key) != here[key]:
            raise ArtifactError(
                f"'{where}' holds kernels built for {what} {built.get(key)} ({built.get('gpu')}, Triton "
                f"{built.get('triton')}); this machine has {here[key]} ({here['gpu']}, Triton {here['triton']}): "
                f"run `kiln tune {where}` here or recompile the model here"
            )
    root = cache_dir()
    for rel in artifact.listed(BINARIES):
        dest = root / Path(rel).relative_to(BINARIES)
        if not dest.exists():
            dest.parent.mkdir(parents=True, exist_ok=True)
            dest.write_bytes(artifact.read_bytes(rel))
        _shipped.add(dest.parent.name)


def compiled_at_runtime() -> list[str]:
    """Kernel variants compiled in this process that no loaded artifact shipped."""
    if _cache is None:
        return []
    return sorted(p.name for p in _cache.iterdir() if p.is_dir() and p.name not in _shipped)
