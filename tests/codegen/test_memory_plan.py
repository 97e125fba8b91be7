"""Memory planning: slots are reused only across non-overlapping lifetimes."""

from __future__ import annotations

import torch

from kiln.codegen.memory_plan import plan_memory
from kiln.codegen.reference import lower
from kiln.ir import parse_graph, run_graph
from kiln.runtime.executor import PlanExecutor

CHAIN = """
graph {
  %x = input : f32[T,8]
  %0 = exp(%x) : f32[T,8]
  %1 = neg(%0) : f32[T,8]
  %2 = sin(%1) : f32[T,8]
  %3 = reshape(%2) {"shape": [-1]} : f32[8*T]
  %4 = cos(%3) : f32[8*T]
  %5 = add(%4, 1.0) : f32[8*T]
  return %5
}
"""


def test_chain_reuses_slots_and_runs():
    g = parse_graph(CHAIN)
    mem = plan_memory(g)
    ops = g.ops()
    # exp's slot is free once neg has read it, so sin reuses it.
    assert mem.slot[ops[2]] == mem.slot[ops[0]]
    # reshape is a view of sin's result: cos must not overwrite sin's slot while the view lives.
    assert mem.slot[ops[4]] != mem.slot[ops[2]]
    assert len(set(mem.slot.values())) < len(g.nodes)
    x = torch.randn(3, 8)
    plan = lower(g)
    got = PlanExecutor(plan, {}).run({"x": x})[0]
    torch.testing.assert_close(got, run_graph(g, {"x": x}, lambda n, t: None)[0])
    assert plan.slot_bytes[mem.slot[ops[0]]] == "32*T"


def test_outputs_and_inputs_are_never_reused():
    g = parse_graph(CHAIN.replace("return %5", "return %1, %5"))
    mem = plan_memory(g)
    early_out = g.outputs[0]
    later = g.nodes[g.nodes.index(early_out) + 1 :]
    assert all(mem.slot[n] != mem.slot[early_out] for n in later)
    assert all(mem.slot[n] != mem.slot[g.inputs[0]] for n in g.nodes if n is not g.inputs[0])
