"""paged-attention: every attention node writes the paged KV cache in place, then reads it."""

from __future__ import annotations

from pass_harness import assert_equivalent, rewrite

from kiln.passes import get_pass

BEFORE = """graph {
  %input_ids = input : i64[T]
  %cu_seqlens = input : i32[S+1]
  @embed = param : f32[16,8]
  @wq = param : f32[8,8]
  @wkv = param : f32[4,8]
  %0 = embedding(@embed, %input_ids) : f32[T,8]
  %1 = linear(%0, @wq) : f32[T,8]
  %2 = reshape(%1) {"shape": ["T", 2, 4]} : f32[T,2,4]
  %3 = linear(%0, @wkv) : f32[T,4]
  %4 = reshape(%3) {"shape": ["T", 1, 4]} : f32[T,1,4]
  %5 = attention(%2, %4, %4, %cu_seqlens) {"scale": 0.5, "causal": true, "sliding_window": 0, "softcap": 0.0} : f32[T,2,4]
  %6 = reshape(%5) {"shape": ["T", 8]} : f32[T,8]
  %7 = attention(%2, %4, %4, %cu_seqlens) {"scale": 0.5, "causal": true, "sliding_window": 3, "softcap": 0.0} : f32[T,2,4]
  %8 = reshape(%7) {"shape": ["T", 8]} : f32[T,8]
  %9 = add(%6, %8) : f32[T,8]
  %10 = linear(%9, @embed) : f32[T,16]
  return %10
}"""

AFTER = """graph {
  %input_ids = input : i64[T]
  %cu_seqlens = input : i32[S+1]
  %slot_mapping = input : i64[T]
  %block_tables = input : i32[S,MB]
  %seq_lens = input : i32[S]
  %k_cache.0 = input : f32[NB,BS,1,4]
  %v_cache.0 = input : f32[NB,BS,1,4]
  %k_cache.1 = input : f32[NB,BS,1,4]
  %v_cache.1 = input : f32[NB,BS,1,4]
  @embed = param : f32[16,8]
  %0 = embedding(@embed, %input_ids) : f32[T,8]
  @wq = param : f32[8,8]
  %1 = linear(%0, @wq) : f32[T,8]
  %2 = reshape(%1) {"shape": ["T", 2, 4]} : f32[T,2,4]
  @wkv = param : f32[4,8]
  %3 = linear(%0, @wkv) : f32[T,4]
  %4 = reshape(%3) {"shape": ["T", 1, 4]} : f32[T,1,4]
  %5 = kv_cache_write(%4, %4, %k_cache.0, %v_cache.0, %slot_mapping) : (f32[NB,BS,1,4], f32[NB,BS,1,4])
  %6 = get_result(%5) {"index": 0} : f32[NB,BS,1,4]
  %7 = get_result(%5) {"index": 1} : f32[NB,BS,1,4]
  %8 = paged_attention(%2, %6, %7, %block_tables, %seq_lens, %cu_seqlens) {"scale": 0.5, "causal": true, "sliding_window": 0, "softcap": 0.0} : f32[T,2,4]
  %9 = reshape(%8) {"shape": ["T", 8]} : f32[T,8]
  %10 = kv_cache_write(%4, %4, %k_cache.1, %v_cache.1, %slot_mapping) : (f32[NB,BS,1,4], f32[NB,BS,1,4])
  %11 = get_result(%10) {"index": 0} : f32[NB,BS,1,4]
  %12 = get_result(%10) {"index": 1} : f32[NB,BS,1,4]
  %13 = paged_attention(%2, %11, %12, %block_tables, %seq_lens, %cu_seqlens) {"scale": 0.5, "causal": true, "sliding_window": 3, "softcap": 0.0} : f32[T,2,4]
  %14 = reshape(%13) {"shape": ["T", 8]} : f32[T,8]
  %15 = add(%9, %14) : f32[T,8]
  %16 = linear(%15, @embed) : f32[T,16]
  return %16
}"""


def test_attention_becomes_paged():
    before, after = rewrite("paged-attention", BEFORE, AFTER)
    assert_equivalent("paged-attention", before, after, all_rows=False)


def test_graph_without_attention_is_unchanged():
    text = """graph {
  %input_ids = input : i64[T]
  @embed = param : f32[16,8]
  %0 = embedding(@embed, %input_ids) : f32[T,8]
  return %0
}"""
    rewrite("paged-attention", text, text)


def test_idempotent():
    _, after = rewrite("paged-attention", BEFORE, AFTER)
    assert get_pass("paged-attention").apply(after) is after
