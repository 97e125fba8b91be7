"""The execution plan (the artifact's plan.json, format 2): codegen writes it, the runtime runs it.

Buffers. Every value the plan touches is a numbered buffer with a dtype and a symbolic shape:

    input   a graph input, bound by name at each call (the engine's step inputs and KV caches)
    param   a weight, read by name from the artifact's safetensors at load
    const   a literal (rank 0: a host number for kernels that take one, else a device tensor)
    arena   an op result, placed in a slot of the arena
    view    a view (reshape/permute/expand/slice) of another buffer: no storage of its own

A multi-result op writes several arena buffers; a projection of one result, and the result of
an in-place write, are the same buffer as what they name (the written operand), so neither
appears as a buffer of its own.

Arena. Slots are reused across non-overlapping lifetimes (codegen/memory_plan.py). A slot's
size is the largest byte count of the buffers it holds; the runtime evaluates them at the
largest bindings it will see and lays the slots out once, at aligned offsets:

    arena: | slot 0 | pad | slot 1 | pad | slot 2 | ...     one allocation per device
    buffer b in slot s, at bindings B: arena[off(s) : off(s) + nbytes(b, B)] viewed as b

Forms. A dim is an int or an affine form {"const": c, SYMBOL: coeff, ...} ({"const": 1, "T":
2} is 2*T+1); a byte count may also hold products of symbols ({"S*MB": 4} is 4*S*MB). Symbols
(T, S, R, NB, BS, MB) are bound from input shapes by the plan's rules:
symbol = (input.shape[axis] - offset) / coeff. Evaluating a form needs no sympy.

Steps are destination-passing: kernel(outputs, inputs, attrs) writes its output buffers. The
kernel id carries its provider (`torch:rms_norm`; `triton:`, `tvm:`, `aoti:` for compiled
targets; see runtime/providers.py).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from kiln.errors import ArtifactError
from kiln.ir.ops import OPS
from kiln.ir.step_inputs import STEP_INPUTS, is_cache_input, is_lora_input
from kiln.ir.types import DTYPES, TensorType

PLAN_FORMAT = 2
BUFFER_KINDS = ("input", "param", "const", "arena", "view")
_REQUIRED = frozenset({"kind", "dtype", "shape", "kernel", "inputs", "outputs"})

Form = int | dict[str, int]
"""An int, or {"const": c, "T": a, "S*MB": b, ...}: c + a*T + b*S*MB."""


def evaluate(form: Form, bindings: Mapping[str, int]) -> int:
    """The value of a form once its symbols are bound (KeyError names an unbound symbol)."""
    if isinstance(form, int):
        return form
    total = 0
    for key, coeff in form.items():
        if key == "const":
            total += coeff
            continue
        for sym in key.split("*"):
            coeff *= bindings[sym]
        total += coeff
    return total


def form_str(form: Form) -> int | str:
    """An int, or the form as an IR dim string ("S+1", "2*T")."""
    if isinstance(form, int):
        return form
    terms = [
        (k if c == 1 else f"{c}*{k}")
        for k, c in form.items()
        if k != "const" and c
    ]
    if form.get("const"):
        terms.append(str(form["const"]))
    return "+".join(terms).replace("+-", "-") or 0


def form_symbols(form: Form) -> set[str]:
    """The symbols a form mentions."""
    if isinstance(form, int):
        return set()
    return {s for k in form if k != "const" for s in k.split("*")}


@dataclass
class Buffer:
    """One value of the plan (see the module docstring for the kinds)."""

    kind: str
    """input | param | const | arena | view."""
    dtype: str
    """IR dtype name."""
    shape: list[Form]
    """Logical shape, each dim an int or an affine form."""
    name: str | None = None
    """Graph input or weight name (input, param)."""
    value: Any = None
    """The literal (const): a number or a nested list."""
    slot: int | None = None
    """Arena slot (arena)."""
    base: int | None = None
    """The viewed buffer (view)."""
    op: str | None = None
    """The view op: reshape | permute | expand | slice (view)."""
    attrs: dict[str, Any] = field(default_factory=dict)
    """The view op's attributes with constant values (view)."""
    dim_attrs: dict[str, Any] = field(default_factory=dict)
    """The view op's attributes holding forms, evaluated per binding (view)."""

    @property
    def type(self) -> TensorType:
        """The buffer's type with symbolic dims as IR dim strings."""
        return TensorType(self.dtype, tuple(form_str(d) for d in self.shape))


