"""TVM kernels of the `cpu` target, one module per op family; each module exposes
`BUILDERS: dict[str, Builder]`, keyed by the IR op it computes. A builder takes an `OpInfo`
(the op node's input and result types, with symbolic dims such as "T", and its attributes) and
returns a `Kernel` specialized to its constants (hidden size, dtypes, eps, ...), or None when it
does not cover that node (the op then runs its torch reference, listed as a fallback).
A module whose schedules have knobs also exposes `KNOBS: dict[op, dict[knob, candidate values]]`
and its builders take `config` (knob -> value; None is the default schedule, which is what a
compile builds); `kiln tune` (kiln.codegen.cpu.tune) searches that space. A config changes the
schedule, never the function's name or numerics.
`kiln.codegen.cpu` compiles every kernel of a graph into one library; `kiln.kernels.tvm_provider`
launches them as `tvm:<name>`.

Rules every kernel here keeps:
- one PrimFunc, written in TVMScript with its CPU schedule in the loops themselves (parallel
  over rows or output blocks, vectorized over the contiguous inner axis), destination-passing:
  the buffers of `Kernel.inputs` (op input indices) then of `Kernel.outputs` (result indices);
- symbolic in every row dim (token count T, but also heads and batch): a function depends only
  on its constants, so one binary serves every step;
- every buffer except weights declares symbolic strides with a unit inner stride, so strided
  views (a slice of a merged QKV projection) pass without a copy; `Kernel.present` says how the
  launcher shapes each argument (`ROWS`: any rank as [A, B, N]; `MAT`: [M, N]; `AS_IS`);
- the same numerics as the op's torch reference: float32 arithmetic, rounding to a 16-bit
  dtype wherever torch rounds.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from kiln.ir.types import TensorType

AS_IS = "as_is"
"""The argument is passed with its own shape."""
ROWS = "rows"
"""The argument is passed as [A, B, N]: rank 1 as [1, 1, N], rank 2 [T, N] as [T, 1, N], rank 3
as is, higher ranks with their leading dims merged (a view when strides allow, else a copy)."""
MAT = "mat"
"""The argument is passed as [M, N], leading dims merged (a view when strides allow)."""

MODULES = ("norms", "elementwise", "fused", "rope", "linear", "quant_linear", "lora")
"""Kernel modules of this package whose builders take an OpInfo."""
ATTENTION = "attention"
"""The optional paged-attention module (same contract; absent in a build without it)."""

FLOATS = ("float32", "float16", "bfloat16")


@dataclass(frozen=True)
class OpInfo:
    """What a builder sees of an op node."""

    op: str
    """IR op name."""
    inputs: tuple[TensorType | None, ...]
    """Input types; None for an input that is not a tensor (a scalar constant)."""
    outputs: tuple[TensorType, ...]
    """Result types (one per result of a multi-result op)."""
    attrs: Mapping[str, Any] = field(default_factory=dict)
    """The node's attributes."""
    fixed: Mapping[str, int] = field(default_factory=dict)
    """Symbolic dims the lowering replaced by constants in these types (the block size "BS" for
    paged attention): a kernel built from them serves only those values."""
    consts: tuple[Any, ...] = ()
    """Per input, the value of a scalar constant (None where the input is a tensor; empty when
    the node has none): a kernel may build it in."""


@dataclass(frozen=True)
class Kernel:
    """One specialization: a compiled function and how to call it."""

    name: str
    """Unique function name: the op and every constant it was specialized to."""
    func: Any
    """The tvm.tirx.PrimFunc."""
    inputs: tuple[int, ...]
    """Op inputs passed as buffers, in order."""
    outputs: tuple[int, ...]
    """Op results passed as buffers after them (none for an in-place op)."""
    present: tuple[str, ...]
    """Per passed buffer (inputs then outputs): AS_IS, ROWS or MAT."""
    info: OpInfo | None = None
    """The node it was built for (set by `build`), so a tuned schedule can rebuild it."""
    by_rows: tuple[tuple[int, str], ...] = ()
    """Shape buckets with a schedule of their own: (max rows, function name) pairs, the first that
    holds a call's row count wins, else this function runs (`kiln tune`'s decode bucket)."""
    fixed: Mapping[str, int] = field(default_factory=dict)
    """Symbols this kernel serves at one value only (OpInfo.fixed); the runtime refuses others."""

    def table(self) -> dict[str, Any]:
        """The launch record stored in the artifact's build.json."""
        record = {"inputs": list(self.inputs), "outputs": list(self.outputs), "present": list(self.present)}
        record |= {"by_rows": [list(b) for b in self.by_rows]} if self.by_rows else {}
        return record | ({"fixed": dict(self.fixed)} if self.fixed else {})


