"""Compiling the cpu target's kernels: every specialization of a graph in one IRModule, built
once with LLVM for the host processor into one shared library.

    kernels/cpu/kernels.so    the library (tvm.runtime.load_module reads it back)
    kernels/cpu/build.json    what it was built for (TVM version, LLVM triple, mcpu and the CPU
                              features that mcpu enables) and how each function is launched
                              (kiln.kernels.tvm_kernels.Kernel.table)
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import tvm

from kiln.kernels import Launcher
from kiln.kernels.tvm_kernels import Kernel
from kiln.kernels.tvm_provider import make_launcher
from kiln.runtime.tvm_library import BUILD_INFO, LIBRARY, host

FORMAT = 1
"""build.json's format version."""


def target() -> tvm.target.Target:
    """LLVM for this machine's processor, with its cores."""
    info = host()
    return tvm.target.Target({"kind": "llvm", "mcpu": info["mcpu"], "mtriple": info["triple"],
                              "num-cores": os.cpu_count() or 1})


def compile_kernels(kernels: Sequence[Kernel]) -> tvm.runtime.Module:
    """One compiled library holding every kernel (by its name), each kernel compiled as an LLVM
    module of its own and linked beside the others. Compiled together in one module, LLVM kept a
    register tile's accumulators in memory (a load and store per FMA) in the linear kernel
    whenever the module also held silu_and_mul, rms_norm or attention: prefill GEMMs 3x slower
    in a model's library (41 vs 13 ms at 512 x 768 x 4096) than compiled alone."""
    libs = [tvm.compile(tvm.IRModule({k.name: k.func.with_attr("global_symbol", k.name)}), target=target())
            for k in kernels]
    for lib in libs[1:]:
        libs[0].mod.import_module(lib.mod)
    return libs[0]


def library_files(kernels: Sequence[Kernel], tuning: Mapping[str, Any] | None = None) -> dict[str, bytes]:
    """The artifact files of a graph's kernels: the exported library and its build.json; with a
    tuning table (tuning.json, kiln.codegen.cpu.tuning) its schedules, else the defaults."""
    if tuning:
        from kiln.codegen.cpu.tuning import apply

        kernels = apply(kernels, tuning)
    lib = compile_kernels(kernels)
    with tempfile.TemporaryDirectory(prefix="kiln-tvm-") as d:
        path = Path(d) / "kernels.so"
        lib.export_library(str(path))
        data = path.read_bytes()
    info: dict[str, Any] = {"format": FORMAT, **host(), "kernels": {k.name: k.table() for k in kernels}}
    return {LIBRARY: data, BUILD_INFO: json.dumps(info, indent=1, sort_keys=True).encode()}


def launcher_of(kernel: Kernel) -> Launcher:
    """A launcher of one kernel compiled in this process (kernel tests, tuning); serving loads
    the artifact's library instead."""
    if kernel.name not in _compiled:
        lib = compile_kernels([kernel])
        _compiled[kernel.name] = make_launcher(lib[kernel.name], kernel.table())
        _libs.append(lib)
    return _compiled[kernel.name]


_compiled: dict[str, Launcher] = {}
_libs: list[tvm.runtime.Module] = []