@dataclass
class Step:
    """One kernel call, destination-passing."""

    kernel: str
    """Kernel id "provider:name" ("torch:linear" runs the IR op's torch reference)."""
    inputs: list[int]
    """Buffers read, in the op's operand order."""
    outputs: list[int]
    """Buffers written: fresh arena buffers, or the written operands of an in-place op."""
    attrs: dict[str, Any] = field(default_factory=dict)
    """Attributes with constant values."""
    dim_attrs: dict[str, Any] = field(default_factory=dict)
    """Attributes holding forms (or lists of forms), evaluated per binding."""
    scalars: list[int] = field(default_factory=list)
    """Operand positions passed as host numbers (rank-0 consts of kernels that take them)."""


@dataclass
class BindingRule:
    """symbol = (inputs[input].shape[axis] - offset) / coeff."""

    symbol: str
    input: str
    axis: int
    coeff: int = 1
    offset: Form = 0
    """A form in symbols bound by earlier rules."""


@dataclass
class ExecutionPlan:
    """A whole forward pass."""

    target: str
    """The target that lowered it."""
    symbols: list[str]
    """Every symbol, in the order of the runtime's binding tuples."""
    bindings: list[BindingRule]
    """How each symbol is read off the inputs, in order."""
    buffers: list[Buffer]
    """Every value; a view comes after its base."""
    slots: list[list[Form]]
    """Per arena slot, the byte counts of the buffers it holds (its size is their max)."""
    steps: list[Step]
    outputs: list[int]
    """Buffers returned, in order."""

    @functools.cached_property
    def inputs(self) -> dict[str, int]:
        """Graph input name -> buffer."""
        return {b.name: i for i, b in enumerate(self.buffers) if b.kind == "input"}

    @functools.cached_property
    def params(self) -> dict[str, int]:
        """Weight name -> buffer."""
        return {b.name: i for i, b in enumerate(self.buffers) if b.kind == "param"}

    @functools.cached_property
    def input_types(self) -> dict[str, TensorType]:
        """Graph input name -> type (symbolic dims as IR dim strings)."""
        return {b.name: b.type for b in self.buffers if b.kind == "input"}

    @functools.cached_property
    def attention_window(self) -> int | None:
        """The widest sliding window of the steps that read the KV caches (attention), in
        tokens: keys older than that are never read again, so their blocks may be freed. None
        when some layer attends globally (or none reads a cache): every block stays needed."""
        def cache_of(i: int) -> bool:
            while self.buffers[i].kind == "view":
                i = self.buffers[i].base
            b = self.buffers[i]
            return b.kind == "input" and is_cache_input(b.name)

        windows = [int(s.attrs.get("sliding_window") or 0) for s in self.steps
                   if any(cache_of(i) for i in s.inputs) and not any(cache_of(o) for o in s.outputs)]
        return max(windows) if windows and min(windows) > 0 else None

    def to_dict(self) -> dict[str, Any]:
        """The JSON form (plan.json); fields of buffers and steps at their defaults are left out."""
        data = dataclasses.asdict(self)
        for key in ("buffers", "steps"):
            data[key] = [{k: v for k, v in d.items() if k in _REQUIRED or v not in (None, {}, [])} for d in data[key]]
        return {"format": PLAN_FORMAT, **data}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ExecutionPlan:
        """Read the JSON form; ValueError for another format, KeyError/TypeError for a
        malformed plan."""
        if data.get("format") != PLAN_FORMAT:
            raise ValueError(f"plan format {data.get('format')!r} is not {PLAN_FORMAT}")
        buffers = [Buffer(**b) for b in data["buffers"]]
        for i, b in enumerate(buffers):
            if b.kind not in BUFFER_KINDS:
                raise ValueError(f"buffer {i} has kind {b.kind!r}; expected one of {', '.join(BUFFER_KINDS)}")
        return cls(
            target=data["target"],
            symbols=list(data["symbols"]),
            bindings=[BindingRule(**r) for r in data["bindings"]],
            buffers=buffers,
            slots=[list(s) for s in data["slots"]],
            steps=[Step(**s) for s in data["steps"]],
            outputs=list(data["outputs"]),
        )


