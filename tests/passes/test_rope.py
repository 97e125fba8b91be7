"""rope: the traced rotary embedding becomes one `rope` op over position tables."""

from __future__ import annotations

import pytest
import torch
from pass_harness import assert_equivalent, random_weights, rewrite, weight_fn

from kiln.codegen.fold_weights import fold_weights
from kiln.frontend import import_model
from kiln.ir import Graph, parse_graph, run_graph, verify
from kiln.passes import PassManager, get_pass
from kiln.passes.base import weight_only
from kiln.passes.registry import pipeline
from kiln.passes.rope import DEFAULT_MAX_POSITIONS, Rope

ROPE = Rope(max_positions=32)

NEOX_BEFORE = """graph {
  %input_ids = input : i64[T]
  %position_ids = input : i64[T]
  @embed = param : f32[16,8]
  %0 = embedding(@embed, %input_ids) : f32[T,8]
  %1 = reshape(%0) {"shape": ["T", 2, 4]} : f32[T,2,4]
  %2 = permute(%1) {"dims": [1, 0, 2]} : f32[2,T,4]
  %3 = reshape(%position_ids) {"shape": ["T", 1]} : i64[T,1]
  %4 = cast(%3) {"dtype": "float32"} : f32[T,1]
  @inv_freq = param : f32[2]
  %5 = mul(%4, @inv_freq) : f32[T,2]
  %6 = cat(%5, %5) {"dim": 1} : f32[T,4]
  %7 = cos(%6) : f32[T,4]
  %8 = reshape(%7) {"shape": [1, "T", 4]} : f32[1,T,4]
  %9 = mul(%2, %8) : f32[2,T,4]
  %10 = slice(%2) {"dim": 2, "start": 2, "end": 4, "step": 1} : f32[2,T,2]
  %11 = neg(%10) : f32[2,T,2]
  %12 = slice(%2) {"dim": 2, "start": 0, "end": 2, "step": 1} : f32[2,T,2]
  %13 = cat(%11, %12) {"dim": 2} : f32[2,T,4]
  %14 = sin(%6) : f32[T,4]
  %15 = reshape(%14) {"shape": [1, "T", 4]} : f32[1,T,4]
  %16 = mul(%13, %15) : f32[2,T,4]
  %17 = add(%9, %16) : f32[2,T,4]
  %18 = permute(%17) {"dims": [1, 0, 2]} : f32[T,2,4]
  %19 = reshape(%18) {"shape": ["T", 8]} : f32[T,8]
  return %19
}"""
NEOX_AFTER = """graph {
  %input_ids = input : i64[T]
  %position_ids = input : i64[T]
  @embed = param : f32[16,8]
  %0 = embedding(@embed, %input_ids) : f32[T,8]
  %1 = reshape(%0) {"shape": ["T", 2, 4]} : f32[T,2,4]
  %2 = arange() {"start": 0, "end": 32, "step": 1, "dtype": "int64"} : i64[32]
  %3 = reshape(%2) {"shape": [32, 1]} : i64[32,1]
  %4 = cast(%3) {"dtype": "float32"} : f32[32,1]
  @inv_freq = param : f32[2]
  %5 = mul(%4, @inv_freq) : f32[32,2]
  %6 = cat(%5, %5) {"dim": 1} : f32[32,4]
  %7 = cos(%6) : f32[32,4]
  %8 = sin(%6) : f32[32,4]
  %9 = rope(%1, %position_ids, %7, %8) {"style": "neox", "rotary_dim": 4} : f32[T,2,4]
  %10 = reshape(%9) {"shape": ["T", 8]} : f32[T,8]
  return %10
}"""

