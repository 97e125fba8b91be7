"""Runs an execution plan: kernel calls over a flat list of buffer slots."""

from __future__ import annotations

from collections.abc import Mapping

import torch

from kiln.errors import ArtifactError
from kiln.ir.interpreter import bind_symbols
from kiln.ir.ops import OPS, OpDef, resolve_attrs
from kiln.ir.types import TensorType, torch_dtype
from kiln.runtime.plan import ExecutionPlan


def _kernel(kernel: str) -> OpDef:
    kind, _, name = kernel.partition(":")
    if kind != "torch" or name not in OPS:
        raise ArtifactError(f"plan calls kernel '{kernel}', which this runtime does not provide")
    return OPS[name]


class PlanExecutor:
    """Holds a plan, its weights and constants on one device, and runs it on inputs."""

    def __init__(self, plan: ExecutionPlan, weights: Mapping[str, torch.Tensor], device: str | torch.device = "cpu"):
        self.plan = plan
        self.device = torch.device(device)
        self.ops = [_kernel(s.kernel) for s in plan.steps]
        self.input_types = {k: TensorType(d, tuple(s)) for k, (d, s) in plan.input_types.items()}
        self.resident: list[object] = [None] * plan.num_slots
        for name, slot in plan.params.items():
            self.resident[slot] = weights[name].to(self.device)
        for slot, value, dtype, shape in plan.consts:
            self.resident[slot] = value if not shape else torch.tensor(value, dtype=torch_dtype(dtype), device=self.device)
        # Steps whose attributes hold symbolic dims are resolved per call; the rest once.
        self._static = [not op.dim_attrs for op in self.ops]

    def run(self, inputs: Mapping[str, torch.Tensor]) -> list[torch.Tensor]:
        """Execute every step; returns the plan's outputs."""
        bindings = bind_symbols(self.input_types, inputs)
        slots = list(self.resident)
        for name, slot in self.plan.inputs.items():
            slots[slot] = inputs[name].to(self.device)
        for step, op, static in zip(self.plan.steps, self.ops, self._static, strict=True):
            args = [slots[i] for i in step.args]
            if not op.scalar_inputs:
                args = [a if isinstance(a, torch.Tensor) else torch.tensor(a, device=self.device) for a in args]
            attrs = step.attrs if static else resolve_attrs(op, step.attrs, bindings)
            slots[step.out] = op.impl(*args, **attrs)
            for f in step.free:
                slots[f] = None
        return [slots[o] for o in self.plan.outputs]
