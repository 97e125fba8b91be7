"""Compilation targets by name: each lowers a graph to an execution plan."""

from __future__ import annotations

import importlib
from collections.abc import Callable

from kiln.errors import KilnError
from kiln.ir.graph import Graph
from kiln.runtime.plan import ExecutionPlan

TARGETS: dict[str, str] = {"reference": "kiln.codegen.reference"}
PLANNED = {"cuda": "Triton kernels", "cpu": "TVM/LLVM kernels"}


def get_lowering(target: str) -> Callable[[Graph], ExecutionPlan]:
    """The lowering function of a target; KilnError for planned or unknown targets."""
    if target in TARGETS:
        return importlib.import_module(TARGETS[target]).lower
    if target in PLANNED:
        raise KilnError(
            f"target '{target}' ({PLANNED[target]}) is not implemented yet; use --target reference"
        )
    raise KilnError(f"unknown target '{target}'; accepted: {', '.join([*TARGETS, *PLANNED])}")