# cohere: q.float() rotated in pairs by bf16 tables, the result cast back to bf16.
INTERLEAVED_BF16_BEFORE = """graph {
  %input_ids = input : i64[T]
  %position_ids = input : i64[T]
  @embed = param : bf16[16,8]
  %0 = embedding(@embed, %input_ids) : bf16[T,8]
  %1 = reshape(%0) {"shape": ["T", 2, 4]} : bf16[T,2,4]
  %2 = permute(%1) {"dims": [1, 0, 2]} : bf16[2,T,4]
  %3 = cast(%2) {"dtype": "float32"} : f32[2,T,4]
  %4 = reshape(%position_ids) {"shape": ["T", 1]} : i64[T,1]
  %5 = cast(%4) {"dtype": "float32"} : f32[T,1]
  @inv_freq = param : f32[2]
  %6 = mul(%5, @inv_freq) : f32[T,2]
  %7 = repeat_interleave(%6) {"repeats": 2, "dim": 1} : f32[T,4]
  %8 = cos(%7) : f32[T,4]
  %9 = cast(%8) {"dtype": "bfloat16"} : bf16[T,4]
  %10 = reshape(%9) {"shape": [1, "T", 4]} : bf16[1,T,4]
  %11 = mul(%3, %10) : f32[2,T,4]
  %12 = slice(%3) {"dim": 2, "start": 1, "end": 4, "step": 2} : f32[2,T,2]
  %13 = neg(%12) : f32[2,T,2]
  %14 = reshape(%13) {"shape": [2, "T", 2, 1]} : f32[2,T,2,1]
  %15 = slice(%3) {"dim": 2, "start": 0, "end": 4, "step": 2} : f32[2,T,2]
  %16 = reshape(%15) {"shape": [2, "T", 2, 1]} : f32[2,T,2,1]
  %17 = cat(%14, %16) {"dim": 3} : f32[2,T,2,2]
  %18 = reshape(%17) {"shape": [2, "T", 4]} : f32[2,T,4]
  %19 = sin(%7) : f32[T,4]
  %20 = cast(%19) {"dtype": "bfloat16"} : bf16[T,4]
  %21 = reshape(%20) {"shape": [1, "T", 4]} : bf16[1,T,4]
  %22 = mul(%18, %21) : f32[2,T,4]
  %23 = add(%11, %22) : f32[2,T,4]
  %24 = cast(%23) {"dtype": "bfloat16"} : bf16[2,T,4]
  %25 = permute(%24) {"dims": [1, 0, 2]} : bf16[T,2,4]
  return %25
}"""
INTERLEAVED_BF16_AFTER = """graph {
  %input_ids = input : i64[T]
  %position_ids = input : i64[T]
  @embed = param : bf16[16,8]
  %0 = embedding(@embed, %input_ids) : bf16[T,8]
  %1 = reshape(%0) {"shape": ["T", 2, 4]} : bf16[T,2,4]
  %2 = cast(%1) {"dtype": "float32"} : f32[T,2,4]
  %3 = arange() {"start": 0, "end": 32, "step": 1, "dtype": "int64"} : i64[32]
  %4 = reshape(%3) {"shape": [32, 1]} : i64[32,1]
  %5 = cast(%4) {"dtype": "float32"} : f32[32,1]
  @inv_freq = param : f32[2]
  %6 = mul(%5, @inv_freq) : f32[32,2]
  %7 = repeat_interleave(%6) {"repeats": 2, "dim": 1} : f32[32,4]
  %8 = cos(%7) : f32[32,4]
  %9 = cast(%8) {"dtype": "bfloat16"} : bf16[32,4]
  %10 = sin(%7) : f32[32,4]
  %11 = cast(%10) {"dtype": "bfloat16"} : bf16[32,4]
  %12 = rope(%2, %position_ids, %9, %11) {"style": "interleaved", "rotary_dim": 4} : f32[T,2,4]
  %13 = cast(%12) {"dtype": "bfloat16"} : bf16[T,2,4]
  return %13
}"""

