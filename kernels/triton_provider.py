"""The `triton` provider: the cuda target's Triton kernels (kiln.kernels.triton_kernels), one
launcher per IR op, with the op's inputs, attributes and destination buffers."""

from __future__ import annotations

import functools
import importlib

from kiln.kernels import Launcher

PREFIX = "triton"

MODULES = ("attention", "norms", "rope", "elementwise")
"""The kernel modules of kiln.kernels.triton_kernels, each exposing LAUNCHERS."""


@functools.cache
def launchers() -> dict[str, Launcher]:
    """Every Triton launcher by IR op name (importing triton and the kernel modules once)."""
    table: dict[str, Launcher] = {}
    for name in MODULES:
        module = importlib.import_module(f"kiln.kernels.triton_kernels.{name}")
        table.update(module.LAUNCHERS)
    return table


def launcher(name: str) -> Launcher | None:
    """The launcher of IR op `name`, or None when no Triton kernel computes it."""
    return launchers().get(name)
