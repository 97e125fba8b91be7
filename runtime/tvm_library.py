"""The compiled TVM kernels of a cpu-target artifact, loaded so serving compiles nothing.

    kernels/cpu/kernels.so     one shared library: every kernel of the plan, by function name
    kernels/cpu/build.json     what it was built for (TVM version, LLVM triple, mcpu, the CPU
                               features it may use) and each function's launch record

At load the library is read through the artifact (its hash checked) into a private temporary
file and opened with TVM's runtime module loader; its functions are registered with
kiln.kernels.tvm_provider, which the plan's `tvm:<name>` kernels resolve to. Nothing here
compiles: the host's processor and features are LLVM queries. A library built for another
processor (or a feature this one lacks) or another TVM is refused.
"""

from __future__ import annotations

import os
import tempfile
from typing import Any

from kiln.errors import ArtifactError
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
    tvm_provider.register({name: module[name] for name in built["kernels"]}, built["kernels"])
    _loaded.append(module)
    return fixed_symbols(built, str(where))


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
