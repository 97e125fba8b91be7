"""rope-kv-write: a layer's rope(q), rope(k) and KV-cache write become one rope_kv_cache_write."""

from __future__ import annotations

from collections import Counter

import pytest
import torch
from pass_harness import assert_equivalent, rewrite

from kiln.frontend import import_model
from kiln.passes import PassManager, get_pass, resolve_pipeline
from kiln.passes.registry import PIPELINES
from kiln.passes.rope_kv_write import RopeKvWrite

# One attention layer as paged-attention leaves it: q/k/v slices of one merged projection, q
# and k rotated by one table pair, k and v written to the cache, q also read past attention.
# STYLE and ROT (rotary_dim of the head size 4) are filled in per case.
LAYER = """graph {
  %input_ids = input : i64[T]
  %position_ids = input : i64[T]
  %cu_seqlens = input : i32[S+1]
  %slot_mapping = input : i64[T]
  %block_tables = input : i32[S,MB]
  %seq_lens = input : i32[S]
  %k_cache.0 = input : f32[NB,BS,1,4]
  %v_cache.0 = input : f32[NB,BS,1,4]
  @embed = param : f32[16,16]
  %0 = embedding(@embed, %input_ids) : f32[T,16]
  @wqkv = param : f32[16,16]
  %1 = linear(%0, @wqkv) : f32[T,16]
  %2 = slice(%1) {"dim": 1, "start": 0, "end": 8, "step": 1} : f32[T,8]
  %3 = reshape(%2) {"shape": ["T", 2, 4]} : f32[T,2,4]
  %4 = slice(%1) {"dim": 1, "start": 8, "end": 12, "step": 1} : f32[T,4]
  %5 = reshape(%4) {"shape": ["T", 1, 4]} : f32[T,1,4]
  %6 = slice(%1) {"dim": 1, "start": 12, "end": 16, "step": 1} : f32[T,4]
  %7 = reshape(%6) {"shape": ["T", 1, 4]} : f32[T,1,4]
  @cos = param : f32[32,ROT]
  @sin = param : f32[32,ROT]
"""
BEFORE = LAYER + """  %8 = rope(%3, %position_ids, @cos, @sin) {"style": "STYLE", "rotary_dim": ROT} : f32[T,2,4]
  %9 = rope(%5, %position_ids, @cos, @sin) {"style": "STYLE", "rotary_dim": ROT} : f32[T,1,4]
  %10 = kv_cache_write(%9, %7, %k_cache.0, %v_cache.0, %slot_mapping) : (f32[NB,BS,1,4], f32[NB,BS,1,4])
  %11 = get_result(%10) {"index": 0} : f32[NB,BS,1,4]
  %12 = get_result(%10) {"index": 1} : f32[NB,BS,1,4]
  %13 = paged_attention(%8, %11, %12, %block_tables, %seq_lens, %cu_seqlens) {"scale": 0.5, "causal": true, "sliding_window": 0, "softcap": 0.0} : f32[T,2,4]
  %14 = reshape(%13) {"shape": ["T", 8]} : f32[T,8]
  %15 = reshape(%8) {"shape": ["T", 8]} : f32[T,8]
  %16 = add(%14, %15) : f32[T,8]
  @lm = param : f32[16,8]
  %17 = linear(%16, @lm) : f32[T,16]
  return %17
}"""
AFTER = LAYER + """  %8 = rope_kv_cache_write(%3, %5, %7, %position_ids, @cos, @sin, %k_cache.0, %v_cache.0, %slot_mapping) {"style": "STYLE", "rotary_dim": ROT} : (f32[NB,BS,1,4], f32[NB,BS,1,4], f32[T,2,4])
  %9 = get_result(%8) {"index": 2} : f32[T,2,4]
  %10 = get_result(%8) {"index": 0} : f32[NB,BS,1,4]
  %11 = get_result(%8) {"index": 1} : f32[NB,BS,1,4]
  %12 = paged_attention(%9, %10, %11, %block_tables, %seq_lens, %cu_seqlens) {"scale": 0.5, "causal": true, "sliding_window": 0, "softcap": 0.0} : f32[T,2,4]
  %13 = reshape(%12) {"shape": ["T", 8]} : f32[T,8]
  %14 = reshape(%9) {"shape": ["T", 8]} : f32[T,8]
  %15 = add(%13, %14) : f32[T,8]
  @lm = param : f32[16,8]
  %16 = linear(%15, @lm) : f32[T,16]
  return %16
}"""


def _filled(text: str, style: str, rot: int) -> str:
    return text.replace("STYLE", style).replace("ROT", str(rot))


@pytest.mark.parametrize(("style", "rot"), [("neox", 4), ("interleaved", 2)])
def test_rewrites_bit_exact(style, rot):
    graph, result = rewrite("rope-kv-write", _filled(BEFORE, style, rot), _filled(AFTER, style, rot))
    # the whole-sequence batch writes the cache and attention reads it back (slot -1 rows too)
    assert_equivalent("rope-kv-write", graph, result, all_rows=False, tol=0.0)


def _edited(old: str, new: str) -> str:
    assert old in BEFORE
    return _filled(BEFORE.replace(old, new), "neox", 4)


