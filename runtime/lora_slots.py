"""The engine's LoRA adapter slots: device stacks the graph reads, filled in place, cached LRU.

Each LoRA-targeted linear has two stacks, `lora.<key>.a` [max_loras, R, K] and `.b`
[max_loras, N, R], allocated once (zeros) and bound every step like the KV caches; filling a
slot copies into them, so captured CUDA graphs stay valid. A request runs with its adapter's
slot (`Request.lora_slot`, each of its tokens' `lora_index`); a slot holding an adapter that no
running request uses can be refilled, least recently used first.

    slots    [ adapter 7 | adapter 3 | free ]     users [2, 0, 0]
    LRU      3, 7 (least recent first)            a request for adapter 9 takes the free slot;
                                                  the next new one evicts 3 (7 is in use)
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

import torch

from kiln.ir.step_inputs import is_lora_input, lora_input_names
from kiln.ir.types import TensorType, torch_dtype
from kiln.runtime.lora import Adapter, LoRARequest, modules_of, read_adapter
from kiln.runtime.request import Request


class LoRASlots:
    """max_loras adapter slots over an artifact's LoRA layout (its manifest's "lora")."""

    def __init__(self, layout: dict[str, Any], input_types: dict[str, TensorType], max_loras: int,
                 max_lora_rank: int, device: torch.device):
        if max_loras < 1:
            raise ValueError(f"max_loras must be >= 1, got {max_loras}")
        if not 1 <= max_lora_rank <= layout["max_rank"]:
            raise ValueError(f"max_lora_rank={max_lora_rank}: the artifact serves LoRA ranks up to "
                             f"{layout['max_rank']} (recompile with a larger --max-lora-rank for more)")
        self.layout = layout
        self.max_rank = max_lora_rank
        self.modules = modules_of(layout)
        self.stacks: dict[str, torch.Tensor] = {
            name: torch.zeros([max_loras, *(int(d) for d in t.shape[1:])], dtype=torch_dtype(t.dtype), device=device)
            for name, t in input_types.items() if is_lora_input(name)
        }
        """Graph input name -> its slot stack (bound every step)."""
        self.adapters: dict[int, Adapter] = {}
        """lora_int_id -> the checked adapter (read from disk again whenever it takes a slot)."""
        self.held: list[int | None] = [None] * max_loras
        """The adapter id each slot holds."""
        self.users = [0] * max_loras
        """Requests running with each slot."""
        self.lru: OrderedDict[int, int] = OrderedDict()
        """Loaded adapter id -> its slot, least recently acquired first."""
        self.num_loads = 0

    def register(self, request: LoRARequest) -> None:
        """Check an adapter against the artifact (ValueError when it does not fit); a new id is
        remembered for its requests, a known one must name the same directory."""
        known = self.adapters.get(request.lora_int_id)
        if known is not None:
            if str(known.request.lora_path) != str(request.lora_path):
                raise ValueError(f"lora_int_id {request.lora_int_id} is adapter '{known.request.lora_path}'; "
                                 f"'{request.lora_path}' needs another id")
            return
        self.adapters[request.lora_int_id] = read_adapter(request, self.layout, self.max_rank)

    def acquire(self, adapter_id: int) -> int | None:
        """The slot holding the adapter, loaded into a free or least recently used idle slot
        when it holds none; None when every slot is in use by running requests."""
        slot = self.lru.get(adapter_id)
        if slot is None:
            idle = [s for s, held in enumerate(self.held) if held is None]
            idle += [s for s in self.lru.values() if self.users[s] == 0]
            if not idle:
                return None
            slot = idle[0]
            if self.held[slot] is not None:
                del self.lru[self.held[slot]]
            self._fill(slot, self.adapters[adapter_id])
            self.held[slot] = adapter_id
            self.lru[adapter_id] = slot
        self.lru.move_to_end(adapter_id)
        self.users[slot] += 1
        return slot

    def admit(self, req: Request) -> bool:
        """Whether a waiting request may start (the scheduler asks): it runs the base model, or
        its adapter holds a slot, loaded into one if needed. A preempted request keeps its slot."""
        if req.adapter_id is None or req.lora_slot >= 0:
            return True
        slot = self.acquire(req.adapter_id)
        if slot is None:
            return False
        req.lora_slot = slot
        return True

    def release(self, req: Request) -> None:
        """A request holding a slot finished: the slot may be refilled once no other uses it."""
        self.users[req.lora_slot] -= 1
        req.lora_slot = -1

    def remove(self, adapter_id: int) -> None:
        """Forget an adapter that no request runs or waits with; the slot it held is free.
        ValueError while running requests use it."""
        slot = self.lru.get(adapter_id)
        if slot is not None and self.users[slot]:
            raise ValueError(f"adapter {adapter_id} is in use by {self.users[slot]} running requests")
        if slot is not None:
            del self.lru[adapter_id]
            self.held[slot] = None
        self.adapters.pop(adapter_id, None)

    def _fill(self, slot: int, adapter: Adapter) -> None:
        """Write the adapter into the slot in place: each module's A rows and B block (B with
        the scaling folded in), zeros elsewhere."""
        for stack in self.stacks.values():
            stack[slot].zero_()
        for module, (a, b) in adapter.load().items():
            m = self.modules[module]
            a_name, b_name = lora_input_names(m.key)
            r0, r = m.rank_start, a.shape[0]
            self.stacks[a_name][slot, r0 : r0 + r].copy_(a)
            self.stacks[b_name][slot, m.out[0] : m.out[1], r0 : r0 + r].copy_(b)
        self.num_loads += 1


def open_slots(model: Any, enable_lora: bool, max_loras: int, max_lora_rank: int,
               device: torch.device) -> tuple[LoRASlots | None, dict[str, torch.Tensor]]:
    """The engine's slots over a loaded model (CompiledModel) with enable_lora, else None, and
    the LoRA stacks to bind every step: the slots', or without enable_lora one zero slot per
    stack of the plan (an artifact compiled with LoRA then runs the base model). ValueError
    for enable_lora on an artifact compiled without LoRA."""
    types = model.executor.input_types
    if not enable_lora:
        return None, {n: torch.zeros([1, *(int(d) for d in t.shape[1:])], dtype=torch_dtype(t.dtype), device=device)
                      for n, t in types.items() if is_lora_input(n)}
    layout = model.manifest.get("lora")
    if layout is None:
        raise ValueError(f"'{model.path}' was compiled without LoRA; recompile it with --max-lora-rank "
                         "(max_lora_rank= in kiln.compile) to serve adapters, or leave enable_lora off")
    slots = LoRASlots(layout, types, max_loras, max_lora_rank, device)
    return slots, slots.stacks


def register(slots: LoRASlots | None, request: LoRARequest | None) -> int | None:
    """The adapter id a new request runs with (None: the base model), its adapter checked."""
    if request is None:
        return None
    if slots is None:
        raise ValueError("a lora_request needs an engine with enable_lora=True (and an artifact compiled with "
                         "--max-lora-rank)")
    slots.register(request)
    return request.lora_int_id
