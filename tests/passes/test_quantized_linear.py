"""quantized-linear: linears over dequantized weights read the packed weights (quantized_linear);
merged projections (QKV, gate/up) keep working on packed weights."""

from __future__ import annotations

import pytest
import torch
from pass_harness import batch_inputs, canonical, rewrite

from kiln.ir import Graph, parse_graph, print_graph, run_graph, verify
from kiln.ir.dims import evaluate
from kiln.ir.types import torch_dtype
from kiln.passes import PassManager, get_pass
from kiln.passes.registry import pipeline


def quant_weights(graph: Graph, seed: int = 0) -> dict[str, torch.Tensor]:
    """Valid random params by name: packed bytes for *.qweight (u8), 4-bit zero points for
    *.zeros, act-order groups for *.g_idx, positive scales, fp8 values, the rest N(0, 0.5)."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for p in graph.params:
        shape = [evaluate(d, {}) for d in p.type.shape]
        name, dt = p.name, p.type.dtype
        if name.endswith("qweight") and dt == "uint8":
            t = torch.randint(0, 256, shape, generator=g, dtype=torch.uint8)
        elif name.endswith("zeros"):
            t = torch.randint(0, 16, shape, generator=g, dtype=torch.uint8)
        elif name.endswith("g_idx"):
            t = (torch.arange(shape[0]) // 8)[torch.randperm(shape[0], generator=g)].to(torch.int32)
        elif name.endswith("scales"):
            t = (torch.rand(shape, generator=g) * 0.05 + 0.01).to(torch_dtype(dt))
        else:
            t = (torch.randn(shape, generator=g) * 0.5).to(torch_dtype(dt))
        out[name] = t
    return out


def assert_same_outputs(before: Graph, after: Graph, tol: float = 1e-5) -> None:
    """Both graphs on the same valid quantized weights and the same batch: equal outputs."""
    weights = quant_weights(before)

    def fn(name, type_):
        return weights[name]

    with torch.no_grad():
        want = run_graph(before, batch_inputs(before), fn)
        got = run_graph(after, batch_inputs(after), fn)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=tol, atol=tol)


INT4_BEFORE = """graph {
  %input_ids = input : i64[T]
  @embed = param : f32[16,16]
  %0 = embedding(@embed, %input_ids) : f32[T,16]
  @o.qweight = param : u8[8,8]
  @o.scales = param : f32[8,2]
  @o.zeros = param : u8[8,2]
  %1 = dequant_int(@o.qweight, @o.scales, @o.zeros) {"bits": 4, "group_size": 8, "dtype": "float32"} : f32[8,16]
  @o.bias = param : f32[8]
  %2 = linear(%0, %1, @o.bias) : f32[T,8]
  return %2
}"""
INT4_AFTER = """graph {
  %input_ids = input : i64[T]
  @embed = param : f32[16,16]
  %0 = embedding(@embed, %input_ids) : f32[T,16]
  @o.qweight = param : u8[8,8]
  @o.scales = param : f32[8,2]
  @o.zeros = param : u8[8,2]
  @o.bias = param : f32[8]
  %1 = quantized_linear(%0, @o.qweight, @o.scales, @o.zeros, @o.bias) {"format": "int", "bits": 4, "group_size": 8, "act": "none", "dtype": "float32", "has_zeros": true, "has_g_idx": false, "has_bias": true} : f32[T,8]
  return %1
}"""

W8A8_FP8_BEFORE = """graph {
  %input_ids = input : i64[T]
  @embed = param : f32[16,16]
  %0 = embedding(@embed, %input_ids) : f32[T,16]
  %1 = quant_act(%0) {"format": "int8"} : f32[T,16]
  @o.qweight = param : f8e4m3[8,16]
  @o.scales = param : f32[8,1]
  %2 = dequant_fp8(@o.qweight, @o.scales) {"block_n": 1, "block_k": 16, "dtype": "float32"} : f32[8,16]
  %3 = linear(%1, %2) : f32[T,8]
  return %3
}"""
W8A8_FP8_AFTER = """graph {
  %input_ids = input : i64[T]
  @embed = param : f32[16,16]
  %0 = embedding(@embed, %input_ids) : f32[T,16]
  @o.qweight = param : f8e4m3[8,16]
  @o.scales = param : f32[8,1]
  %1 = quantized_linear(%0, @o.qweight, @o.scales) {"format": "fp8", "block_n": 1, "block_k": 16, "act": "int8", "dtype": "float32", "has_zeros": false, "has_g_idx": false, "has_bias": false} : f32[T,8]
  return %1
}"""


# GGUF's Q4_1: float offsets per group (w = q * scale + offset)
INT4_OFFSETS_BEFORE = """graph {
  %input_ids = input : i64[T]
  @embed = param : f32[16,16]
  %0 = embedding(@embed, %input_ids) : f32[T,16]
  @o.qweight = param : u8[8,8]
  @o.scales = param : f16[8,2]
  @o.offsets = param : f16[8,2]
  %1 = dequant_int_offset(@o.qweight, @o.scales, @o.offsets) {"bits": 4, "group_size": 8, "dtype": "float32"} : f32[8,16]
  %2 = linear(%0, %1) : f32[T,8]
  return %2
}"""
INT4_OFFSETS_AFTER = """graph {
  %input_ids = input : i64[T]
  @embed = param : f32[16,16]
  %0 = embedding(@embed, %input_ids) : f32[T,16]
  @o.qweight = param : u8[8,8]
  @o.scales = param : f16[8,2]
  @o.offsets = param : f16[8,2]
  %1 = quantized_linear(%0, @o.qweight, @o.scales, @o.offsets) {"format": "int", "bits": 4, "group_size": 8, "has_offsets": true, "act": "none", "dtype": "float32", "has_zeros": false, "has_g_idx": false, "has_bias": false} : f32[T,8]
  return %1
}"""
CASES = {"int4_zeros_bias": (INT4_BEFORE, INT4_AFTER), "w8a8_fp8": (W8A8_FP8_BEFORE, W8A8_FP8_AFTER),
         "int4_offsets": (INT4_OFFSETS_BEFORE, INT4_OFFSETS_AFTER)}


@pytest.mark.parametrize("case", sorted(CASES))
def test_a_dequantized_linear_becomes_quantized_linear(case):
    before, after = CASES[case]
    graph, result = rewrite("quantized-linear", before, after)
    assert_same_outputs(graph, result, tol=0)


def _qkv(g_idx: str, zeros: bool = True, offsets: bool = False) -> str:
    """Three int4 projections of one activation; g_idx: "" (none), "shared" or "own"; with
    offsets, dequant_int_offset's float offsets in place of zeros and g_idx."""
    lines = ["  %input_ids = input : i64[T]", "  @embed = param : f32[16,16]",
             "  %x = embedding(@embed, %input_ids) : f32[T,16]"]
    if g_idx == "shared":
        lines.append("  @g_idx = param : i32[16]")
    outs = []
    for name, n in (("q", 8), ("k", 4), ("v", 4)):
        extra = []
        lines += [f"  @{name}.qweight = param : u8[{n},8]", f"  @{name}.scales = param : f32[{n},2]"]
        if offsets:
            lines.append(f"  @{name}.offsets = param : f32[{n},2]")
            extra.append(f"@{name}.offsets")
        elif zeros:
            lines.append(f"  @{name}.zeros = param : u8[{n},2]")
            extra.append(f"@{name}.zeros")
        if g_idx == "own":
            lines.append(f"  @{name}.g_idx = param : i32[16]")
            extra.append(f"@{name}.g_idx")
        elif g_idx == "shared":
            extra.append("@g_idx")
        ops = ", ".join([f"@{name}.qweight", f"@{name}.scales", *extra])
        op = "dequant_int_offset" if offsets else "dequant_int"
        lines += [f'  %{name}w = {op}({ops}) {{"bits": 4, "group_size": 8, "dtype": "float32"}} : f32[{n},16]',
                  f"  @{name}.bias = param : f32[{n}]",
                  f"  %{name} = linear(%x, %{name}w, @{name}.bias) : f32[T,{n}]"]
        outs.append(f"%{name}")
    return "graph {\n" + "\n".join(lines) + f"\n  return {', '.join(outs)}\n}}"