Builder = Callable[..., Kernel | None]
"""builder(info) -> Kernel | None; builder(info, config) too for an op with knobs."""


@functools.cache
def builders() -> dict[str, Builder]:
    """Every builder by IR op name (importing the kernel modules, and tvm, once)."""
    table: dict[str, Builder] = {}
    for name in MODULES:
        module = importlib.import_module(f"{__name__}.{name}")
        table.update(module.BUILDERS)
        _knobs.update(getattr(module, "KNOBS", {}))
    try:
        attention = importlib.import_module(f"{__name__}.{ATTENTION}")
    except ModuleNotFoundError as e:
        if e.name != f"{__name__}.{ATTENTION}":
            raise
    else:
        table.update(attention.BUILDERS)
    return table


def build(info: OpInfo, config: Mapping[str, Any] | None = None) -> Kernel | None:
    """The kernel for an op node, or None when no builder covers it; `config` picks a schedule
    of an op with knobs (ValueError when it does not fit the node's shape).

    A builder is a pure function of (info, config), and parsing its TVMScript costs ~0.2 s, so
    results are memoized by that content: a graph's 32 layers, and every model compiled in one
    process, build each distinct kernel once."""
    key = _key(info, config)
    if key not in _built:
        _built[key] = _build(info, config)
    kernel = _built[key]
    return kernel if kernel is None else dataclasses.replace(kernel, info=info)


def _key(info: OpInfo, config: Mapping[str, Any] | None) -> str:
    """The content of a build request, attributes and config in a canonical order."""
    return repr((info.op, info.inputs, info.outputs, sorted(info.attrs.items()), sorted(info.fixed.items()),
                 info.consts, sorted((config or {}).items())))


def _build(info: OpInfo, config: Mapping[str, Any] | None) -> Kernel | None:
    b = builders().get(info.op)
    kernel = (b(info, config) if config else b(info)) if b is not None else None
    if kernel is None:
        return None
    return dataclasses.replace(kernel, info=info, **({"fixed": dict(info.fixed)} if info.fixed else {}))


_built: dict[str, Kernel | None] = {}
"""`build`'s memo: request content -> kernel (None: no builder covers it)."""


def knobs(op: str) -> dict[str, tuple]:
    """The schedule knobs of op's kernels and their candidate values ({} when it has none)."""
    builders()
    return dict(_knobs.get(op, {}))


_knobs: dict[str, dict[str, tuple]] = {}
"""Registry of the kernel modules' KNOBS, filled by `builders`."""


def name_of(*parts: Any) -> str:
    """A C identifier from an op name and its constants: rms_norm_h64_float32_e1em05."""
    text = "_".join(str(p) for p in parts if p is not None and p != "")
    return text.replace("-", "m").replace("+", "").replace(".", "p")


def vec_width(n: int, widest: int = 16) -> int:
    """The widest power-of-two vector width up to `widest` that divides n."""
    v = widest
    while v > 1 and n % v:
        v //= 2
    return v


def last_dim(t: TensorType | None) -> int | None:
    """The static last dim of a tensor type, or None (symbolic, or not a tensor)."""
    if t is None or not t.shape or not isinstance(t.shape[-1], int):
        return None
    return t.shape[-1]


def short(dtype: str) -> str:
    """A dtype's short name for kernel names: f32, f16, bf16, i64."""
    return {"float32": "f32", "float16": "f16", "bfloat16": "bf16", "int64": "i64", "int32": "i32"}.get(dtype, dtype)


def keep_params(func: Any, keep: tuple[int, ...]) -> Any:
    """`func` with only its params at `keep`: one TVMScript body serves the variants of an op
    (with or without weight, bias), the params a variant does not read dropped."""
    import tvm

    params = [func.params[i] for i in keep]
    return tvm.tirx.PrimFunc(params, func.body, func.ret_type, attrs=func.attrs)
