"""Decode steps replayed from CUDA graphs.

A decode-only step of B sequences runs padded to a bucketed size B' (ModelRunner), so its
inputs are views of the same persistent device buffers every time, its arena views are fixed
(the engine lays the arena out once, for its largest step) and its kernels never synchronize
with the host. One graph per bucket is captured at load, largest first, sharing one memory
pool; a call whose symbol values and input buffers match a captured graph replays it, any
other step (prefill, mixed, a shape never captured) runs eagerly through the executor.

A plan whose kernels cannot be captured (a torch fallback that reads values on the host, such
as the reference MoE routing) runs eagerly: kernels known to synchronize are checked up front
(`HOST_SYNC`), and a capture that fails anyway turns graphs off with a warning naming the error.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch

from kiln.runtime.executor import PlanExecutor

log = logging.getLogger(__name__)

HOST_SYNC = frozenset({"torch:expert_linear", "torch:paged_attention", "torch:attention"})
"""Kernels whose torch reference reads device values on the host (a capture would fail)."""


@dataclass
class _Graph:
    graph: torch.cuda.CUDAGraph
    pointers: tuple[int, ...]
    """data_ptr of every input the graph was captured with, in sorted name order."""
    outputs: list[torch.Tensor]


def _pointers(inputs: Mapping[str, torch.Tensor]) -> tuple[int, ...]:
    return tuple(inputs[k].data_ptr() for k in sorted(inputs))


class GraphedExecutor:
    """Runs a plan, replaying captured CUDA graphs for the shapes captured."""

    def __init__(self, executor: PlanExecutor):
        self.executor = executor
        self.graphs: dict[tuple[int, ...], _Graph] = {}
        self._arena_ptr = 0
        self.capture_seconds = 0.0

    def capture(self, sizes: Sequence[int], make_inputs: Callable[[int], Mapping[str, torch.Tensor]]) -> None:
        """Capture one graph per size (largest first); make_inputs(b) returns the persistent
        input buffers of a decode step of b sequences (contents arbitrary but valid)."""
        ex = self.executor
        syncing = sorted({s.kernel for s in ex.plan.steps} & HOST_SYNC)
        if syncing:
            log.warning("CUDA graphs are off for this model: %s read device values on the host; its steps run "
                        "eagerly", ", ".join(syncing))
            return
        start = time.perf_counter()
        pool = torch.cuda.graph_pool_handle()
        try:
            for b in sorted(sizes, reverse=True):
                inputs = make_inputs(b)
                key = self._key(inputs)
                ex.run(inputs)  # warm: every kernel loaded before capture
                torch.cuda.synchronize(ex.device)
                g = torch.cuda.CUDAGraph()
                with torch.cuda.graph(g, pool=pool):
                    outs = ex.run(inputs)
                self.graphs[key] = _Graph(g, _pointers(inputs), outs)
        except RuntimeError as e:
            log.warning("CUDA graphs are off for this model; its steps run eagerly (%s)", str(e).splitlines()[0])
            self.graphs.clear()
            torch.cuda.synchronize(ex.device)
        self._arena_ptr = ex.arena.data_ptr() if ex.arena is not None else 0
        torch.cuda.synchronize(ex.device)
        self.capture_seconds = time.perf_counter() - start
        if self.graphs:
            log.info("captured %d CUDA graphs (decode batch sizes %s) in %.2f s",
                     len(self.graphs), ", ".join(map(str, sorted(sizes))), self.capture_seconds)

    def _key(self, inputs: Mapping[str, torch.Tensor]) -> tuple[int, ...]:
        bindings = self.executor.bind(inputs)
        return tuple(bindings[s] for s in self.executor.plan.symbols)

    def run(self, inputs: Mapping[str, torch.Tensor]) -> list[torch.Tensor]:
        """The plan's outputs for `inputs`: a graph replay when one was captured for them."""
        if self.graphs:
            ex = self.executor
            g = self.graphs.get(self._key(inputs))
            if g is not None and ex.arena is not None and ex.arena.data_ptr() == self._arena_ptr \
                    and g.pointers == _pointers(inputs):
                g.graph.replay()
                return g.outputs
        return self.executor.run(inputs)
