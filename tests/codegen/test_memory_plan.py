"""Memory planning: slots are reused only across non-overlapping lifetimes; views and aliases
take no slot and keep their base alive."""

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
    (exp, _, sin, reshape, cos, _) = (mem.values[n][0] for n in ops)
    # exp's slot is free once neg has read it, so sin reuses it.
    assert sin.slot == exp.slot
    # reshape is a view of sin's result: cos must not overwrite sin's slot while the view lives.
    assert reshape.kind == "view" and reshape.base is sin and reshape.slot is None
    assert cos.slot != sin.slot
    assert len(mem.slots) == 2
    x = torch.randn(3, 8)
    plan = lower(g).plan
    got = PlanExecutor(plan, {}).run({"x": x})[0]
    torch.testing.assert_close(got, run_graph(g, {"x": x}, lambda n, t: None)[0])
    assert plan.slots[exp.slot] == [{"T": 32}]


def test_outputs_are_never_reused_and_inputs_take_no_slot():
    g = parse_graph(CHAIN.replace("return %5", "return %1, %5"))
    mem = plan_memory(g)
    early_out = mem.values[g.outputs[0]][0]
    later = g.nodes[g.nodes.index(g.outputs[0]) + 1 :]
    assert all(s.slot != early_out.slot for n in later for s in mem.values[n] if s.kind == "arena")
    assert mem.values[g.inputs[0]][0].kind == "input" and mem.values[g.inputs[0]][0].slot is None


def test_results_of_one_step_never_share_a_slot_with_its_operands():
    g = parse_graph(CHAIN)
    mem = plan_memory(g)
    for n in g.ops():
        outs = {s.slot for s in mem.values[n] if s.kind == "arena" and s.node is n}
        ins = {s.root.slot for x in n.inputs for s in mem.values[x]}
        assert not outs & ins
