"""fuse-elementwise: groups of generic elementwise ops become one fused_elementwise op, whose
reference computes bitwise what the ops did."""

from __future__ import annotations

import pytest
import torch
from pass_harness import assert_equivalent, rewrite

from kiln.ir import parse_graph, run_graph, verify
from kiln.passes import get_pass
from kiln.passes.registry import pipeline

GPT2_GELU_BEFORE = """graph {
  %input_ids = input : i64[T]
  @embed = param : f32[16,8]
  %0 = embedding(@embed, %input_ids) : f32[T,8]
  %1 = mul(%0, 0.5) : f32[T,8]
  %2 = pow(%0, 3.0) : f32[T,8]
  %3 = mul(%2, 0.044715) : f32[T,8]
  %4 = add(%0, %3) : f32[T,8]
  %5 = mul(%4, 0.7978845608028654) : f32[T,8]
  %6 = tanh(%5) : f32[T,8]
  %7 = add(%6, 1.0) : f32[T,8]
  %8 = mul(%1, %7) : f32[T,8]
  return %8
}"""
GPT2_GELU_AFTER = """graph {
  %input_ids = input : i64[T]
  @embed = param : f32[16,8]
  %0 = embedding(@embed, %input_ids) : f32[T,8]
  %1 = fused_elementwise(%0) {"expr": [["mul", ["x0", 0.5], {}], ["pow", ["x0", 3.0], {}], ["mul", ["v1", 0.044715], {}], ["add", ["x0", "v2"], {}], ["mul", ["v3", 0.7978845608028654], {}], ["tanh", ["v4"], {}], ["add", ["v5", 1.0], {}], ["mul", ["v0", "v6"], {}]]} : f32[T,8]
  return %1
}"""

# %2 is read outside the chain (by a linear): the chain splits there, each part fused on its own
# (%1..%2 as one group, %4..%5 as another); a lone op (%6) stays as it is.
OUTSIDE_USER_BEFORE = """graph {
  %input_ids = input : i64[T]
  @embed = param : f32[16,8]
  %0 = embedding(@embed, %input_ids) : f32[T,8]
  %1 = mul(%0, 2.0) : f32[T,8]
  %2 = sigmoid(%1) : f32[T,8]
  @w = param : f32[8,8]
  %3 = linear(%2, @w) : f32[T,8]
  %4 = sub(1.0, %2) : f32[T,8]
  %5 = mul(%4, %3) : f32[T,8]
  %6 = neg(%3) : f32[T,8]
  return %5, %6
}"""
OUTSIDE_USER_AFTER = """graph {
  %input_ids = input : i64[T]
  @embed = param : f32[16,8]
  %0 = embedding(@embed, %input_ids) : f32[T,8]
  %1 = fused_elementwise(%0) {"expr": [["mul", ["x0", 2.0], {}], ["sigmoid", ["v0"], {}]]} : f32[T,8]
  @w = param : f32[8,8]
  %2 = linear(%1, @w) : f32[T,8]
  %3 = fused_elementwise(%1, %2) {"expr": [["sub", [1.0, "x0"], {}], ["mul", ["v0", "x1"], {}]]} : f32[T,8]
  %4 = neg(%2) : f32[T,8]
  return %3, %4
}"""

# A graph output inside a chain ends a group there (the value must exist).
GRAPH_OUTPUT_BEFORE = """graph {
  %input_ids = input : i64[T]
  @embed = param : f32[16,8]
  %0 = embedding(@embed, %input_ids) : f32[T,8]
  %1 = tanh(%0) : f32[T,8]
  %2 = exp(%1) : f32[T,8]
  %3 = add(%2, 1.0) : f32[T,8]
  %4 = relu(%3) : f32[T,8]
  return %4, %2
}"""
GRAPH_OUTPUT_AFTER = """graph {
  %input_ids = input : i64[T]
  @embed = param : f32[16,8]
  %0 = embedding(@embed, %input_ids) : f32[T,8]
  %1 = fused_elementwise(%0) {"expr": [["tanh", ["x0"], {}], ["exp", ["v0"], {}]]} : f32[T,8]
  %2 = fused_elementwise(%1) {"expr": [["add", ["x0", 1.0], {}], ["relu", ["v0"], {}]]} : f32[T,8]
  return %2, %1
}"""

# Operands that broadcast (one value per row [T, 1], a one-element tensor) join as inputs; the
# [T, 1] chain that computes the row value has another shape, so it is a group of its own; a
# shared step (%6, read twice) is computed once.
BROADCAST_BEFORE = """graph {
  %input_ids = input : i64[T]
  @embed = param : f32[16,8]
  %0 = embedding(@embed, %input_ids) : f32[T,8]
  %1 = sum(%0) {"dims": [-1], "keepdim": true} : f32[T,1]
  %2 = mul(%1, 0.125) : f32[T,1]
  %3 = add(%2, 1.0) : f32[T,1]
  %4 = div(%0, %3) : f32[T,8]
  @scale = param : f32[1]
  %5 = mul(%4, @scale) : f32[T,8]
  %6 = silu(%5) : f32[T,8]
  %7 = mul(%6, %6) : f32[T,8]
  return %7
}"""
BROADCAST_AFTER = """graph {
  %input_ids = input : i64[T]
  @embed = param : f32[16,8]
  %0 = embedding(@embed, %input_ids) : f32[T,8]
  %1 = sum(%0) {"dims": [-1], "keepdim": true} : f32[T,1]
  %2 = fused_elementwise(%1) {"expr": [["mul", ["x0", 0.125], {}], ["add", ["v0", 1.0], {}]]} : f32[T,1]
  @scale = param : f32[1]
  %3 = fused_elementwise(%0, %2, @scale) {"expr": [["div", ["x0", "x1"], {}], ["mul", ["v0", "x2"], {}], ["silu", ["v1"], {}], ["mul", ["v2", "v2"], {}]]} : f32[T,8]
  return %3
}"""