# phi/stablelm: the first 4 of 8 features rotate; bf16 activations, tables cast from f32.
PARTIAL_BF16_BEFORE = """graph {
  %input_ids = input : i64[T]
  %position_ids = input : i64[T]
  @embed = param : bf16[16,16]
  %0 = embedding(@embed, %input_ids) : bf16[T,16]
  %1 = reshape(%0) {"shape": ["T", 2, 8]} : bf16[T,2,8]
  %2 = permute(%1) {"dims": [1, 0, 2]} : bf16[2,T,8]
  %3 = slice(%2) {"dim": 2, "start": 0, "end": 4, "step": 1} : bf16[2,T,4]
  %4 = reshape(%position_ids) {"shape": ["T", 1]} : i64[T,1]
  %5 = cast(%4) {"dtype": "float32"} : f32[T,1]
  @inv_freq = param : f32[2]
  %6 = mul(%5, @inv_freq) : f32[T,2]
  %7 = cat(%6, %6) {"dim": 1} : f32[T,4]
  %8 = cos(%7) : f32[T,4]
  %9 = cast(%8) {"dtype": "bfloat16"} : bf16[T,4]
  %10 = reshape(%9) {"shape": [1, "T", 4]} : bf16[1,T,4]
  %11 = mul(%3, %10) : bf16[2,T,4]
  %12 = slice(%3) {"dim": 2, "start": 2, "end": 4, "step": 1} : bf16[2,T,2]
  %13 = neg(%12) : bf16[2,T,2]
  %14 = slice(%3) {"dim": 2, "start": 0, "end": 2, "step": 1} : bf16[2,T,2]
  %15 = cat(%13, %14) {"dim": 2} : bf16[2,T,4]
  %16 = sin(%7) : f32[T,4]
  %17 = cast(%16) {"dtype": "bfloat16"} : bf16[T,4]
  %18 = reshape(%17) {"shape": [1, "T", 4]} : bf16[1,T,4]
  %19 = mul(%15, %18) : bf16[2,T,4]
  %20 = add(%11, %19) : bf16[2,T,4]
  %21 = slice(%2) {"dim": 2, "start": 4, "end": 8, "step": 1} : bf16[2,T,4]
  %22 = cat(%20, %21) {"dim": 2} : bf16[2,T,8]
  %23 = permute(%22) {"dims": [1, 0, 2]} : bf16[T,2,8]
  return %23
}"""
PARTIAL_BF16_AFTER = """graph {
  %input_ids = input : i64[T]
  %position_ids = input : i64[T]
  @embed = param : bf16[16,16]
  %0 = embedding(@embed, %input_ids) : bf16[T,16]
  %1 = reshape(%0) {"shape": ["T", 2, 8]} : bf16[T,2,8]
  %2 = arange() {"start": 0, "end": 32, "step": 1, "dtype": "int64"} : i64[32]
  %3 = reshape(%2) {"shape": [32, 1]} : i64[32,1]
  %4 = cast(%3) {"dtype": "float32"} : f32[32,1]
  @inv_freq = param : f32[2]
  %5 = mul(%4, @inv_freq) : f32[32,2]
  %6 = cat(%5, %5) {"dim": 1} : f32[32,4]
  %7 = cos(%6) : f32[32,4]
  %8 = cast(%7) {"dtype": "bfloat16"} : bf16[32,4]
  %9 = sin(%6) : f32[32,4]
  %10 = cast(%9) {"dtype": "bfloat16"} : bf16[32,4]
  %11 = rope(%1, %position_ids, %8, %10) {"style": "neox", "rotary_dim": 4} : bf16[T,2,8]
  return %11
}"""

# gpt_oss: the halves rotated with half-width tables (attention scaling 1.25 included).
HALVES_BEFORE = """graph {
  %input_ids = input : i64[T]
  %position_ids = input : i64[T]
  @embed = param : f32[16,8]
  %0 = embedding(@embed, %input_ids) : f32[T,8]
  %1 = reshape(%0) {"shape": ["T", 2, 4]} : f32[T,2,4]
  %2 = permute(%1) {"dims": [1, 0, 2]} : f32[2,T,4]
  %3 = slice(%2) {"dim": 2, "start": 0, "end": 2, "step": 1} : f32[2,T,2]
  %4 = reshape(%position_ids) {"shape": ["T", 1]} : i64[T,1]
  %5 = cast(%4) {"dtype": "float32"} : f32[T,1]
  @inv_freq = param : f32[2]
  %6 = mul(%5, @inv_freq) : f32[T,2]
  %7 = cos(%6) : f32[T,2]
  %8 = mul(%7, 1.25) : f32[T,2]
  %9 = reshape(%8) {"shape": [1, "T", 2]} : f32[1,T,2]
  %10 = mul(%3, %9) : f32[2,T,2]
  %11 = slice(%2) {"dim": 2, "start": 2, "end": 4, "step": 1} : f32[2,T,2]
  %12 = sin(%6) : f32[T,2]
  %13 = mul(%12, 1.25) : f32[T,2]
  %14 = reshape(%13) {"shape": [1, "T", 2]} : f32[1,T,2]
  %15 = mul(%11, %14) : f32[2,T,2]
  %16 = sub(%10, %15) : f32[2,T,2]
  %17 = mul(%11, %9) : f32[2,T,2]
  %18 = mul(%3, %14) : f32[2,T,2]
  %19 = add(%17, %18) : f32[2,T,2]
  %20 = cat(%16, %19) {"dim": 2} : f32[2,T,4]
  %21 = permute(%20) {"dims": [1, 0, 2]} : f32[T,2,4]
  return %21
}"""
HALVES_AFTER = """graph {
  %input_ids = input : i64[T]
  %position_ids = input : i64[T]
  @embed = param : f32[16,8]
  %0 = embedding(@embed, %input_ids) : f32[T,8]
  %1 = reshape(%0) {"shape": ["T", 2, 4]} : f32[T,2,4]
  %2 = arange() {"start": 0, "end": 32, "step": 1, "dtype": "int64"} : i64[32]
  %3 = reshape(%2) {"shape": [32, 1]} : i64[32,1]
  %4 = cast(%3) {"dtype": "float32"} : f32[32,1]
  @inv_freq = param : f32[2]
  %5 = mul(%4, @inv_freq) : f32[32,2]
  %6 = cos(%5) : f32[32,2]
  %7 = mul(%6, 1.25) : f32[32,2]
  %8 = cat(%7, %7) {"dim": 1} : f32[32,4]
  %9 = sin(%5) : f32[32,2]
  %10 = mul(%9, 1.25) : f32[32,2]
  %11 = cat(%10, %10) {"dim": 1} : f32[32,4]
  %12 = rope(%1, %position_ids, %8, %11) {"style": "neox", "rotary_dim": 4} : f32[T,2,4]
  return %12
}"""

