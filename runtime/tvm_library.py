"""The compiled TVM kernels of a cpu-target artifact, loaded so serving compiles nothing.

    kernels/cpu/kernels.so     one shared library: every kernel of the plan, by function name
    kernels/cpu/build.json     what it was built for (TVM version, LLVM triple, mcpu, the CPU
                               features it may use) and each function's launch record

At load the library is read through the artifact (its hash checked) into a private temporary
file and opened with TVM's runtime module loader; its functions are registered with
kiln.kernels.tvm_provider, which the plan's `tvm:<name>` kernels resolve to. Nothing here
compiles: the host's processor and features are LLVM queries. A library built for another
processor (or a feature this one lacks) or another TVM is refused.

The executor calls the functions without their launchers where it can (`direct_call`): per
binding of its buffers, each step's arguments are shaped and converted to TVM tensors once, and
the graph inputs again only when a call brings other tensors than the last one (the engine
brings the same KV caches and input buffers every step), so a call is the function call alone.
A batch-1 decode step of a small model is mostly such calls: the demo model's executor spends
10 us of host time per step on 48 calls beside its ~0.25 ms of kernels (26 us when the graph
inputs were shaped per call; the launchers cost several times that).
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable, Mapping
from typing import Any

import torch

from kiln.errors import ArtifactError
from kiln.kernels.tvm_provider import shaped  # how the launcher presents an argument
from kiln.runtime.artifact import KERNELS_DIR, Artifact

BUILD_INFO = f"{KERNELS_DIR}/cpu/build.json"
LIBRARY = f"{KERNELS_DIR}/cpu/kernels.so"


def host() -> dict[str, Any]:
    """This machine as LLVM sees it: TVM version, target triple, processor name (mcpu) and the
    features that processor has."""
    import tvm
    from tvm.target import codegen

    mcpu = codegen.llvm_get_system_cpu()
    target = tvm.target.Target({"kind": "llvm", "mcpu": mcpu})
    return {
        "tvm": tvm.__version__,
        "triple": codegen.llvm_get_system_triple(),
        "mcpu": mcpu,
        "features": sorted(str(f) for f in codegen.llvm_get_cpu_features(target)),
    }


def check(built: dict[str, Any], here: dict[str, Any], where: str) -> None:
    """ArtifactError unless a library built for `built` runs on `here`."""
    fix = f"recompile the model here or run `kiln tune {where}` here"
    if built.get("tvm") != here["tvm"]:
        raise ArtifactError(f"'{where}' holds kernels built with TVM {built.get('tvm')}; this runtime has TVM "
                            f"{here['tvm']}: {fix}")
    missing = sorted(set(built.get("features", [])) - set(here["features"]))
    if built.get("mcpu") != here["mcpu"] or built.get("triple") != here["triple"] or missing:
        lacks = f" (this one lacks {', '.join(missing[:8])})" if missing else ""
        raise ArtifactError(
            f"'{where}' holds kernels built for processor {built.get('mcpu')} ({built.get('triple')}); this "
            f"machine is {here['mcpu']} ({here['triple']}){lacks}: {fix}"
        )


def install(artifact: Artifact) -> dict[str, int]:
    """Load the artifact's kernel library and serve its functions as `tvm:<name>`; ArtifactError
    when it has none or it was built for another processor. Returns the symbols its kernels
    serve at one value only (`{"BS": 16}`: paged attention built for that block size)."""
    from kiln.kernels import tvm_provider

    where = artifact.root
    if not artifact.has(BUILD_INFO) or not artifact.has(LIBRARY):
        raise ArtifactError(f"'{where}' is a cpu-target artifact without its kernel library ({LIBRARY}): "
                            "recompile the model")
    built = artifact.read_json(BUILD_INFO)
    check(built, host(), str(where))
    data = artifact.read_bytes(LIBRARY)
    import tvm.runtime

    fd, path = tempfile.mkstemp(prefix="kiln-tvm-", suffix=".so")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        module = tvm.runtime.load_module(path)
    finally:
        os.unlink(path)  # the loader has mapped it
    functions = {name: module[name] for name in built["kernels"]}  # a lookup costs ~12 us: once
    tvm_provider.register(functions, built["kernels"])
    for name, record in built["kernels"].items():
        by_rows = tuple((int(bound), functions[f]) for bound, f in record.get("by_rows", ()))
        _direct[name] = (functions[name], record, by_rows)
    _loaded.append(module)
    return fixed_symbols(built, str(where))


def direct_call(name: str, outs: list[Any], args: list[Any], per_call: list[int | None],
                per_call_outs: list[int | None]) -> DirectCall | None:
    """The call of loaded kernel `name` prepared once for a plan step whose buffers keep their
    tensors across calls (an executor's binding): the function (its `by_rows` choice made) and
    its arguments, shaped as its launch record's `present` says and converted to TVM tensors
    once, so a call skips the launcher's per-argument shaping and DLPack exchange. `per_call[i]`:
    where args[i] changes every call (a graph input: its index in the values `DirectCall` is
    called with), else None; `per_call_outs` the same for `outs` (an input written in place). None where the provider's launcher must serve the step: no loaded
    library has the kernel, an argument is not a tensor or needs a copy, or a `by_rows` choice
    depends on a per-call argument."""
    entry = _direct.get(name)
    if entry is None:
        return None
    fn, record, by_rows = entry
    ins, present = list(record["inputs"]), list(record["present"])
    passed = [(args[i], per_call[i], p) for i, p in zip(ins, present, strict=False)]
    passed += [(outs[j], per_call_outs[j], p) for j, p in zip(record["outputs"], present[len(ins):], strict=True)]
    call: list[Any] = []
    dynamic: list[tuple[int, int, str]] = []
    for pos, (t, where, p) in enumerate(passed):
        if where is not None:  # not known yet
            dynamic.append((pos, where, p))
            call.append(None)
            continue
        view = shaped(t, p) if isinstance(t, torch.Tensor) else None
        if view is None:
            return None
        call.append(_tvm_tensor(view))
    if by_rows:
        if dynamic and dynamic[0][0] == 0:
            return None
        first = passed[0][0]
        rows = first.numel() // max(first.shape[-1], 1) if first.dim() else 1
        fn = next((g for bound, g in by_rows if rows <= bound), fn)
    return DirectCall(fn, call, tuple(dynamic))


class DirectCall:
    """A loaded kernel's call with its arguments bound (`direct_call`); the caller runs
    `fn(*args)` once `bind` has put the per-call arguments in (again only when their tensors
    change: the engine passes the same KV caches and input buffers every step)."""

    __slots__ = ("fn", "args", "dynamic")

    def __init__(self, fn: Callable[..., Any], args: list[Any], dynamic: tuple[tuple[int, int, str], ...]):
        self.fn = fn
        """The library function."""
        self.args = args
        """Its arguments: TVM tensors; at `dynamic`'s positions those of the last `bind` (None before)."""
        self.dynamic = dynamic
        """(argument position, index in the caller's values, present) of each per-call argument."""

    def bind(self, values: list[Any]) -> bool:
        """Shape and convert the per-call arguments from `values` into `args`; False when one of
        them cannot be passed as it is (the launcher copies it)."""
        for pos, where, p in self.dynamic:
            view = shaped(values[where], p)
            if view is None:
                return False
            self.args[pos] = _tvm_tensor(view)
        return True

    def forget(self) -> None:
        """Drop the per-call arguments (they keep their tensors alive)."""
        for pos, _, _ in self.dynamic:
            self.args[pos] = None


def _tvm_tensor(t: torch.Tensor) -> Any:
    import tvm_ffi

    return tvm_ffi.from_dlpack(t)


def fixed_symbols(built: dict[str, Any], where: str) -> dict[str, int]:
    """The symbols build.json's kernel records fix ("fixed"), merged; ArtifactError when two
    kernels fix one symbol at different values (no step could run both)."""
    out: dict[str, int] = {}
    for name, record in built["kernels"].items():
        for sym, value in record.get("fixed", {}).items():
            if out.setdefault(sym, int(value)) != int(value):
                raise ArtifactError(f"'{where}': kernel {name} is built for {sym}={value}, another for "
                                    f"{sym}={out[sym]}; recompile the model")
    return out


_loaded: list[Any] = []
"""Loaded libraries, kept alive for the process (their functions are registered)."""
_direct: dict[str, tuple[Callable[..., Any], Mapping[str, Any], tuple[tuple[int, Callable[..., Any]], ...]]] = {}
"""Function name -> (function, launch record, by_rows functions) of the loaded libraries."""
