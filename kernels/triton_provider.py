"""The `triton` provider: the cuda target's Triton kernels (kiln.kernels.triton_kernels), one
launcher per IR op, with the op's inputs, attributes and destination buffers.

An artifact's tuning.json (written by `kiln tune`) configures the kernels that have knobs: its
"kernels" table maps an op name to what that op's module's `make_launcher` takes
(`paged_attention`: the prefill and decode AttentionConfig; `linear`: the provider and GEMM
or GEMV config per weight shape and bucket, which `gated_linear` reads too; `quantized_linear`:
the GEMV config per packed weight)."""

from __future__ import annotations

import functools
import importlib
import json
from collections.abc import Mapping
from typing import Any

from kiln.kernels import Launcher

PREFIX = "triton"

MODULES = ("attention", "norms", "rope", "elementwise", "linear", "quant_act", "quant_linear", "lora")
"""The kernel modules of kiln.kernels.triton_kernels, each exposing LAUNCHERS."""

TUNED = {"paged_attention": ("attention", "paged_attention"), "linear": ("linear", "linear"),
         "gated_linear": ("linear", "linear"), "quantized_linear": ("quant_linear", "quantized_linear")}
"""Ops whose launcher a tuning.json entry configures -> (their module, the entry's name); the
module's `from_tuning(entry)` gives its launchers by op name."""


PARTIAL = {"quantized_linear": "quant_linear"}
"""Ops whose Triton kernels compute only some nodes -> the module whose `covers(attrs)` says
which (the launcher runs the torch reference for the rest; codegen routes those to `torch:`)."""


@functools.cache
def launchers() -> dict[str, Launcher]:
    """Every Triton launcher by IR op name (importing triton and the kernel modules once)."""
    table: dict[str, Launcher] = {}
    for name in MODULES:
        module = importlib.import_module(f"kiln.kernels.triton_kernels.{name}")
        table.update(module.LAUNCHERS)
    return table


@functools.cache
def _tuned(module: str, entry: str) -> dict[str, Launcher]:
    return importlib.import_module(f"kiln.kernels.triton_kernels.{module}").from_tuning(json.loads(entry))


def covers(name: str, attrs: Mapping[str, Any]) -> bool:
    """Whether the Triton kernel of op `name` computes a node with these attributes."""
    if name not in PARTIAL:
        return True
    return importlib.import_module(f"kiln.kernels.triton_kernels.{PARTIAL[name]}").covers(attrs)


def launcher(name: str, tuning: Mapping[str, Any] | None = None) -> Launcher | None:
    """The launcher of IR op `name` (configured by `tuning`'s entry for it, if any), or None
    when no Triton kernel computes it. ValueError when the entry is malformed."""
    module, key = TUNED.get(name, (None, name))
    entry = ((tuning or {}).get("kernels") or {}).get(key)
    if entry and module is not None:
        return _tuned(module, json.dumps(entry, sort_keys=True))[name]
    return launchers().get(name)