def _merged_then_quantized(text: str) -> tuple[Graph, Graph]:
    graph = parse_graph(text)
    verify(graph)
    merged = get_pass("merge-projections").apply(graph)
    result = get_pass("quantized-linear").apply(merged)
    verify(result)
    return graph, result


QKV_MERGED_AFTER = """graph {
  %input_ids = input : i64[T]
  @embed = param : f32[16,16]
  %0 = embedding(@embed, %input_ids) : f32[T,16]
  @q.qweight = param : u8[8,8]
  @k.qweight = param : u8[4,8]
  @v.qweight = param : u8[4,8]
  %1 = cat(@q.qweight, @k.qweight, @v.qweight) {"dim": 0} : u8[16,8]
  @q.scales = param : f32[8,2]
  @k.scales = param : f32[4,2]
  @v.scales = param : f32[4,2]
  %2 = cat(@q.scales, @k.scales, @v.scales) {"dim": 0} : f32[16,2]
  @q.zeros = param : u8[8,2]
  @k.zeros = param : u8[4,2]
  @v.zeros = param : u8[4,2]
  %3 = cat(@q.zeros, @k.zeros, @v.zeros) {"dim": 0} : u8[16,2]
  @g_idx = param : i32[16]
  @q.bias = param : f32[8]
  @k.bias = param : f32[4]
  @v.bias = param : f32[4]
  %4 = cat(@q.bias, @k.bias, @v.bias) {"dim": 0} : f32[16]
  %5 = quantized_linear(%0, %1, %2, %3, @g_idx, %4) {"format": "int", "bits": 4, "group_size": 8, "act": "none", "dtype": "float32", "has_zeros": true, "has_g_idx": true, "has_bias": true} : f32[T,16]
  %6 = slice(%5) {"dim": 1, "start": 0, "end": 8, "step": 1} : f32[T,8]
  %7 = slice(%5) {"dim": 1, "start": 8, "end": 12, "step": 1} : f32[T,4]
  %8 = slice(%5) {"dim": 1, "start": 12, "end": 16, "step": 1} : f32[T,4]
  return %6, %7, %8
}"""