# Tokens first (transformers' unsqueeze_dim=2): x is already [T, H, D], no permute added.
TOKENS_FIRST_BEFORE = """graph {
  %input_ids = input : i64[T]
  %position_ids = input : i64[T]
  @embed = param : f32[16,8]
  %0 = embedding(@embed, %input_ids) : f32[T,8]
  %1 = reshape(%0) {"shape": ["T", 2, 4]} : f32[T,2,4]
  %2 = reshape(%position_ids) {"shape": ["T", 1]} : i64[T,1]
  %3 = cast(%2) {"dtype": "float32"} : f32[T,1]
  @inv_freq = param : f32[2]
  %4 = mul(%3, @inv_freq) : f32[T,2]
  %5 = cat(%4, %4) {"dim": 1} : f32[T,4]
  %6 = cos(%5) : f32[T,4]
  %7 = reshape(%6) {"shape": ["T", 1, 4]} : f32[T,1,4]
  %8 = sin(%5) : f32[T,4]
  %9 = reshape(%8) {"shape": ["T", 1, 4]} : f32[T,1,4]
  %10 = slice(%1) {"dim": 2, "start": 2, "end": 4, "step": 1} : f32[T,2,2]
  %11 = neg(%10) : f32[T,2,2]
  %12 = slice(%1) {"dim": 2, "start": 0, "end": 2, "step": 1} : f32[T,2,2]
  %13 = cat(%11, %12) {"dim": 2} : f32[T,2,4]
  %14 = mul(%9, %13) : f32[T,2,4]
  %15 = mul(%7, %1) : f32[T,2,4]
  %16 = add(%14, %15) : f32[T,2,4]
  return %16
}"""
TOKENS_FIRST_AFTER = """graph {
  %input_ids = input : i64[T]
  %position_ids = input : i64[T]
  @embed = param : f32[16,8]
  %0 = embedding(@embed, %input_ids) : f32[T,8]
  %1 = reshape(%0) {"shape": ["T", 2, 4]} : f32[T,2,4]
  %2 = arange() {"start": 0, "end": 32, "step": 1, "dtype": "int64"} : i64[32]
  %3 = reshape(%2) {"shape": [32, 1]} : i64[32,1]
  %4 = cast(%3) {"dtype": "float32"} : f32[32,1]
  @inv_freq = param : f32[2]
  %5 = mul(%4, @inv_freq) : f32[32,2]
  %6 = cat(%5, %5) {"dim": 1} : f32[32,4]
  %7 = cos(%6) : f32[32,4]
  %8 = sin(%6) : f32[32,4]
  %9 = rope(%1, %position_ids, %7, %8) {"style": "neox", "rotary_dim": 4} : f32[T,2,4]
  return %9
}"""

MATCHED = {
    "neox": (NEOX_BEFORE, NEOX_AFTER),
    "interleaved_bf16_promotion": (INTERLEAVED_BF16_BEFORE, INTERLEAVED_BF16_AFTER),
    "partial_rotary_bf16": (PARTIAL_BF16_BEFORE, PARTIAL_BF16_AFTER),
    "split_halves": (HALVES_BEFORE, HALVES_AFTER),
    "tokens_first_layout": (TOKENS_FIRST_BEFORE, TOKENS_FIRST_AFTER),
}


@pytest.mark.parametrize("case", sorted(MATCHED))
def test_rewrites_bit_exact(case):
    before, after = MATCHED[case]
    graph, result = rewrite(ROPE, before, after)
    assert_equivalent("rope", graph, result, tol=0.0)


