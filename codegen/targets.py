"""Compilation targets and model dtypes: the one table of each (the CLI and the compile driver
read them here). Each available target's module has `lower(graph) -> LoweredModule`."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import TYPE_CHECKING

from kiln.errors import KilnError

if TYPE_CHECKING:
    from kiln.codegen.lowering import LoweredModule
    from kiln.ir.graph import Graph

AVAILABLE: dict[str, str] = {
    "reference": "kiln.codegen.reference",
    "cuda": "kiln.codegen.cuda",
    "cpu": "kiln.codegen.cpu",
}
"""Target -> the module that lowers for it."""
PLANNED: dict[str, str] = {}
"""Targets the CLI accepts that are not implemented yet -> what they will use."""
TARGETS: tuple[str, ...] = (*AVAILABLE, *PLANNED)
"""Every target name the CLI accepts."""
MODEL_DTYPES: tuple[str, ...] = ("float32", "float16", "bfloat16")
"""IR dtype names a model may be compiled to."""


def get_lowering(target: str) -> Callable[[Graph], LoweredModule]:
    """The lowering function of a target; KilnError for planned or unknown targets."""
    if target in AVAILABLE:
        return importlib.import_module(AVAILABLE[target]).lower
    if target in PLANNED:
        raise KilnError(
            f"target '{target}' ({PLANNED[target]}) is not implemented yet; use --target reference"
        )
    raise KilnError(f"unknown target '{target}'; accepted: {', '.join(TARGETS)}")
