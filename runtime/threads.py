"""How many CPU threads an engine runs with, and which thread pool gets them.

A CPU process of kiln has two pools: torch's (OpenMP: sampling, input preparation, the ops a
plan runs through the torch provider) and, on the cpu target, TVM's (every `tvm:` kernel).
Both pools spin after a parallel region before they sleep, so with both sized to the cores each
one's spinning workers steal the cores the other's next region needs; on a 2-core machine that
another process loads too, two torch threads per process already fought (issue 12).

So a cpu-target engine gives the cores to TVM (the kernels are nearly all the work) and one
thread to torch, whose pool then never spins. Other targets give the cores to torch. The count
is the cores this process may run on (its affinity mask), not the machine's: TVM's own default
is half the hardware threads (it assumes hyper-threading), one thread on a 2-core machine.
Measured there (llama-100m, batch-1 decode, interleaved fresh processes, machine quiet):
TVM 2 threads 67-74 tok/s vs 1 thread 39-41; torch 1 thread beside them 67-74 vs 2 threads
70-72 (no cost; torch only samples here); TVM workers sleeping at once after each kernel
(TVM_THREAD_POOL_SPIN_COUNT=0) 60-65, so they keep TVM's spin count (300000). With another
process busy on both cores every setting fell to 20-40 tok/s and the differences drowned in
the noise (sleeping at once measured no better there either).

TVM reads its settings from the environment when a thread first launches a parallel kernel, so
`configure` sets them before that; a pool that already runs keeps its size (an explicit
TVM_NUM_THREADS in the environment wins over the default, not over `threads=`).
"""

from __future__ import annotations

import os

import torch

TVM_NUM_THREADS = "TVM_NUM_THREADS"
CPU_TARGET_TORCH_THREADS = 1
"""torch's intra-op threads beside TVM's pool on the cpu target."""


def available_cores() -> int:
    """The cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def configure(threads: int | None, target: str | None) -> dict[str, int]:
    """Size the thread pools of an engine for an artifact of `target` running on the CPU:
    `threads` (default: the available cores, or TVM_NUM_THREADS when set) go to TVM on the cpu
    target and to torch otherwise. Returns {"torch": n, "tvm": m} (tvm absent off the cpu
    target); ValueError for a count below 1."""
    if threads is not None and threads < 1:
        raise ValueError(f"threads must be >= 1, got {threads}")
    if target != "cpu":
        n = threads or available_cores()
        torch.set_num_threads(n)
        return {"torch": n}
    if threads is not None:
        os.environ[TVM_NUM_THREADS] = str(threads)
    else:
        os.environ.setdefault(TVM_NUM_THREADS, str(available_cores()))
    torch.set_num_threads(CPU_TARGET_TORCH_THREADS)
    return {"torch": CPU_TARGET_TORCH_THREADS, "tvm": int(os.environ[TVM_NUM_THREADS])}
