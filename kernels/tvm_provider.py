"""The `tvm` provider: the cpu target's TVM kernels (kiln.kernels.tvm_kernels), compiled into
one library per artifact. The runtime loads that library (kiln.runtime.tvm_library) and
registers its functions here; `launcher(name)` then calls function `name` destination-passing:
the op inputs the kernel reads, then its result buffers, each shaped as its `present` says.

Strided views pass as they are (the kernels declare symbolic strides) except where no view
can present them: an inner stride other than 1, or leading dims that cannot merge into one.
Such an input is copied into a contiguous temporary; such a destination is computed into one
and copied back. Plans rarely make them (a transposed view feeding a kernel).

A record may name other functions of the library for small row counts (`by_rows`: [[max rows,
function], ...], written by `kiln tune` when decode and prefill want different schedules): the
launcher counts the rows of the first buffer it passes and calls the first function whose bound
holds, else its own.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch

from kiln.kernels import Launcher

PREFIX = "tvm"

AS_IS, ROWS, MAT = "as_is", "rows", "mat"  # kernels/tvm_kernels/__init__.py documents them

_launchers: dict[str, Launcher] = {}


def shaped(t: torch.Tensor, present: str) -> torch.Tensor | None:
    """t as the kernel takes it, a view; None when no view can be."""
    if present == AS_IS:
        return t if t.dim() == 0 or t.stride(-1) == 1 or t.shape[-1] == 1 else None
    if t.dim() and t.stride(-1) != 1 and t.shape[-1] != 1:
        return None
    n = t.shape[-1] if t.dim() else 1
    try:
        if present == MAT:
            return t if t.dim() == 2 else t.view(-1, n)
        if t.dim() == 3:
            return t
        if t.dim() == 2:
            return t.unsqueeze(1)
        if t.dim() < 2:
            return t.reshape(1, 1, n)
        return t.view(-1, t.shape[-2], n)
    except RuntimeError:  # leading dims that no single stride covers
        return None


def make_launcher(fn: Callable[..., Any], record: Mapping[str, Any],
                  by_rows: tuple[tuple[int, Callable[..., Any]], ...] = ()) -> Launcher:
    """The launcher of compiled function `fn` with its build.json record (inputs, outputs,
    present: see kiln.kernels.tvm_kernels.Kernel); `by_rows`: (max rows, function) pairs that
    serve calls of at most that many rows instead."""
    ins, outs_at = list(record["inputs"]), list(record["outputs"])
    present = list(record["present"])

    def launch(outs: list[torch.Tensor], args: list[Any], attrs: dict[str, Any]) -> None:
        call = []
        for i, p in zip(ins, present, strict=False):
            t = shaped(args[i], p)
            call.append(t if t is not None else shaped(args[i].contiguous(), p))
        back = []
        for j, p in zip(outs_at, present[len(ins):], strict=True):
            t = shaped(outs[j], p)
            if t is None:
                tmp = torch.empty(outs[j].shape, dtype=outs[j].dtype, device=outs[j].device)
                back.append((outs[j], tmp))
                t = shaped(tmp, p)
            call.append(t)
        f = fn
        if by_rows and call:
            rows = call[0].numel() // max(call[0].shape[-1], 1) if call[0].dim() else 1
            f = next((g for bound, g in by_rows if rows <= bound), fn)
        f(*call)
        for dst, tmp in back:
            dst.copy_(tmp)

    return launch


def register(functions: Mapping[str, Callable[..., Any]], records: Mapping[str, Mapping[str, Any]]) -> None:
    """Serve each function of a loaded library by name (a name is its op and every constant, so
    two libraries with one name hold the same kernel)."""
    for name, record in records.items():
        by_rows = tuple((int(bound), functions[f]) for bound, f in record.get("by_rows", ()))
        _launchers[name] = make_launcher(functions[name], record, by_rows)


def missing(kernel: str) -> str:
    """Why kernel id `kernel` does not resolve: no loaded library has it."""
    return (f"the plan calls kernel '{kernel}' of provider '{PREFIX}' (target 'cpu'), which no loaded kernel "
            "library has: load the artifact with kiln (CompiledModel installs its kernels/cpu library), "
            "recompile it on this machine, or recompile with --target reference")


def launcher(name: str) -> Launcher | None:
    """The launcher of compiled function `name`, or None when no loaded library has it."""
    return _launchers.get(name)
