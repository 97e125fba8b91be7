"""Shared fixtures: tiny checkpoints and compiled artifacts, built once per session."""

from __future__ import annotations

import os

import torch

# Without a GPU, Triton kernels run in its interpreter; it must be chosen before triton is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from collections.abc import Callable  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

import kiln  # noqa: E402
from kiln.models.checkpoint import build_checkpoint  # noqa: E402

# The suite's models are tiny: one intra-op thread is faster than two fighting over 2 cores.
torch.set_num_threads(1)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., Path]:
    """checkpoint(arch, **build_kwargs) -> a saved tiny random checkpoint (cached)."""
    cache: dict[tuple, Path] = {}

    def get(arch: str, **kw) -> Path:
        key = (arch, tuple(sorted((k, repr(v)) for k, v in kw.items())))
        if key not in cache:
            cache[key] = build_checkpoint(arch, tmp_path_factory.mktemp(f"ckpt-{arch}"), **kw)
        return cache[key]

    return get


@pytest.fixture(scope="session")
def artifact(tmp_path_factory: pytest.TempPathFactory, checkpoint: Callable[..., Path]) -> Callable[..., Path]:
    """artifact(arch, dtype="float32", **compile_kwargs) -> a compiled artifact dir (cached)."""
    cache: dict[tuple, Path] = {}

    def get(arch: str, dtype: str = "float32", **kw) -> Path:
        key = (arch, dtype, tuple(sorted((k, repr(v)) for k, v in kw.items())))
        if key not in cache:
            out = tmp_path_factory.mktemp(f"art-{arch}-{dtype}") / "artifact"
            cache[key] = kiln.compile(checkpoint(arch), out, dtype=dtype, **kw)
        return cache[key]

    return get
