"""lora: a lora op after each targeted linear, adding its update to the linear's result (one per
merged projection, B block-diagonal; no separate add); the fusions after it keep it reading the
linear; the op's type rule, with and without base; --verify with random adapters."""

from __future__ import annotations

import pytest
import torch
from pass_harness import assert_equivalent, random_weights, rewrite, weight_fn

from kiln.errors import VerifyError
from kiln.ir import parse_graph, verify
from kiln.ir.ops import OPS, infer_type
from kiln.ir.types import TensorType
from kiln.passes import get_pass
from kiln.passes.differential import check_equivalent
from kiln.passes.lora import Lora, lora_pass, with_lora_pass
from kiln.passes.registry import pipeline

BEFORE = """graph {
  %input_ids = input : i64[T]
  @embed = param : f32[16,8]
  %0 = embedding(@embed, %input_ids) : f32[T,8]
  @layers.0.attn.q_proj.weight = param : f32[8,8]
  @layers.0.attn.k_proj.weight = param : f32[4,8]
  @layers.0.attn.v_proj.weight = param : f32[4,8]
  %1 = cat(@layers.0.attn.q_proj.weight, @layers.0.attn.k_proj.weight, @layers.0.attn.v_proj.weight) {"dim": 0} : f32[16,8]
  %2 = linear(%0, %1) : f32[T,16]
  %3 = slice(%2) {"dim": 1, "start": 0, "end": 8, "step": 1} : f32[T,8]
  %4 = slice(%2) {"dim": 1, "start": 8, "end": 12, "step": 1} : f32[T,4]
  %5 = slice(%2) {"dim": 1, "start": 12, "end": 16, "step": 1} : f32[T,4]
  %6 = add(%4, %5) : f32[T,4]
  @layers.0.attn.o_proj.weight = param : f32[8,4]
  %7 = linear(%6, @layers.0.attn.o_proj.weight) : f32[T,8]
  @lm_head.weight = param : f32[16,8]
  %8 = linear(%7, @lm_head.weight) : f32[T,16]
  return %8
}"""
AFTER = """graph {
  %input_ids = input : i64[T]
  @embed = param : f32[16,8]
  %0 = embedding(@embed, %input_ids) : f32[T,8]
  %lora.layers.0.attn.q_proj-v_proj.a = input : f32[NL,4,8]
  %lora.layers.0.attn.q_proj-v_proj.b = input : f32[NL,16,4]
  %lora_index = input : i32[T]
  @layers.0.attn.q_proj.weight = param : f32[8,8]
  @layers.0.attn.k_proj.weight = param : f32[4,8]
  @layers.0.attn.v_proj.weight = param : f32[4,8]
  %1 = cat(@layers.0.attn.q_proj.weight, @layers.0.attn.k_proj.weight, @layers.0.attn.v_proj.weight) {"dim": 0} : f32[16,8]
  %2 = linear(%0, %1) : f32[T,16]
  %3 = lora(%0, %lora.layers.0.attn.q_proj-v_proj.a, %lora.layers.0.attn.q_proj-v_proj.b, %lora_index, %2) : f32[T,16]
  %4 = slice(%3) {"dim": 1, "start": 8, "end": 12, "step": 1} : f32[T,4]
  %5 = slice(%3) {"dim": 1, "start": 12, "end": 16, "step": 1} : f32[T,4]
  %6 = add(%4, %5) : f32[T,4]
  %lora.layers.0.attn.o_proj.a = input : f32[NL,2,4]
  %lora.layers.0.attn.o_proj.b = input : f32[NL,8,2]
  @layers.0.attn.o_proj.weight = param : f32[8,4]
  %7 = linear(%6, @layers.0.attn.o_proj.weight) : f32[T,8]
  %8 = lora(%6, %lora.layers.0.attn.o_proj.a, %lora.layers.0.attn.o_proj.b, %lora_index, %7) : f32[T,8]
  @lm_head.weight = param : f32[16,8]
  %9 = linear(%8, @lm_head.weight) : f32[T,16]
  return %9
}
"""
LAYOUT = {
    "max_rank": 2, "targets": ["q_proj", "v_proj", "o_proj"], "linears": {
        "layers.0.attn.q_proj-v_proj": {"in_features": 8, "out_features": 16, "rank": 4, "modules": [
            {"name": "layers.0.attn.q_proj", "out": [0, 8], "rank": [0, 2]},
            {"name": "layers.0.attn.v_proj", "out": [12, 16], "rank": [2, 4]}]},
        "layers.0.attn.o_proj": {"in_features": 4, "out_features": 8, "rank": 2, "modules": [
            {"name": "layers.0.attn.o_proj", "out": [0, 8], "rank": [0, 2]}]},
    },
}

PASS = Lora(max_rank=2, targets=("q_proj", "v_proj", "o_proj"))


def test_merged_and_single_linears_get_one_lora_each():
    _, after = rewrite(PASS, BEFORE, AFTER)
    assert after.meta["lora"] == LAYOUT


def test_base_model_unchanged_and_random_adapters_flow_through_fusions():
    before, after = rewrite(PASS, BEFORE, AFTER)
    assert_equivalent("lora", before, after, all_rows=False)  # every token at slot -1: the base model
    fused = get_pass("cse").apply(after)
    assert check_equivalent("cse", after, fused, weight_fn(random_weights(before))) < 1e-5