REWRITTEN = {
    "gpt2_tanh_gelu": (GPT2_GELU_BEFORE, GPT2_GELU_AFTER),
    "outside_user": (OUTSIDE_USER_BEFORE, OUTSIDE_USER_AFTER),
    "graph_output": (GRAPH_OUTPUT_BEFORE, GRAPH_OUTPUT_AFTER),
    "broadcast_operands": (BROADCAST_BEFORE, BROADCAST_AFTER),
}


@pytest.mark.parametrize("case", sorted(REWRITTEN))
def test_rewrites_bit_exact(case):
    before, after = REWRITTEN[case]
    graph, result = rewrite("fuse-elementwise", before, after)
    assert_equivalent("fuse-elementwise", graph, result, tol=0.0)


UNCHANGED = {
    # one op alone, an op no fused kernel computes (log), a pow by a tensor, integer arithmetic
    "not_fusible": """graph {
  %input_ids = input : i64[T]
  @embed = param : f32[16,8]
  %0 = embedding(@embed, %input_ids) : f32[T,8]
  %1 = tanh(%0) : f32[T,8]
  %2 = log(%1) : f32[T,8]
  %3 = pow(%2, %0) : f32[T,8]
  %4 = add(%input_ids, 2) : i64[T]
  %5 = mul(%4, 3) : i64[T]
  return %3, %5
}""",
    # [T, 8] + [8] broadcasts a row vector: not an operand kind the kernel takes
    "row_vector_operand": """graph {
  %input_ids = input : i64[T]
  @embed = param : f32[16,8]
  @bias = param : f32[8]
  %0 = embedding(@embed, %input_ids) : f32[T,8]
  %1 = add(%0, @bias) : f32[T,8]
  %2 = tanh(%1) : f32[T,8]
  return %2
}""",
}


@pytest.mark.parametrize("case", sorted(UNCHANGED))
def test_leaves_alone(case):
    text = UNCHANGED[case]
    rewrite("fuse-elementwise", text, text)


def test_a_group_reads_at_most_eight_tensors():
    adds = "\n".join(f"  %{i + 2} = add(%{i + 1}, @w{i}) : f32[T,8]" for i in range(10))
    params = "\n".join(f"  @w{i} = param : f32[T,8]" for i in range(10))
    graph = parse_graph(f"""graph {{
  %input_ids = input : i64[T]
  @embed = param : f32[16,8]
{params}
  %0 = embedding(@embed, %input_ids) : f32[T,8]
  %1 = neg(%0) : f32[T,8]
{adds}
  return %11
}}""")
    verify(graph)
    result = get_pass("fuse-elementwise").apply(graph)
    verify(result)
    fused = [n for n in result.nodes if n.op == "fused_elementwise"]
    assert len(fused) == 2 and all(len(n.inputs) <= 8 for n in fused)
    assert sum(len(n.attrs["expr"]) for n in fused) == 11


def test_bfloat16_group_rounds_as_the_ops_did():
    before = GPT2_GELU_BEFORE.replace("f32", "bf16")
    graph = parse_graph(before)
    result = get_pass("fuse-elementwise").apply(graph)
    verify(result)
    assert [n.op for n in result.ops()] == ["embedding", "fused_elementwise"]
    embed = (torch.randn(16, 8, generator=torch.Generator().manual_seed(0)) * 3).to(torch.bfloat16)
    ids = {"input_ids": torch.arange(16)}
    with torch.no_grad():
        want = run_graph(graph, ids, lambda name, t: embed)
        got = run_graph(result, ids, lambda name, t: embed)
    assert torch.equal(got[0], want[0])


def test_only_the_cpu_pipeline_runs_it():
    assert "fuse-elementwise" in pipeline("cpu") and pipeline("cpu")[-1] == "dce"
    assert "fuse-elementwise" not in pipeline("reference") and "fuse-elementwise" not in pipeline("cuda")


def test_a_group_costs_what_its_ops_did():
    """kiln inspect's FLOP accounting (kiln.ir.cost) counts a fused group's steps, not one op."""
    from kiln.ir.cost import node_flops

    graph = parse_graph(GPT2_GELU_BEFORE)
    result = get_pass("fuse-elementwise").apply(graph)
    assert sum(map(node_flops, result.ops())) == sum(map(node_flops, graph.ops()))