def test_merged_qkv_concatenates_the_packed_weights():
    graph, result = _merged_then_quantized(_qkv("shared"))
    assert print_graph(result) == canonical(QKV_MERGED_AFTER)
    assert_same_outputs(graph, result)


@pytest.mark.parametrize("g_idx,zeros", [("", True), ("", False)])
def test_merged_projections_without_act_order(g_idx, zeros):
    graph, result = _merged_then_quantized(_qkv(g_idx, zeros))
    (ql,) = [n for n in result.nodes if n.op == "quantized_linear"]
    assert ql.attrs["has_zeros"] == zeros and not ql.attrs["has_g_idx"]
    assert not any(n.op in ("dequant_int", "linear") for n in result.nodes)
    assert_same_outputs(graph, result)


def test_merged_projections_with_offsets_concatenate_them():
    graph, result = _merged_then_quantized(_qkv("", offsets=True))
    (ql,) = [n for n in result.nodes if n.op == "quantized_linear"]
    assert ql.attrs["has_offsets"] and not ql.attrs["has_zeros"] and ql.inputs[3].op == "cat"
    assert ql.inputs[3].type.shape == (16, 2)
    assert not any(n.op in ("dequant_int_offset", "linear") for n in result.nodes)
    assert_same_outputs(graph, result)


def test_merged_projections_with_their_own_g_idx_split_into_packed_products():
    # one g_idx param per projection: nothing proves they are equal, so each keeps its own
    graph, result = _merged_then_quantized(_qkv("own"))
    qls = [n for n in result.nodes if n.op == "quantized_linear"]
    assert len(qls) == 3 and all(n.attrs["has_g_idx"] and n.attrs["has_bias"] for n in qls)
    assert not any(n.op in ("dequant_int", "linear") for n in result.nodes)
    assert_same_outputs(graph, result)


GATE_UP_MIXED = """graph {
  %input_ids = input : i64[T]
  @embed = param : f32[16,16]
  %0 = embedding(@embed, %input_ids) : f32[T,16]
  @gate.qweight = param : f8e4m3[12,16]
  @gate.scales = param : f32[1,1]
  %1 = dequant_fp8(@gate.qweight, @gate.scales) {"block_n": 12, "block_k": 16, "dtype": "float32"} : f32[12,16]
  %2 = linear(%0, %1) : f32[T,12]
  %3 = silu(%2) : f32[T,12]
  @up.weight = param : f32[12,16]
  %4 = linear(%0, @up.weight) : f32[T,12]
  %5 = mul(%3, %4) : f32[T,12]
  return %5
}"""


def test_a_merged_weight_of_a_packed_and_a_dense_part_splits():
    graph, result = _merged_then_quantized(GATE_UP_MIXED)
    ops = [n.op for n in result.ops()]
    assert ops.count("quantized_linear") == 1 and ops.count("linear") == 1 and "dequant_fp8" not in ops
    assert_same_outputs(graph, result)