UNCHANGED = {
    # the "cos" comes from the token ids, not the positions: not a rotary embedding
    "table_from_token_ids": NEOX_BEFORE.replace("reshape(%position_ids)", "reshape(%input_ids)"),
    # the halves rotate the other way round
    "wrong_rotation": NEOX_BEFORE.replace('"start": 2, "end": 4', '"start": 9, "end": 9').replace(
        '"start": 0, "end": 2', '"start": 2, "end": 4').replace('"start": 9, "end": 9', '"start": 0, "end": 2'),
    # row t of the table depends on other positions: no per-position table reproduces it
    "table_mixes_positions": NEOX_BEFORE.replace(
        '%5 = mul(%4, @inv_freq) : f32[T,2]',
        '%20 = mul(%4, @inv_freq) : f32[T,2]\n  %5 = flip(%20) {"dims": [0]} : f32[T,2]'),
}


@pytest.mark.parametrize("case", sorted(UNCHANGED))
def test_not_rotary_is_unchanged(case):
    rewrite(ROPE, UNCHANGED[case], UNCHANGED[case])


def test_table_length_from_meta_or_default():
    graph = parse_graph(NEOX_BEFORE)
    (arange,) = [n for n in Rope().apply(graph).nodes if n.op == "arange"]
    assert arange.attrs["end"] == DEFAULT_MAX_POSITIONS
    graph.meta["max_position_embeddings"] = 48
    (arange,) = [n for n in Rope().apply(graph).nodes if n.op == "arange"]
    assert arange.attrs["end"] == 48


def test_tables_fold_into_stored_weights():
    graph = parse_graph(NEOX_BEFORE)
    result = ROPE.apply(graph)
    weights = random_weights(graph)
    folded, producers = fold_weights(result, weight_fn(weights))
    verify(folded)
    assert not any(n.op in ("arange", "sin", "cos") for n in folded.nodes)
    (rope,) = [n for n in folded.nodes if n.op == "rope"]
    assert [t.op for t in rope.inputs[2:]] == ["param", "param"]
    stored = {**weights, **{name: make() for name, make in producers.items()}}
    assert sorted(t.shape for t in stored.values()) == [(2,), (16, 8), (32, 4), (32, 4)]
    inputs = {"input_ids": torch.arange(6) % 16, "position_ids": torch.tensor([0, 1, 2, 0, 1, 31])}
    got = run_graph(folded, inputs, weight_fn(stored))
    want = run_graph(graph, inputs, weight_fn(weights))
    torch.testing.assert_close(got, want, rtol=0, atol=0)


ROTARY = ["llama", "mistral", "qwen2", "qwen3", "mixtral", "qwen2_moe", "olmo2", "granite", "gemma", "gemma2",
          "gemma3_text", "phi3", "gpt_oss", "starcoder2", "cohere", "stablelm", "phi", "gpt_neox"]
STYLES = {"cohere": ("interleaved", 16), "stablelm": ("neox", 4), "phi": ("neox", 8), "gpt_neox": ("neox", 4)}


def _trig_on_activations(graph: Graph) -> list[str]:
    return [n.op for n in graph.nodes if n.op in ("sin", "cos") and not weight_only(n)]


@pytest.mark.parametrize("arch", [*ROTARY, "gpt2", "opt"])
def test_reference_pipeline_leaves_no_rotary_pattern(checkpoint, arch):
    imported = import_model(str(checkpoint(arch)), torch.float32)
    manager = PassManager([get_pass(n) for n in pipeline("reference")], check_numerics=True,
                          weights=imported.weights)
    graph = manager.run(imported.graph)
    (entry,) = [e for e in manager.report if e["pass"] == "rope"]
    assert entry["max_rel_error"] == 0.0  # the tables hold exactly the values the graph computed
    assert not _trig_on_activations(graph)
    assert Rope().apply(graph) is graph  # nothing left to match, multi-result nodes included
    ropes = [n for n in graph.nodes if n.op == "rope"]
    layers = imported.checkpoint.config.num_hidden_layers
    assert len(ropes) == (2 * layers if arch in ROTARY else 0)
    assert {(n.attrs["style"], n.attrs["rotary_dim"]) for n in ropes} <= {STYLES.get(arch, ("neox", 16))}
    for n in graph.nodes:
        below = n.inputs[0] if n.op == "permute" else n
        while below.op in ("cast", "slice"):
            below = below.inputs[0]
        assert n.op != "permute" or below.op != "permute", f"{arch}: a permute of a permute survived"
    tables = {t for n in ropes for t in n.inputs[2:]}
    folded, _ = fold_weights(graph, imported.weights)
    assert len(tables) == (4 if arch == "gemma3_text" else 2 if arch in ROTARY else 0)
    assert not any(n.op in ("sin", "cos") for n in folded.nodes)
