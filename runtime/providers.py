"""Kernel providers: a plan's kernel id "provider:name" resolves, once at load, to a launcher
from the provider's module in `kiln.kernels`.

    torch:<op>    kiln.kernels.torch_provider: the IR op's torch reference (every target)
    triton:<op>   kiln.kernels.triton_provider: Triton kernels of the cuda target
    tvm:<k>       kiln.kernels.tvm_provider: TVM/LLVM kernels of the cpu target, from the
                  artifact's library (kiln.runtime.tvm_library loads it first)
    aoti:<k>      Inductor AOT packages of the cuda target (not in this runtime yet)
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Mapping
from dataclasses import dataclass
from types import ModuleType
from typing import Any

from kiln.errors import ArtifactError
from kiln.kernels import Launcher


@dataclass(frozen=True)
class Provider:
    """One kernel-id prefix."""

    prefix: str
    module: str | None
    """The `kiln.kernels` module serving it; None while this runtime lacks it."""
    target: str
    """The compile target whose artifacts use it."""


PROVIDERS: dict[str, Provider] = {
    p.prefix: p
    for p in (
        Provider("torch", "kiln.kernels.torch_provider", "reference"),
        Provider("triton", "kiln.kernels.triton_provider", "cuda"),
        Provider("tvm", "kiln.kernels.tvm_provider", "cpu"),
        Provider("aoti", None, "cuda"),
    )
}


def _module(p: Provider, kernel: str) -> ModuleType:
    if p.module is None:
        raise ArtifactError(
            f"the plan calls kernel '{kernel}' of provider '{p.prefix}' (target '{p.target}'), which this "
            "runtime does not provide yet; recompile the artifact with --target reference"
        )
    return importlib.import_module(p.module)


def resolve(kernel: str, tuning: Mapping[str, Any] | None = None) -> Launcher:
    """The launcher of kernel id "provider:name", configured by the artifact's `tuning` where its
    provider reads one (`launcher(name, tuning)`); ArtifactError naming the kernel when the
    provider is unknown or unavailable, or has no such kernel."""
    prefix, sep, name = kernel.partition(":")
    p = PROVIDERS.get(prefix)
    if not sep or p is None:
        raise ArtifactError(
            f"the plan calls kernel '{kernel}' of unknown provider '{prefix}'; known: {', '.join(PROVIDERS)}"
            "; recompile the artifact with this kiln"
        )
    module = _module(p, kernel)
    if tuning and "tuning" in inspect.signature(module.launcher).parameters:
        try:
            fn = module.launcher(name, tuning=tuning)
        except ValueError as e:
            raise ArtifactError(f"{e}; run `kiln tune` again") from e
    else:
        fn = module.launcher(name)
    if fn is None and hasattr(module, "missing"):
        raise ArtifactError(module.missing(kernel))
    if fn is None:
        raise ArtifactError(
            f"the plan calls kernel '{kernel}', which provider '{prefix}' does not have; recompile the "
            "artifact with this kiln"
        )
    return fn
