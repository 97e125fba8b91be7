"""Runs an execution plan (runtime/plan.py): destination-passing kernel calls over an arena
allocated once.

At load: kernels resolve through the provider registry, weights and constants go to the
device (rank-0 constants as device tensors, plus a host number for kernels that take one), and
the arena is laid out for the limits given (the largest bindings of T, S, R, ... a call may
have). Per call: symbols are read off the input shapes by the plan's rules (no sympy); the
buffer views and resolved attributes of that binding tuple are built once and cached, so a
repeated shape (a decode bucket) costs no re-slicing; a call larger than the limits grows the
arena (one new allocation) and is the new limit. Each step is then one (function, arguments)
pair: a TVM kernel's call with its arguments bound (cpu target), else its launcher. A graph
input that is the last call's tensor, or a new view of the same memory (the engine's KV caches
and input buffers), is taken as it is: only inputs that changed are checked and rebound, so a
batch-1 decode step of the demo model costs ~10 us of host time here beside its kernels.
Only the last call's inputs stay referenced.

Outputs are views of arena memory: the next `run` overwrites them. Consume (or clone) them
before calling again; the engine samples from the logits right away, `CompiledModel.forward`
returns a copy. For the same reason one caller runs an executor at a time.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from kiln.errors import ArtifactError, KilnError
from kiln.ir.ops import OPS
from kiln.ir.types import PACKED, TensorType, torch_dtype
from kiln.kernels import Launcher
from kiln.runtime import tvm_library
from kiln.runtime.plan import Buffer, ExecutionPlan, evaluate, validate
from kiln.runtime.providers import resolve
from kiln.runtime.threads import TvmThreads

ALIGN = 256
"""Byte alignment of each slot in the arena."""
CACHED_BINDINGS = 256
"""Binding tuples whose views are kept (least recently used dropped first)."""


def _view_fn(op: str):
    # A reshape must stay a view of the arena: torch's reshape may silently copy.
    if op == "reshape":
        return lambda x, shape: x.view(shape)
    return OPS[op].impl


@dataclass
class _Binding:
    """Everything that depends only on the symbol values of a call."""

    values: list[Any]
    """Per buffer: its tensor (params, consts, arena views, their views); the inputs and their
    views of this binding's last call while it is the executor's last binding, else None."""
    attrs: list[dict[str, Any]]
    """Per step, its attributes with forms evaluated."""
    view_attrs: dict[int, dict[str, Any]]
    """Per view of an input, its attributes with forms evaluated."""
    input_shapes: list[tuple[int, ...]]
    """Expected shape of each input, in `PlanExecutor.input_order`."""
    direct: list[tvm_library.DirectCall | None]
    """Per step, its TVM kernel's call with the arguments bound (cpu target), or None: the
    launcher serves it."""
    calls: list[tuple[Callable[..., Any], list[Any]]]
    """Per step, what `run` calls: (function, arguments), a bound TVM call where its per-call
    arguments are bound (`direct`), else its launcher over `values`."""


class PlanExecutor:
    """Holds a plan, its weights, constants and arena on one device, and runs it on inputs."""

    def __init__(self, plan: ExecutionPlan, weights: Mapping[str, torch.Tensor],
                 device: str | torch.device = "cpu", limits: Mapping[str, int] | None = None,
                 tuning: Mapping[str, Any] | None = None):
        """`limits`: the largest value of each symbol a call will have (T = max tokens per step,
        S and R = max sequences, NB, BS, MB); symbols left out are sized by the first call.
        `tuning`: the artifact's tuning.json, which configures the kernels that read it."""
        self.plan = plan
        self.device = torch.device(device)
        if self.device.type == "cuda" and self.device.index is None:  # compare equal to tensors' devices
            self.device = torch.device("cuda", torch.cuda.current_device())
        validate(plan)
        self.launchers: list[Launcher] = [resolve(s.kernel, tuning) for s in plan.steps]
        on_tvm = self.device.type == "cpu" and any(s.kernel.startswith("tvm:") for s in plan.steps)
        self.tvm_threads = TvmThreads() if on_tvm else None
        """Sizes TVM's pool to the cores other processes leave idle before each call (cpu target)."""
        self.input_types: dict[str, TensorType] = plan.input_types
        self.input_order = [(b.name, i, torch_dtype(b.dtype)) for i, b in enumerate(plan.buffers) if b.kind == "input"]
        written = {o for s in plan.steps for o in s.outputs}
        self._written_inputs = {i for _, i, _ in self.input_order if i in written}
        self._rules = [(r.symbol, r.input, r.axis, r.coeff, r.offset) for r in plan.bindings]
        self._arena_ids = [i for i, b in enumerate(plan.buffers) if b.kind == "arena"]
        self._input_views = [i for i, b in enumerate(plan.buffers) if b.kind == "view" and self._root(i).kind == "input"]
        self._input_view_set = set(self._input_views)
        self._per_call = self._input_view_set | {i for _, i, _ in self.input_order}
        self._view_fns = {i: _view_fn(b.op) for i, b in enumerate(plan.buffers) if b.kind == "view"}
        n = len(plan.buffers)
        self._resident: list[Any] = [None] * n
        host: list[Any] = []
        for i, b in enumerate(plan.buffers):
            if b.kind == "param":
                if b.name not in weights:
                    raise ArtifactError(f"the plan needs weight '{b.name}', which the artifact's weights lack")
                w = weights[b.name]
                self._resident[i] = w if w.device == self.device else w.to(self.device)
            elif b.kind == "const":
                self._resident[i] = torch.tensor(b.value, dtype=torch_dtype(b.dtype), device=self.device)
        # Scalars a kernel takes by value live after the buffers, as host numbers.
        self._steps: list[tuple[Launcher, list[int], list[int]]] = []
        for step, fn in zip(plan.steps, self.launchers, strict=True):
            ins = list(step.inputs)
            for pos in step.scalars:
                ins[pos] = n + len(host)
                host.append(plan.buffers[step.inputs[pos]].value)
            self._steps.append((fn, ins, list(step.outputs)))
        self._resident.extend(host)
        self._readers: dict[int, list[int]] = {i: [] for i in self._per_call}
        """Per input (or view of one): the steps that take it."""
        for s, (_, ins, outs) in enumerate(self._steps):
            for i in {*ins, *outs} & self._per_call:
                self._readers[i].append(s)
        self.limits: dict[str, int] = dict(limits or {})
        self._slot_bytes: list[int] = []
        self._offsets: list[int] = []
        self.arena: torch.Tensor | None = None
        self._cache: OrderedDict[tuple[int, ...], _Binding] = OrderedDict()
        self._last: _Binding | None = None
        """The binding of the last call: the one whose values hold that call's inputs."""
        self.step_timer: Callable[[int, list[Any], list[Any], float], None] | None = None
        """Benchmarks only (benchmarks/cpu_floors.py): when set, `run` times each step as it
        runs (its bound TVM call, else its launcher) and calls step_timer(step index, outputs,
        arguments, seconds) after it; None (the default) costs `run` nothing per step."""
        if all(s in self.limits for s in plan.symbols):
            self._layout(self.limits)

    def _root(self, i: int) -> Buffer:
        b = self.plan.buffers[i]
        while b.kind == "view":
            b = self.plan.buffers[b.base]
        return b

    # -- the arena ------------------------------------------------------------------------------

    def _layout(self, bindings: Mapping[str, int]) -> None:
        """Lay the slots out for `bindings` (the new limits) and allocate the arena once."""
        self._slot_bytes = [max((evaluate(f, bindings) for f in forms), default=0) for forms in self.plan.slots]
        self._offsets, total = [], 0
        for size in self._slot_bytes:
            self._offsets.append(total)
            total += -(-size // ALIGN) * ALIGN
        self.arena = torch.empty(total, dtype=torch.uint8, device=self.device)
        self.limits = dict(bindings)
        self._cache.clear()

    def _arena_view(self, b: Buffer, bindings: Mapping[str, int]) -> torch.Tensor:
        shape = [evaluate(d, bindings) for d in b.shape]
        dtype = torch_dtype(b.dtype)
        if b.dtype in PACKED and shape:
            shape[-1] //= PACKED[b.dtype]
        numel = 1
        for d in shape:
            numel *= d
        start = self._offsets[b.slot]
        raw = self.arena[start : start + numel * dtype.itemsize]
        return raw.view(dtype).view(shape)

    def reserve(self, limits: Mapping[str, int]) -> None:
        """Make the arena hold calls up to `limits` (no allocation when it already does)."""
        merged = {s: max(self.limits.get(s, 0), limits.get(s, 0)) for s in {*self.limits, *limits}}
        if self.arena is None or any(
            evaluate(f, merged) > size for forms, size in zip(self.plan.slots, self._slot_bytes, strict=True) for f in forms
        ):
            self._layout(merged)

    def _binding(self, key: tuple[int, ...], bindings: dict[str, int]) -> _Binding:
        self.reserve(bindings)
        plan = self.plan
        values = list(self._resident)
        for i in self._arena_ids:
            values[i] = self._arena_view(plan.buffers[i], bindings)
        view_attrs: dict[int, dict[str, Any]] = {}
        for i, b in enumerate(plan.buffers):
            if b.kind != "view":
                continue
            attrs = {**b.attrs, **_resolve(b.dim_attrs, bindings)}
            if i in self._input_view_set:
                view_attrs[i] = attrs
            else:
                values[i] = self._apply_view(i, values[b.base], attrs)
        entry = _Binding(
            values=values,
            attrs=[{**s.attrs, **_resolve(s.dim_attrs, bindings)} if s.dim_attrs else s.attrs for s in plan.steps],
            view_attrs=view_attrs,
            input_shapes=[tuple(evaluate(d, bindings) for d in plan.buffers[i].shape) for _, i, _ in self.input_order],
            direct=[self._direct_call(s, values) for s in range(len(plan.steps))],
            calls=[],
        )
        entry.calls = [self._launch(s, entry) for s in range(len(plan.steps))]
        for s, direct in enumerate(entry.direct):
            if direct is not None and not direct.dynamic:
                entry.calls[s] = (direct.fn, direct.args)
        self._cache[key] = entry
        if len(self._cache) > CACHED_BINDINGS:
            self._cache.popitem(last=False)
        return entry

    def _direct_call(self, s: int, values: list[Any]) -> tvm_library.DirectCall | None:
        """Step s's call bound to this binding's tensors when a loaded TVM library serves it: a
        batch-1 decode step of a small model is mostly launch overhead (the launcher shapes
        and exchanges every argument per call)."""
        provider, _, name = self.plan.steps[s].kernel.partition(":")
        if provider != "tvm":
            return None
        _, ins, outs = self._steps[s]
        per_call = [[i if i in self._per_call else None for i in ids] for ids in (ins, outs)]
        return tvm_library.direct_call(name, [values[o] for o in outs], [values[a] for a in ins], *per_call)

    def _launch(self, s: int, entry: _Binding) -> tuple[Callable[..., Any], list[Any]]:
        """Step s through its launcher, over the binding's values as they are when it runs."""
        fn, ins, outs = self._steps[s]
        values, attrs = entry.values, entry.attrs[s]
        return lambda: fn([values[o] for o in outs], [values[a] for a in ins], attrs), []

    def _apply_view(self, i: int, base: torch.Tensor, attrs: dict[str, Any]) -> torch.Tensor:
        try:
            return self._view_fns[i](base, **attrs)
        except RuntimeError as e:
            b = self.plan.buffers[i]
            raise ArtifactError(f"plan buffer {i} ({b.op} view of buffer {b.base}) is not a view: {e}") from None

    # -- running --------------------------------------------------------------------------------

    def bind(self, inputs: Mapping[str, torch.Tensor]) -> dict[str, int]:
        """Symbol values read off the input shapes by the plan's binding rules."""
        bindings: dict[str, int] = {}
        for sym, name, axis, coeff, offset in self._rules:
            t = inputs.get(name)
            if t is None:
                raise KilnError(f"missing graph input '{name}' (expects {self.input_types[name]})")
            if t.dim() <= axis:
                raise KilnError(f"input '{name}' has shape {tuple(t.shape)}, expected {self.input_types[name]}")
            value, rem = divmod(t.shape[axis] - evaluate(offset, bindings), coeff)
            if rem or value < 0:
                raise KilnError(f"input '{name}' has size {t.shape[axis]} where {self.input_types[name]} is expected")
            bindings[sym] = value
        return bindings

    def run(self, inputs: Mapping[str, torch.Tensor]) -> list[torch.Tensor]:
        """Execute every step; returns the plan's outputs (views of the arena, valid until the
        next call). Inputs already on the device are used as they are (the KV caches are
        written in place); others are copied to it."""
        bindings = self.bind(inputs)
        key = tuple(bindings[s] for s in self.plan.symbols)
        entry = self._cache.get(key)
        if entry is None:
            entry = self._binding(key, bindings)
        if entry is not self._last:
            if self._last is not None:
                self._forget_inputs(self._last)
            self._last = entry
        values = entry.values  # the last call's inputs: one passed again (or its memory) was checked then
        device = self.device
        changed: list[int] = []
        for (name, i, dtype), shape in zip(self.input_order, entry.input_shapes, strict=True):
            t = inputs.get(name)
            if t is None:
                raise KilnError(f"missing graph input '{name}' (expects {self.input_types[name]})")
            last = values[i]
            if t is last:
                continue
            if t.dtype != dtype or t.shape != shape:
                raise KilnError(
                    f"input '{name}' is {t.dtype} {tuple(t.shape)}, expected {self.input_types[name]} = {shape}"
                )
            if t.device != device:
                if i in self._written_inputs:
                    raise ValueError(f"input '{name}' is written in place and must be on {device}, not {t.device}")
                t = t.to(device)
            elif last is not None and t.data_ptr() == last.data_ptr() and t.stride() == last.stride():
                continue  # the last call's memory (a new view of the model runner's buffer): the same input
            values[i] = t
            changed.append(i)
        if changed:
            self._rebind(entry, changed)
        if self.tvm_threads is not None:
            self.tvm_threads.fit()
        if self.step_timer is not None:
            self._run_timed(values, entry)
        else:
            for fn, args in entry.calls:
                fn(*args)
        return [values[o] for o in self.plan.outputs]

    def _rebind(self, entry: _Binding, changed: list[int]) -> None:
        """After the inputs `changed` took new tensors: their views, then the calls of the steps
        that take them (a bound TVM call unless one of its arguments needs the launcher's copy)."""
        values, done = entry.values, set(changed)
        for i in self._input_views:  # in plan order: a view's base comes first
            base = self.plan.buffers[i].base
            if base in done:
                values[i] = self._apply_view(i, values[base], entry.view_attrs[i])
                changed.append(i)
                done.add(i)
        for s in sorted({s for i in changed for s in self._readers[i]}):
            direct = entry.direct[s]
            entry.calls[s] = (direct.fn, direct.args) if direct is not None and direct.bind(values) else self._launch(s, entry)

    def _forget_inputs(self, entry: _Binding) -> None:
        """Drop the inputs (and their views and converted arguments) that a binding holds from
        its last call, when a call of another binding follows: only the last call's stay alive."""
        for i in self._per_call:
            entry.values[i] = None
        for direct in entry.direct:
            if direct is not None:
                direct.forget()

    def _run_timed(self, values: list[Any], entry: _Binding) -> None:
        """`run`'s step loop with each step timed for `step_timer` (the same calls)."""
        timer, clock = self.step_timer, time.perf_counter
        for s, ((fn, args), (_, ins, outs)) in enumerate(zip(entry.calls, self._steps, strict=True)):
            t = clock()
            fn(*args)
            dt = clock() - t
            timer(s, [values[o] for o in outs], [values[a] for a in ins], dt)


def _resolve(dim_attrs: Mapping[str, Any], bindings: Mapping[str, int]) -> dict[str, Any]:
    return {
        k: [evaluate(d, bindings) for d in v] if isinstance(v, list) else evaluate(v, bindings)
        for k, v in dim_attrs.items()
    }