def test_op_matches_per_token_loop():
    g = torch.Generator().manual_seed(0)
    x, a, b = torch.randn(5, 8, generator=g), torch.randn(3, 4, 8, generator=g), torch.randn(3, 6, 4, generator=g)
    base = torch.randn(5, 6, generator=g)
    index = torch.tensor([0, -1, 2, 1, 0], dtype=torch.int32)
    want = torch.stack([b[i] @ (a[i] @ x[t]) if i >= 0 else torch.zeros(6) for t, i in enumerate(index.tolist())])
    torch.testing.assert_close(OPS["lora"].impl(x, a, b, index), want)
    torch.testing.assert_close(OPS["lora"].impl(x, a, b, index, base), base + want)
    assert torch.equal(OPS["lora"].impl(x, a, b, index, base)[1], base[1])  # -1: the base row itself


@pytest.mark.parametrize(("types", "message"), [
    ((("float32", ("T", 8)), ("float32", ("NL", 4, 8)), ("float32", ("NL", 6, 4)), ("int64", ("T",))), "int32"),
    ((("float32", ("T", 8)), ("float32", ("NL", 4, 8)), ("float32", ("NL", 6, 3)), ("int32", ("T",))), "rank"),
    ((("float32", ("T", 7)), ("float32", ("NL", 4, 8)), ("float32", ("NL", 6, 4)), ("int32", ("T",))), "K or T"),
    ((("float32", ("T", 8)), ("float16", ("NL", 4, 8)), ("float32", ("NL", 6, 4)), ("int32", ("T",))), "dtype"),
    ((("float32", ("T", 8)), ("float32", (4, 8)), ("float32", ("NL", 6, 4)), ("int32", ("T",))), "lora takes"),
    ((("float32", ("T", 8)), ("float32", ("NL", 4, 8)), ("float32", ("NL", 6, 4)), ("int32", ("T",)),
      ("float32", ("T", 5))), "base"),
    ((("float32", ("T", 8)), ("float32", ("NL", 4, 8)), ("float32", ("NL", 6, 4)), ("int32", ("T",)),
      ("float16", ("T", 6))), "base"),
])
def test_type_rule_errors(types, message):
    with pytest.raises(VerifyError, match=message):
        infer_type(OPS["lora"], [TensorType(d, s) for d, s in types], {})


MLP = """graph {
  %input_ids = input : i64[T]
  @embed = param : f32[16,8]
  %0 = embedding(@embed, %input_ids) : f32[T,8]
  @mlp.gate_proj.weight = param : f32[6,8]
  @mlp.up_proj.weight = param : f32[6,8]
  %1 = cat(@mlp.gate_proj.weight, @mlp.up_proj.weight) {"dim": 0} : f32[12,8]
  %2 = linear(%0, %1) : f32[T,12]
  %3 = silu_and_mul(%2) : f32[T,6]
  @mlp.down_proj.weight = param : f32[8,6]
  %4 = linear(%3, @mlp.down_proj.weight) : f32[T,8]
  return %4
}"""


@pytest.mark.parametrize(("targets", "fused", "loras"), [(("gate_proj", "up_proj", "down_proj"), False, 2),
                                                          (("up_proj",), True, 1)])
def test_gated_linear_never_drops_the_down_projections_lora(targets, fused, loras):
    """gated_linear's activation result is not written by every kernel: with a lora reading the
    activation the down projection stays a linear; without one it fuses as before."""
    graph = Lora(max_rank=2, targets=targets).apply(parse_graph(MLP))
    out = get_pass("gated-linear").apply(graph)
    verify(out)
    ops = [n.op for n in out.nodes]
    assert ("gated_linear" in ops) is fused
    assert ops.count("lora") == loras
    assert check_equivalent("gated-linear", graph, out, weight_fn(random_weights(graph))) < 1e-5


QUANT = """graph {
  %input_ids = input : i64[T]
  @embed = param : f32[16,16]
  %0 = embedding(@embed, %input_ids) : f32[T,16]
  @attn.o_proj.qweight = param : u8[8,8]
  @attn.o_proj.scales = param : f32[8,2]
  @attn.o_proj.zeros = param : u8[8,2]
  %1 = dequant_int(@attn.o_proj.qweight, @attn.o_proj.scales, @attn.o_proj.zeros) {"bits": 4, "group_size": 8, "dtype": "float32"} : f32[8,16]
  %2 = linear(%0, %1) : f32[T,8]
  return %2
}"""


def test_quantized_base_keeps_the_lora():
    graph = Lora(max_rank=4, targets=("o_proj",)).apply(parse_graph(QUANT))
    out = get_pass("quantized-linear").apply(graph)
    verify(out)
    lora = out.outputs[0]
    assert lora.op == "lora" and lora.inputs[4].op == "quantized_linear"
    assert check_equivalent("quantized-linear", graph, out, weight_fn(random_weights(graph))) < 1e-5
    assert out.meta["lora"]["linears"]["attn.o_proj"]["modules"][0]["name"] == "attn.o_proj"


def test_pipeline_placement_and_options():
    names = with_lora_pass(pipeline("cuda"))
    assert names.index("lora") == names.index("merge-projections") + 1
    assert names.index("lora") < names.index("quantized-linear") < names.index("gated-linear")
    assert lora_pass(None, None) is None
    assert lora_pass(8, ["q_proj", "o_proj"]) == Lora(max_rank=8, targets=("q_proj", "o_proj"))
    with pytest.raises(ValueError, match="choose among"):
        lora_pass(8, ["qkv_proj"])
    with pytest.raises(ValueError, match="positive"):
        lora_pass(0, None)
    with pytest.raises(ValueError, match="needs max_lora_rank"):
        lora_pass(None, ["q_proj"])
    with pytest.raises(ValueError, match="no linear layer"):
        Lora(max_rank=2, targets=("k_proj",)).apply(parse_graph(MLP))