def load_plan(artifact: Any) -> ExecutionPlan:
    """The plan of an opened artifact (runtime.artifact.Artifact), read, hashed and validated
    (`validate`, and every graph input one the engine provides): ArtifactError naming plan.json for anything a request would otherwise trip over."""
    from kiln.runtime.artifact import PLAN

    path = artifact.root / PLAN
    data = artifact.read_json(PLAN)
    try:
        if not isinstance(data, dict):
            raise TypeError("not a JSON object")
        plan = ExecutionPlan.from_dict(data)
        validate(plan)
        for i, b in enumerate(plan.buffers):
            if b.kind == "input" and b.name not in STEP_INPUTS and not is_cache_input(b.name) \
                    and not is_lora_input(b.name):
                raise ArtifactError(
                    f"buffer {i} is input '{b.name}', which the runtime does not provide (it provides "
                    f"{', '.join(STEP_INPUTS)}, k_cache.N / v_cache.N and lora.* slot stacks)"
                )
    except ArtifactError as e:
        raise ArtifactError(f"'{path}' is invalid: {e}; recompile the artifact") from None
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise ArtifactError(f"'{path}' is malformed ({e!r}); recompile the artifact") from None
    return plan


def _is_index(i: Any, n: int) -> bool:
    return isinstance(i, int) and not isinstance(i, bool) and 0 <= i < n


def validate(plan: ExecutionPlan) -> None:
    """ArtifactError for a plan whose references do not hold together: buffer, slot and view
    indices in range, kinds and dtypes known, step arities
    as the op registry declares them, kernel ids of the form provider:name. (Whether a kernel
    resolves is checked when the executor resolves it, also at load.)"""
    n = len(plan.buffers)
    for i, b in enumerate(plan.buffers):
        if b.dtype not in DTYPES:
            raise ArtifactError(f"buffer {i} has dtype {b.dtype!r}")
        if not isinstance(b.shape, list) or not all(isinstance(d, int | dict) for d in b.shape):
            raise ArtifactError(f"buffer {i} has shape {b.shape!r}")
        if b.kind == "arena" and not _is_index(b.slot, len(plan.slots)):
            raise ArtifactError(f"buffer {i} is in slot {b.slot!r}, but the plan has {len(plan.slots)} slots")
        if b.kind == "view" and not (_is_index(b.base, i) and b.op in OPS):
            raise ArtifactError(f"buffer {i} is a view of buffer {b.base!r} by op {b.op!r}: not an earlier buffer")
        if b.kind in ("input", "param") and not (isinstance(b.name, str) and b.name):
            raise ArtifactError(f"buffer {i} ({b.kind}) has no name")
    for j, s in enumerate(plan.steps):
        prefix, sep, name = s.kernel.partition(":") if isinstance(s.kernel, str) else ("", "", "")
        if not (prefix and sep and name):
            raise ArtifactError(f"step {j} calls kernel {s.kernel!r}; kernel ids are 'provider:name'")
        for i in [*s.inputs, *s.outputs]:
            if not _is_index(i, n):
                raise ArtifactError(f"step {j} ({s.kernel}) names buffer {i!r}; the plan has {n}")
        if not s.outputs:
            raise ArtifactError(f"step {j} ({s.kernel}) writes no buffer")
        op = OPS.get(name) if prefix == "torch" else None
        if op is not None and op.arity is not None:
            lo, hi = op.arity if isinstance(op.arity, tuple) else (op.arity, op.arity)
            if not lo <= len(s.inputs) <= hi:
                want = str(lo) if lo == hi else f"{lo} to {hi}"
                raise ArtifactError(f"step {j} ({s.kernel}) has {len(s.inputs)} inputs; op '{name}' takes {want}")
        for i in s.outputs:
            if plan.buffers[i].kind in ("param", "const"):
                raise ArtifactError(f"step {j} ({s.kernel}) writes {plan.buffers[i].kind} buffer {i}")
        if any(not _is_index(p, len(s.inputs)) or plan.buffers[s.inputs[p]].kind != "const" for p in s.scalars):
            raise ArtifactError(f"step {j} ({s.kernel}) passes a non-constant operand as a host number")
    if not plan.outputs:
        raise ArtifactError("the plan has no outputs")
    for i in plan.outputs:
        if not _is_index(i, n):
            raise ArtifactError(f"plan output names buffer {i!r}; the plan has {n}")
    inputs = set(plan.inputs)
    symbols = set(plan.symbols)
    for r in plan.bindings:
        if r.input not in inputs or r.coeff == 0:
            raise ArtifactError(f"symbol {r.symbol} is bound from '{r.input}', which is not a graph input")
        if r.symbol not in symbols or not isinstance(r.axis, int):
            raise ArtifactError(f"binding rule {r.symbol} from '{r.input}' axis {r.axis!r} is malformed")