UNCHANGED = {
    # rope(k) read by something besides the write: the fused op does not return it
    "rotated_k_read_twice": _edited(
        "  %16 = add(%14, %15) : f32[T,8]",
        '  %16 = add(%14, %15) : f32[T,8]\n  %30 = reshape(%9) {"shape": ["T", 4]} : f32[T,4]\n'
        '  %31 = slice(%16) {"dim": 1, "start": 0, "end": 4, "step": 1} : f32[T,4]\n'
        "  %32 = add(%31, %30) : f32[T,4]\n  %33 = cat(%32, %32) {\"dim\": 1} : f32[T,8]\n"
        "  %34 = add(%16, %33) : f32[T,8]",
    ).replace("%17 = linear(%16, @lm)", "%17 = linear(%34, @lm)"),
    # q rotated by other tables than k
    "q_with_other_tables": _edited(
        '  %8 = rope(%3, %position_ids, @cos, @sin)',
        "  @cos2 = param : f32[32,4]\n  %8 = rope(%3, %position_ids, @cos2, @sin)",
    ),
    # q rotated with another style
    "q_with_other_attrs": _edited('  %8 = rope(%3, %position_ids, @cos, @sin) {"style": "STYLE"',
                                  '  %8 = rope(%3, %position_ids, @cos, @sin) {"style": "interleaved"'),
    # k written unrotated
    "k_not_rotated": _edited("kv_cache_write(%9, %7", "kv_cache_write(%5, %7"),
}


@pytest.mark.parametrize("case", sorted(UNCHANGED))
def test_pattern_does_not_match(case):
    graph, result = rewrite("rope-kv-write", UNCHANGED[case], UNCHANGED[case])
    assert result is graph


LONGROPE = """graph {
  %position_ids = input : i64[T]
  %cu_seqlens = input : i32[S+1]
  %total_lens = input : i32[S]
  %slot_mapping = input : i64[T]
  %block_tables = input : i32[S,MB]
  %seq_lens = input : i32[S]
  %k_cache.0 = input : f32[NB,BS,1,4]
  %v_cache.0 = input : f32[NB,BS,1,4]
  %q = input : f32[T,2,4]
  %k = input : f32[T,1,4]
  @cos = param : f32[32,4]
  @sin = param : f32[32,4]
  @cos_long = param : f32[32,4]
  @sin_long = param : f32[32,4]
  %0 = rope(%q, %position_ids, @cos, @sin, @cos_long, @sin_long, %total_lens, %cu_seqlens) {"style": "neox", "rotary_dim": 4, "long_after": 8} : f32[T,2,4]
  %1 = rope(%k, %position_ids, @cos, @sin, @cos_long, @sin_long, %total_lens, %cu_seqlens) {"style": "neox", "rotary_dim": 4, "long_after": 8} : f32[T,1,4]
  %2 = kv_cache_write(%1, %k, %k_cache.0, %v_cache.0, %slot_mapping) : (f32[NB,BS,1,4], f32[NB,BS,1,4])
  %3 = get_result(%2) {"index": 0} : f32[NB,BS,1,4]
  %4 = get_result(%2) {"index": 1} : f32[NB,BS,1,4]
  %5 = paged_attention(%0, %3, %4, %block_tables, %seq_lens, %cu_seqlens) {"scale": 0.5, "causal": true, "sliding_window": 0, "softcap": 0.0} : f32[T,2,4]
  return %5
}"""


def test_longrope_stays_apart():
    graph, result = rewrite("rope-kv-write", LONGROPE, LONGROPE)
    assert result is graph


def test_pass_is_registered_under_its_name_in_the_cuda_pipeline_only():
    assert isinstance(get_pass("rope-kv-write"), RopeKvWrite)
    cuda = PIPELINES["cuda"]
    assert cuda.index("rope-kv-write") > cuda.index("paged-attention") and cuda[-1] == "dce"
    assert all("rope-kv-write" not in names for target, names in PIPELINES.items() if target != "cuda")


# -- whole models through the cuda pipeline ---------------------------------------------------


@pytest.mark.parametrize("arch", ["llama", "phi", "stablelm"])
def test_cuda_pipeline_fuses_every_layer_and_verifies(checkpoint, arch):
    # llama: full rotary over grouped k/v heads; phi and stablelm rotate part of each head
    imported = import_model(str(checkpoint(arch)), torch.float32)
    names = resolve_pipeline("cuda", None)
    manager = PassManager([get_pass(n) for n in names], check_numerics=True, weights=imported.weights)
    graph = manager.run(imported.graph)
    assert all(e["max_rel_error"] <= 1e-4 for e in manager.report)
    ops = Counter(n.op for n in graph.ops())
    layers = ops["paged_attention"]
    assert layers >= 2
    assert (ops["rope_kv_cache_write"], ops["rope"], ops["kv_cache_write"]) == (layers, 0, 0)
    if arch != "llama":
        assert all(n.attrs["rotary_dim"] < n.inputs[0].type.shape[-1]
                   for n in graph.ops() if n.op == "rope_kv_cache_write")
