"""`kiln tune`'s search for quantized_linear (tune.py runs it beside linear's): per packed weight
the plan launches (shape, format, activations), the GEMV's knobs (quant_gemv.KNOBS) at one row
of x, a batch-1 decode step's case, where reading the packed weight is the whole cost and the
best tile depends on the format (an int4 byte carries two weights, an fp8 byte one). Each
candidate runs through the launcher the runtime uses, replayed from a CUDA graph over copies of
random packed weights that together exceed the L2 (tune.graph_time_us), as linear's are timed.

    tuning.json "kernels": {"quantized_linear": {tuning_key: {"config": {...} (QGemvConfig
                                                 fields differing from the default), "default_us",
                                                 "tuned_us", "tried"}}}
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import asdict, dataclass
from typing import Any

import torch
import triton

from kiln.kernels.triton_kernels import quant_gemv, quant_linear
from kiln.runtime.plan import ExecutionPlan

COLD_BYTES = 256 << 20
"""Bytes of packed weights each timed call rotates over (five times the H200's L2)."""


@dataclass(frozen=True)
class QuantShape:
    k: int
    n: int
    attrs: tuple[tuple[str, Any], ...]
    dtype: torch.dtype
    operands: tuple[tuple[tuple[int, ...], str], ...]
    """(shape, dtype) of qweight, scales and the zeros / g_idx / bias the attributes say."""

    @property
    def key(self) -> str:
        return quant_gemv.tuning_key(dict(self.attrs), self.k, self.n)


def quant_workload(plan: ExecutionPlan) -> Counter[QuantShape]:
    """The quantized_linear weights the plan launches on Triton, with their call counts."""
    from kiln.ir.types import torch_dtype

    shapes: Counter[QuantShape] = Counter()
    buf = plan.buffers
    for s in plan.steps:
        if s.kernel != "triton:quantized_linear":
            continue
        x, *ops = (buf[i] for i in s.inputs)
        operands = tuple((tuple(b.shape), b.dtype) for b in ops)
        if not all(isinstance(d, int) for shape, _ in operands for d in shape):
            continue
        shapes[QuantShape(x.shape[-1], ops[0].shape[0], tuple(sorted(s.attrs.items())), torch_dtype(x.dtype),
                          operands)] += 1
    return shapes


def _random(shape: tuple[int, ...], dtype: str, attrs: dict[str, Any]) -> torch.Tensor:
    """A random operand: codes of the attributes' bits (float8 bytes that are finite), an
    act-order g_idx over the groups, positive scales."""
    from kiln.ir.types import torch_dtype

    dev = torch.device("cuda")
    t = torch_dtype(dtype)
    if t == torch.uint8:
        return torch.randint(0, 1 << (attrs.get("bits") or 8), shape, device=dev, dtype=torch.uint8)
    if t == torch.float8_e4m3fn:
        return (torch.randn(shape, device=dev) * 64).to(t)
    if t == torch.int32:  # g_idx
        return (torch.arange(shape[0], device=dev, dtype=t) // attrs["group_size"]).flip(0)
    return (torch.rand(shape, device=dev) + 0.5).to(t) * 1e-2


def _calls(shape: QuantShape, config: quant_gemv.QGemvConfig) -> list:
    attrs = dict(shape.attrs)
    launch = quant_linear.make_launchers({shape.key: {"config": asdict(config)}})["quantized_linear"]
    x = torch.randn(1, shape.k, device="cuda", dtype=shape.dtype)
    y = torch.empty(1, shape.n, device="cuda", dtype=shape.dtype)
    per_copy = sum(torch.Size(s).numel() for s, _ in shape.operands)
    copies = max(1, min(16, COLD_BYTES // max(1, per_copy)))
    sets = [[_random(s, d, attrs) for s, d in shape.operands] for _ in range(copies)]
    return [lambda ops=ops: launch([y], [x, *ops], attrs) for ops in sets]


def tune_quant(shape: QuantShape, deadline: float) -> dict[str, Any]:
    """The fastest GEMV config found before `deadline` for one packed weight at one row."""
    from kiln.codegen.cuda.tune import graph_time_us

    default = quant_gemv.QGemvConfig()
    default_us = graph_time_us(_calls(shape, default))
    best, best_us, tried = default, default_us, 1
    for c in quant_gemv.candidates():
        if time.monotonic() > deadline:
            break
        if c == default:
            continue
        try:
            us = graph_time_us(_calls(shape, c))
        except (RuntimeError, triton.runtime.errors.OutOfResources):
            continue
        tried += 1
        if us < best_us:
            best, best_us = c, us
    essential = {k: v for k, v in asdict(best).items() if getattr(default, k) != v}
    return {"config": essential, "default_us": default_us, "tuned_us": best_us, "tried": tried}


def table_rows(entries: dict[str, Any]) -> list[str]:
    """format_table's rows of the quantized_linear entries."""
    rows = []
    for key, e in entries.items():
        choice = " ".join(f"{k}={v}" for k, v in e["config"].items()) or "default"
        rows.append(f"{'qlinear ' + key:<34}{'M=1':>10}{e['default_us']:>12.1f}{e['tuned_us']:>12.1f}"
                    f"{e['default_us'] / e['tuned_us']:>8.2f}x  gemv {choice}")
    return rows


__all__ = ["QuantShape", "quant_workload", "table_rows", "tune_quant"]
