"""Kernel sources and their launch wrappers, one module per provider (see README.md).

A provider module exposes `PREFIX` (the kernel-id prefix it serves) and `launcher(name)`, the
`Launcher` of a kernel or None; codegen asks it what it can run, the runtime launches what an
artifact names.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

Launcher = Callable[[list[torch.Tensor], list[Any], dict[str, Any]], None]
"""launch(outputs, inputs, attrs): computes into the output buffers; returns nothing."""

__all__ = ["Launcher"]
