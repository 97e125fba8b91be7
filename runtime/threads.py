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

Two more settings keep a small model's step steady when another process takes a core (the
demo model's batch-1 decode step, 0.3 ms on a quiet machine, measured in fresh processes while
another process kept one of the two cores busy):
- TVM pins its workers to cores by default (TVM_BIND_THREADS): the worker pinned to the core
  that the other process runs on waits for it at every parallel kernel, 0.44-1.56 ms per step;
  unpinned (TVM_BIND_THREADS=0, set here unless the environment says otherwise) 0.43-0.61 ms,
  and no change on a quiet machine.
- A pool of two threads on the one core left is slower than one thread (0.35-0.45 ms), which is
  slower than two on a quiet machine (0.36-0.40 ms against 0.27-0.30). So `TvmThreads` fits the
  pool between steps to the cores that other processes left idle (/proc/stat, every
  `RECHECK_S`), up to its configured size.
"""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import torch

TVM_NUM_THREADS = "TVM_NUM_THREADS"
TVM_BIND_THREADS = "TVM_BIND_THREADS"
RECHECK_S = 0.25
"""How often `TvmThreads` re-measures the cores that other processes keep busy."""
CPU_TARGET_TORCH_THREADS = 1
"""torch's intra-op threads beside TVM's pool on the cpu target."""


def available_cores() -> int:
    """The cores this process may run on."""
    return len(_cpus())


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
    os.environ.setdefault(TVM_BIND_THREADS, "0")
    if threads is not None:
        os.environ[TVM_NUM_THREADS] = str(threads)
    else:
        os.environ.setdefault(TVM_NUM_THREADS, str(available_cores()))
    torch.set_num_threads(CPU_TARGET_TORCH_THREADS)
    return {"torch": CPU_TARGET_TORCH_THREADS, "tvm": int(os.environ[TVM_NUM_THREADS])}


def busy_seconds(cpus: set[int]) -> tuple[float, float] | None:
    """(CPU seconds spent on the processors `cpus` by every process, by this one) since boot;
    None where /proc/stat cannot tell (not Linux)."""
    try:
        lines = Path("/proc/stat").read_text().splitlines()
    except OSError:
        return None
    ticks = 0
    for line in lines[1:]:
        name, _, rest = line.partition(" ")
        if not name.startswith("cpu"):
            break
        if int(name[3:]) in cpus:
            f = [int(x) for x in rest.split()]
            ticks += sum(f[:8]) - f[3] - f[4]  # user .. steal, less idle and iowait
    t = os.times()
    return ticks / os.sysconf("SC_CLK_TCK"), t.user + t.system


class TvmThreads:
    """Fits the TVM thread pool of the thread that runs the kernels to the cores that other
    processes leave idle: `fit()`, called before each step, uses max(1, cores - busy) of the
    pool's threads, where busy is how many cores others kept busy since the last measure
    (re-measured every RECHECK_S seconds). The pool is TVM's, of the calling thread."""

    def __init__(self) -> None:
        self.used: int | None = None
        """Threads the pool runs kernels on now (None before the first `fit`)."""
        self._size = 0
        self._thread: int | None = None
        self._cpus = _cpus()
        self._next = 0.0
        self._last: tuple[float, float, float] | None = None

    def fit(self) -> None:
        """Resize the calling thread's pool when the last measure is RECHECK_S old."""
        now = time.monotonic()
        if now < self._next and threading.get_ident() == self._thread:
            return
        self._next = now + RECHECK_S
        if threading.get_ident() != self._thread:
            import tvm.runtime

            _configure_pool(0)  # a thread's first step: its whole pool, which another fitter may have shrunk
            self._thread, self._size = threading.get_ident(), tvm.runtime.num_threads()
            self.used, self._last = self._size, None
        busy = busy_seconds(self._cpus)
        if busy is None:
            return
        if self._last is not None:
            wall, total, ours = now - self._last[0], busy[0] - self._last[1], busy[1] - self._last[2]
            others = max(total - ours, 0.0) / wall
            self.resize(len(self._cpus) - int(others + 0.5))
        self._last = (now, *busy)

    def resize(self, n: int) -> None:
        """Run the calling thread's kernels on n threads of its pool (1 .. its size)."""
        n = max(1, min(n, self._size))
        if n != self.used:
            _configure_pool(n)
            self.used = n


def _configure_pool(n: int) -> None:
    """Run the calling thread's TVM kernels on n threads of its pool (0: TVM's default, all)."""
    import tvm_ffi

    tvm_ffi.get_global_func("runtime.config_threadpool")(1, n)  # 1: TVM's kBig, all cores alike


def _cpus() -> set[int]:
    try:
        return set(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return set(range(os.cpu_count() or 1))
