"""Programmatic dependent launch (PDL, Hopper and later) for the forward pass's Triton kernels.

A kernel launched with PDL may start while the kernel before it on the stream is still running:
its programs are scheduled as soon as every program of the previous kernel has signalled
(`gdc_launch_dependents`) and the SMs have room, and `gdc_wait` blocks until the previous
kernel has finished and its writes are visible. At batch 1 a decode step is hundreds of kernels
of a few microseconds each; without PDL every boundary costs the launch, the ramp-up of the next
kernel and the tail of the last wave of the previous one. CUDA graphs keep these edges.

The protocol every kernel launched with `options(...)` keeps:
- `wait(PDL)` before its first store and before any load of something an earlier kernel writes
  (activations, caches, step inputs), in every program, early-exiting ones included: a kernel
  that could finish without waiting would let the kernel after it start before the one before
  it has finished. Only loads of weights (never written while serving) may come first: the GEMV
  streams its first weight tile before it waits;
- `wait` first signals the dependents, then waits: the next kernel launches as soon as every
  program of this one is running (never before, so a kernel in flight never waits for room
  taken by its dependents), and overlaps this one's wait and work. Measured on the 1B shape at
  batch 1 (benchmarks/cuda_pdl.py's serving, H200): signalling at the start 967-1000 tok/s,
  after the wait 895-994, at the end (no signal) 748, PDL off 863-931.

Disabled (`PDL` false, no launch option) under Triton's interpreter, on GPUs before sm_90, in a
Triton without GDC, and with KILN_PDL=0.
"""

from __future__ import annotations

import functools
import os
from typing import Any

import torch
import triton
import triton.language as tl

_GDC = hasattr(tl, "extra") and hasattr(tl.extra, "cuda") and hasattr(tl.extra.cuda, "gdc_wait")


@functools.lru_cache(maxsize=16)
def _enabled(index: int) -> bool:
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0") or os.environ.get("KILN_PDL", "1") == "0":
        return False
    return _GDC and torch.cuda.get_device_capability(index)[0] >= 9


def enabled(t: torch.Tensor) -> bool:
    """Whether kernels launched on t's device use PDL."""
    return t.is_cuda and _enabled(t.device.index if t.device.index is not None else torch.cuda.current_device())


def options(t: torch.Tensor) -> dict[str, Any]:
    """Launch keywords for a kernel that keeps the protocol, on t's device: its PDL constexpr and,
    where enabled, Triton's launch_pdl option."""
    return {"PDL": True, "launch_pdl": True} if enabled(t) else {"PDL": False}


@triton.jit
def wait(PDL: tl.constexpr):
    """Let the next kernel launch, then wait for the previous one (its writes visible)."""
    if PDL:
        tl.extra.cuda.gdc_launch_dependents()
        tl.extra.cuda.gdc_wait()


__all__ = ["enabled", "options", "wait"]
