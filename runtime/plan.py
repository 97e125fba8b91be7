"""The execution plan: ordered kernel calls over numbered buffers (the artifact's plan.json).

Codegen writes it, the runtime executes it. Each step reads buffers, writes one, and lists the
buffers whose last reader it is, so the executor drops them right after (slot reuse keeps the
number of live buffers at what the memory plan computed).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

PLAN_FORMAT = 1


@dataclass
class Step:
    """One kernel call."""

    kernel: str
    """Kernel id: "torch:<op>" runs the IR op's torch reference; targets add their own."""
    args: list[int]
    """Buffer slots read, in the op's operand order."""
    out: int
    """Buffer slot written."""
    attrs: dict[str, Any] = field(default_factory=dict)
    """The op's attributes (symbolic dims resolved at run time)."""
    free: list[int] = field(default_factory=list)
    """Slots whose value is dead after this step."""


@dataclass
class ExecutionPlan:
    """A whole forward pass."""

    target: str
    num_slots: int
    inputs: dict[str, int]
    """Graph input name -> slot."""
    params: dict[str, int]
    """Weight name (in the artifact's safetensors) -> slot."""
    consts: list[tuple[int, Any, str, list]]
    """(slot, value, dtype, shape) of literal constants."""
    steps: list[Step]
    outputs: list[int]
    input_types: dict[str, tuple[str, list]] = field(default_factory=dict)
    """Graph input name -> (dtype, symbolic shape)."""
    slot_bytes: list[str] = field(default_factory=list)
    """Per slot, the largest value it holds in bytes (an expression in the symbols)."""

    def to_dict(self) -> dict[str, Any]:
        return {"format": PLAN_FORMAT, **dataclasses.asdict(self)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ExecutionPlan:
        if data.get("format") != PLAN_FORMAT:
            raise ValueError(f"plan format {data.get('format')!r} is not {PLAN_FORMAT}")
        fields = {k: v for k, v in data.items() if k != "format"}
        fields["steps"] = [Step(**s) for s in fields["steps"]]
        fields["consts"] = [tuple(c) for c in fields["consts"]]
        fields["input_types"] = {k: tuple(v) for k, v in fields.get("input_types", {}).items()}
        return cls(**fields)