def test_fp8_blocks_concatenate_when_every_part_holds_whole_blocks():
    text = """graph {
  %input_ids = input : i64[T]
  @embed = param : f32[16,16]
  %0 = embedding(@embed, %input_ids) : f32[T,16]
  @a.qweight = param : f8e4m3[8,16]
  @a.scales = param : f32[2,2]
  %1 = dequant_fp8(@a.qweight, @a.scales) {"block_n": 4, "block_k": 8, "dtype": "float32"} : f32[8,16]
  %2 = linear(%0, %1) : f32[T,8]
  @b.qweight = param : f8e4m3[6,16]
  @b.scales = param : f32[2,2]
  %3 = dequant_fp8(@b.qweight, @b.scales) {"block_n": 4, "block_k": 8, "dtype": "float32"} : f32[6,16]
  %4 = linear(%0, %3) : f32[T,6]
  return %2, %4
}"""
    graph, result = _merged_then_quantized(text)
    (ql,) = [n for n in result.nodes if n.op == "quantized_linear"]
    assert ql.inputs[1].op == "cat" and ql.inputs[2].type.shape == (4, 2)
    assert_same_outputs(graph, result)
    # the 6-row part first would leave a partial block inside the merged weight: split
    lines = text.splitlines()
    swapped = "\n".join([*lines[:4], *lines[8:12], *lines[4:8], *lines[12:]])
    graph, result = _merged_then_quantized(swapped)
    assert [n.op for n in result.ops()].count("quantized_linear") == 2
    assert_same_outputs(graph, result)


UNCHANGED = {
    "dense": """graph {
  %input_ids = input : i64[T]
  @embed = param : f32[16,16]
  %0 = embedding(@embed, %input_ids) : f32[T,16]
  @w = param : f32[8,16]
  %1 = linear(%0, @w) : f32[T,8]
  return %1
}""",
    "quant_act_of_a_dense_weight": """graph {
  %input_ids = input : i64[T]
  @embed = param : f32[16,16]
  %0 = embedding(@embed, %input_ids) : f32[T,16]
  %1 = quant_act(%0) {"format": "int8"} : f32[T,16]
  @w = param : f32[8,16]
  %2 = linear(%1, @w) : f32[T,8]
  return %2
}""",
}


@pytest.mark.parametrize("case", sorted(UNCHANGED))
def test_unmatched_is_unchanged(case):
    rewrite("quantized-linear", UNCHANGED[case], UNCHANGED[case])


@pytest.mark.parametrize("target", ["reference", "cpu", "cuda"])
def test_pipelines_keep_merged_packed_weights(target):
    # the whole pipeline of each target on the quantized QKV block: one quantized_linear
    names = pipeline(target)
    assert names.index("quantized-linear") > names.index("merge-projections")
    for later in ("gated-linear", "weight-panels"):
        if later in names:
            assert names.index("quantized-linear") < names.index(later)
    graph = parse_graph(_qkv("shared"))
    result = PassManager([get_pass(n) for n in names]).run(graph)
    assert [n.op for n in result.ops()].count("quantized_linear") == 1
    assert not any(n.op == "dequant_int" for n in result.nodes)


def test_inspect_lists_each_format_and_shape_with_its_bytes():
    from kiln.runtime.inspect import quantized_matmuls

    _, result = _merged_then_quantized(_qkv("own"))
    lines = quantized_matmuls(result)
    # q: qweight 8 x 8 bytes + scales 8 x 2 x 4 + zeros 8 x 2 + g_idx 16 x 4 = 208 bytes; k, v: 136
    assert lines[0] == "quantized  3 matmuls, 480 B of packed weights (dense: 1.0 KiB)"
    assert lines[1].split() == ["int4", "group", "8", "zeros", "act-order", "[8,", "16]", "x1", "208", "B", "each"]
    assert lines[2].split()[-5:] == ["16]", "x2", "136", "B", "each"]
    _, w8a8 = rewrite("quantized-linear", W8A8_FP8_BEFORE, W8A8_FP8_AFTER)
    assert quantized_matmuls(w8a8)[1].startswith("  fp8 e4m3 blocks 1x16, act int8 ")
    _, q4_1 = rewrite("quantized-linear", INT4_OFFSETS_BEFORE, INT4_OFFSETS_AFTER)
    assert quantized_matmuls(q4_1)[1].split()[:4] == ["int4", "group", "8", "offsets"]
    assert quantized_matmuls(parse_graph(UNCHANGED["dense"])) == []
