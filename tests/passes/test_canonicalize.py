"""canonicalize: the traced [1, T, ...] batch axis dropped everywhere, no-ops folded away."""

from __future__ import annotations

import pytest
from pass_harness import assert_equivalent, canonical, rewrite

from kiln.ir import parse_graph, print_graph, verify
from kiln.passes import get_pass

# -- dropping the batch axis -----------------------------------------------------------------

EMBED_NORM_LINEAR_BEFORE = """graph {
  %input_ids = input : i64[1,T]
  @embed = param : f32[16,8]
  %0 = embedding(@embed, %input_ids) : f32[1,T,8]
  %1 = dropout(%0) {"p": 0.1} : f32[1,T,8]
  @norm = param : f32[8]
  %2 = rms_norm(%1, @norm) {"normalized_shape": [8], "eps": 1e-06} : f32[1,T,8]
  @proj = param : f32[6,8]
  %3 = linear(%2, @proj) : f32[1,T,6]
  @bias = param : f32[1,1,6]
  %4 = add(%3, @bias) : f32[1,T,6]
  %5 = mul(%4, 1.0) : f32[1,T,6]
  return %5
}"""
EMBED_NORM_LINEAR_AFTER = """graph {
  %input_ids = input : i64[T]
  @embed = param : f32[16,8]
  %0 = embedding(@embed, %input_ids) : f32[T,8]
  @norm = param : f32[8]
  %1 = rms_norm(%0, @norm) {"normalized_shape": [8], "eps": 1e-06} : f32[T,8]
  @proj = param : f32[6,8]
  %2 = linear(%1, @proj) : f32[T,6]
  @bias = param : f32[1,1,6]
  %3 = reshape(@bias) {"shape": [1, 6]} : f32[1,6]
  %4 = add(%2, %3) : f32[T,6]
  return %4
}"""

RESHAPE_PERMUTE_REDUCE_SOFTMAX_BEFORE = """graph {
  %input_ids = input : i64[1,T]
  @embed = param : f32[16,8]
  %0 = embedding(@embed, %input_ids) : f32[1,T,8]
  %1 = reshape(%0) {"shape": [1, "T", 2, 4]} : f32[1,T,2,4]
  %2 = permute(%1) {"dims": [0, 2, 1, 3]} : f32[1,2,T,4]
  %3 = mean(%2) {"dims": [3], "keepdim": true} : f32[1,2,T,1]
  %4 = sub(%2, %3) : f32[1,2,T,4]
  %5 = softmax(%4) {"dim": 3} : f32[1,2,T,4]
  %6 = amax(%5) {"dims": [1], "keepdim": false} : f32[1,T,4]
  %7 = log_softmax(%6) {"dim": -1} : f32[1,T,4]
  return %7
}"""
RESHAPE_PERMUTE_REDUCE_SOFTMAX_AFTER = """graph {
  %input_ids = input : i64[T]
  @embed = param : f32[16,8]
  %0 = embedding(@embed, %input_ids) : f32[T,8]
  %1 = reshape(%0) {"shape": ["T", 2, 4]} : f32[T,2,4]
  %2 = permute(%1) {"dims": [1, 0, 2]} : f32[2,T,4]
  %3 = mean(%2) {"dims": [2], "keepdim": true} : f32[2,T,1]
  %4 = sub(%2, %3) : f32[2,T,4]
  %5 = softmax(%4) {"dim": 2} : f32[2,T,4]
  %6 = amax(%5) {"dims": [0], "keepdim": false} : f32[T,4]
  %7 = log_softmax(%6) {"dim": 1} : f32[T,4]
  return %7
}"""

ATTENTION_BEFORE = """graph {
  %input_ids = input : i64[1,T]
  %cu_seqlens = input : i32[S+1]
  @embed = param : f32[16,8]
  %0 = embedding(@embed, %input_ids) : f32[1,T,8]
  @wq = param : f32[8,8]
  %1 = linear(%0, @wq) : f32[1,T,8]
  %2 = reshape(%1) {"shape": [1, "T", 4, 2]} : f32[1,T,4,2]
  @wk = param : f32[4,8]
  %3 = linear(%0, @wk) : f32[1,T,4]
  %4 = reshape(%3) {"shape": [1, "T", 2, 2]} : f32[1,T,2,2]
  %5 = attention(%2, %4, %4, %cu_seqlens) {"scale": 0.7, "causal": true, "sliding_window": 0, "softcap": 0.0} : f32[1,T,4,2]
  %6 = reshape(%5) {"shape": [1, "T", 8]} : f32[1,T,8]
  return %6
}"""
ATTENTION_AFTER = """graph {
  %input_ids = input : i64[T]
  %cu_seqlens = input : i32[S+1]
  @embed = param : f32[16,8]
  %0 = embedding(@embed, %input_ids) : f32[T,8]
  @wq = param : f32[8,8]
  %1 = linear(%0, @wq) : f32[T,8]
  %2 = reshape(%1) {"shape": ["T", 4, 2]} : f32[T,4,2]
  @wk = param : f32[4,8]
  %3 = linear(%0, @wk) : f32[T,4]
  %4 = reshape(%3) {"shape": ["T", 2, 2]} : f32[T,2,2]
  %5 = attention(%2, %4, %4, %cu_seqlens) {"scale": 0.7, "causal": true, "sliding_window": 0, "softcap": 0.0} : f32[T,4,2]
  %6 = reshape(%5) {"shape": ["T", 8]} : f32[T,8]
  return %6
}"""

# position_ids arrive as [T]; the traced graph unsqueezes them to [1, T]
UNSQUEEZED_POSITIONS_BEFORE = """graph {
  %input_ids = input : i64[1,T]
  %position_ids = input : i64[T]
  @embed = param : f32[16,8]
  %0 = embedding(@embed, %input_ids) : f32[1,T,8]
  %1 = reshape(%position_ids) {"shape": [1, "T"]} : i64[1,T]
  %2 = cast(%1) {"dtype": "float32"} : f32[1,T]
  %3 = reshape(%2) {"shape": [1, "T", 1]} : f32[1,T,1]
  %4 = mul(%0, %3) : f32[1,T,8]
  return %4
}"""
UNSQUEEZED_POSITIONS_AFTER = """graph {
  %input_ids = input : i64[T]
  %position_ids = input : i64[T]
  @embed = param : f32[16,8]
  %0 = embedding(@embed, %input_ids) : f32[T,8]
  %1 = cast(%position_ids) {"dtype": "float32"} : f32[T]
  %2 = reshape(%1) {"shape": ["T", 1]} : f32[T,1]
  %3 = mul(%0, %2) : f32[T,8]
  return %3
}"""

LAYER_NORM_SLICE_CAT_BEFORE = """graph {
  %input_ids = input : i64[1,T]
  @embed = param : f32[16,8]
  %0 = embedding(@embed, %input_ids) : f32[1,T,8]
  @ln.weight = param : f32[8]
  @ln.bias = param : f32[8]
  %1 = layer_norm(%0, @ln.weight, @ln.bias) {"normalized_shape": [8], "eps": 1e-05} : f32[1,T,8]
  %2 = slice(%1) {"dim": 2, "start": 0, "end": 4, "step": 1} : f32[1,T,4]
  %3 = slice(%1) {"dim": -1, "start": 4, "end": 8, "step": 1} : f32[1,T,4]
  %4 = neg(%3) : f32[1,T,4]
  %5 = cat(%4, %2) {"dim": 2} : f32[1,T,8]
  %6 = cumsum(%5) {"dim": 1} : f32[1,T,8]
  return %6
}"""
LAYER_NORM_SLICE_CAT_AFTER = """graph {
  %input_ids = input : i64[T]
  @embed = param : f32[16,8]
  %0 = embedding(@embed, %input_ids) : f32[T,8]
  @ln.weight = param : f32[8]
  @ln.bias = param : f32[8]
  %1 = layer_norm(%0, @ln.weight, @ln.bias) {"normalized_shape": [8], "eps": 1e-05} : f32[T,8]
  %2 = slice(%1) {"dim": 1, "start": 4, "end": 8, "step": 1} : f32[T,4]
  %3 = neg(%2) : f32[T,4]
  %4 = slice(%1) {"dim": 1, "start": 0, "end": 4, "step": 1} : f32[T,4]
  %5 = cat(%3, %4) {"dim": 1} : f32[T,8]
  %6 = cumsum(%5) {"dim": 0} : f32[T,8]
  return %6
}"""

# No rule for `flip`: its operand gets the batch axis back, the output loses it again.
NO_RULE_FLIP_BEFORE = """graph {
  %input_ids = input : i64[1,T]
  @embed = param : f32[16,8]
  %0 = embedding(@embed, %input_ids) : f32[1,T,8]
  %1 = flip(%0) {"dims": [1]} : f32[1,T,8]
  %2 = exp(%1) : f32[1,T,8]
  return %2
}"""
NO_RULE_FLIP_AFTER = """graph {
  %input_ids = input : i64[T]
  @embed = param : f32[16,8]
  %0 = embedding(@embed, %input_ids) : f32[T,8]
  %1 = reshape(%0) {"shape": [1, "T", 8]} : f32[1,T,8]
  %2 = flip(%1) {"dims": [1]} : f32[1,T,8]
  %3 = exp(%2) : f32[1,T,8]
  %4 = reshape(%3) {"shape": ["T", 8]} : f32[T,8]
  return %4
}"""

# A rule exists but refuses: softmax over the batch axis itself. The add after it squeezes the
# restored operand again (a size-1 axis of a broadcasting operand).
NO_RULE_SOFTMAX_OVER_BATCH_BEFORE = """graph {
  %input_ids = input : i64[1,T]
  @embed = param : f32[16,8]
  %0 = embedding(@embed, %input_ids) : f32[1,T,8]
  %1 = softmax(%0) {"dim": 0} : f32[1,T,8]
  %2 = tanh(%0) : f32[1,T,8]
  %3 = add(%1, %2) : f32[1,T,8]
  return %3
}"""
NO_RULE_SOFTMAX_OVER_BATCH_AFTER = """graph {
  %input_ids = input : i64[T]
  @embed = param : f32[16,8]
  %0 = embedding(@embed, %input_ids) : f32[T,8]
  %1 = reshape(%0) {"shape": [1, "T", 8]} : f32[1,T,8]
  %2 = softmax(%1) {"dim": 0} : f32[1,T,8]
  %3 = reshape(%2) {"shape": ["T", 8]} : f32[T,8]
  %4 = tanh(%0) : f32[T,8]
  %5 = add(%3, %4) : f32[T,8]
  return %5
}"""

# A broadcast operand that is not 1 at the batch axis: the batch axis really grows.
NO_RULE_BROADCAST_BEFORE = """graph {
  %input_ids = input : i64[1,T]
  @embed = param : f32[16,8]
  %0 = embedding(@embed, %input_ids) : f32[1,T,8]
  @p = param : f32[2,1,8]
  %1 = mul(%0, @p) : f32[2,T,8]
  %2 = sum(%1) {"dims": [0], "keepdim": false} : f32[T,8]
  return %2
}"""
NO_RULE_BROADCAST_AFTER = """graph {
  %input_ids = input : i64[T]
  @embed = param : f32[16,8]
  %0 = embedding(@embed, %input_ids) : f32[T,8]
  %1 = reshape(%0) {"shape": [1, "T", 8]} : f32[1,T,8]
  @p = param : f32[2,1,8]
  %2 = mul(%1, @p) : f32[2,T,8]
  %3 = sum(%2) {"dims": [0], "keepdim": false} : f32[T,8]
  return %3
}"""

BATCH_CASES = {
    "embedding_norm_linear_broadcast_dropout_mul1": (
        EMBED_NORM_LINEAR_BEFORE,
        EMBED_NORM_LINEAR_AFTER,
    ),
    "reshape_permute_reduce_softmax": (
        RESHAPE_PERMUTE_REDUCE_SOFTMAX_BEFORE,
        RESHAPE_PERMUTE_REDUCE_SOFTMAX_AFTER,
    ),
    "attention": (ATTENTION_BEFORE, ATTENTION_AFTER),
    "unsqueezed_positions": (UNSQUEEZED_POSITIONS_BEFORE, UNSQUEEZED_POSITIONS_AFTER),
    "layer_norm_slice_cat_cumsum": (LAYER_NORM_SLICE_CAT_BEFORE, LAYER_NORM_SLICE_CAT_AFTER),
    "no_rule_flip_restores_axis": (NO_RULE_FLIP_BEFORE, NO_RULE_FLIP_AFTER),
    "no_rule_softmax_over_batch_axis": (
        NO_RULE_SOFTMAX_OVER_BATCH_BEFORE,
        NO_RULE_SOFTMAX_OVER_BATCH_AFTER,
    ),
    "no_rule_broadcast_grows_batch_axis": (NO_RULE_BROADCAST_BEFORE, NO_RULE_BROADCAST_AFTER),
}


@pytest.mark.parametrize("case", sorted(BATCH_CASES))
def test_drop_batch_axis(case):
    before, after = BATCH_CASES[case]
    graph, result = rewrite("canonicalize", before, after)
    assert_equivalent("canonicalize", graph, result)


# -- folding no-ops (graphs already without a batch axis) ------------------------------------

NOOPS_BEFORE = """graph {
  %input_ids = input : i64[T]
  @embed = param : f32[16,8]
  %0 = embedding(@embed, %input_ids) : f32[T,8]
  %1 = reshape(%0) {"shape": ["T", 8]} : f32[T,8]
  %2 = cast(%1) {"dtype": "float32"} : f32[T,8]
  %3 = expand(%2) {"shape": [-1, 8]} : f32[T,8]
  %4 = slice(%3) {"dim": 0, "start": 0, "end": 9223372036854775807, "step": 1} : f32[T,8]
  %5 = cat(%4) {"dim": 1} : f32[T,8]
  %6 = permute(%5) {"dims": [0, 1]} : f32[T,8]
  %7 = dropout(%6) {"p": 0.5} : f32[T,8]
  %8 = mul(1.0, %7) : f32[T,8]
  %9 = mul(%8, 1) : f32[T,8]
  %10 = cast(%9) {"dtype": "float16"} : f16[T,8]
  %11 = slice(%10) {"dim": 1, "start": 1, "end": 8, "step": 1} : f16[T,7]
  %12 = cast(%11) {"dtype": "float32"} : f32[T,7]
  return %12
}"""
NOOPS_AFTER = """graph {
  %input_ids = input : i64[T]
  @embed = param : f32[16,8]
  %0 = embedding(@embed, %input_ids) : f32[T,8]
  %1 = cast(%0) {"dtype": "float16"} : f16[T,8]
  %2 = slice(%1) {"dim": 1, "start": 1, "end": 8, "step": 1} : f16[T,7]
  %3 = cast(%2) {"dtype": "float32"} : f32[T,7]
  return %3
}"""

PERMUTE_OF_PERMUTE_BEFORE = """graph {
  %input_ids = input : i64[T]
  @embed = param : f32[16,8]
  %0 = embedding(@embed, %input_ids) : f32[T,8]
  %1 = reshape(%0) {"shape": ["T", 2, 4]} : f32[T,2,4]
  %2 = permute(%1) {"dims": [1, 0, 2]} : f32[2,T,4]
  %3 = permute(%2) {"dims": [1, 2, 0]} : f32[T,4,2]
  %4 = exp(%3) : f32[T,4,2]
  %5 = permute(%1) {"dims": [2, 0, 1]} : f32[4,T,2]
  %6 = permute(%5) {"dims": [1, 2, 0]} : f32[T,2,4]
  %7 = reshape(%4) {"shape": ["T", 8]} : f32[T,8]
  %8 = neg(%6) : f32[T,2,4]
  %9 = reshape(%8) {"shape": ["T", 8]} : f32[T,8]
  %10 = add(%7, %9) : f32[T,8]
  return %10
}"""
PERMUTE_OF_PERMUTE_AFTER = """graph {
  %input_ids = input : i64[T]
  @embed = param : f32[16,8]
  %0 = embedding(@embed, %input_ids) : f32[T,8]
  %1 = reshape(%0) {"shape": ["T", 2, 4]} : f32[T,2,4]
  %2 = permute(%1) {"dims": [0, 2, 1]} : f32[T,4,2]
  %3 = exp(%2) : f32[T,4,2]
  %4 = reshape(%3) {"shape": ["T", 8]} : f32[T,8]
  %5 = neg(%1) : f32[T,2,4]
  %6 = reshape(%5) {"shape": ["T", 8]} : f32[T,8]
  %7 = add(%4, %6) : f32[T,8]
  return %7
}"""

RESHAPE_OF_RESHAPE_BEFORE = """graph {
  %input_ids = input : i64[T]
  @embed = param : f32[16,8]
  %0 = embedding(@embed, %input_ids) : f32[T,8]
  %1 = reshape(%0) {"shape": ["T", 2, 4]} : f32[T,2,4]
  %2 = reshape(%1) {"shape": ["T", 4, 2]} : f32[T,4,2]
  %3 = reshape(%2) {"shape": ["2*T", 4]} : f32[2*T,4]
  return %3
}"""
RESHAPE_OF_RESHAPE_AFTER = """graph {
  %input_ids = input : i64[T]
  @embed = param : f32[16,8]
  %0 = embedding(@embed, %input_ids) : f32[T,8]
  %1 = reshape(%0) {"shape": ["2*T", 4]} : f32[2*T,4]
  return %1
}"""

KEPT_BEFORE = """graph {
  %input_ids = input : i64[T]
  @embed = param : f32[16,8]
  %0 = embedding(@embed, %input_ids) : f32[T,8]
  %1 = mul(%0, 2.0) : f32[T,8]
  %2 = mul(%input_ids, 1.0) : f32[T]
  %3 = reshape(%2) {"shape": ["T", 1]} : f32[T,1]
  %4 = expand(%3) {"shape": [-1, 8]} : f32[T,8]
  %5 = add(%1, %4) : f32[T,8]
  %6 = permute(%5) {"dims": [1, 0]} : f32[8,T]
  %7 = slice(%6) {"dim": 1, "start": 1, "end": "T", "step": 1} : f32[8,T-1]
  %8 = permute(%7) {"dims": [1, 0]} : f32[T-1,8]
  return %8
}"""

FOLD_CASES = {
    "noops": (NOOPS_BEFORE, NOOPS_AFTER),
    "permute_of_permute": (PERMUTE_OF_PERMUTE_BEFORE, PERMUTE_OF_PERMUTE_AFTER),
    "reshape_of_reshape": (RESHAPE_OF_RESHAPE_BEFORE, RESHAPE_OF_RESHAPE_AFTER),
    "nothing_to_fold": (KEPT_BEFORE, KEPT_BEFORE),
}


@pytest.mark.parametrize("case", sorted(FOLD_CASES))
def test_fold(case):
    before, after = FOLD_CASES[case]
    graph, result = rewrite("canonicalize", before, after)
    if case != "nothing_to_fold":  # T-1 rows: check_equivalent samples row T-1
        assert_equivalent("canonicalize", graph, result)


@pytest.mark.parametrize("case", sorted(BATCH_CASES) + sorted(FOLD_CASES))
def test_canonicalize_is_idempotent(case):
    before, _ = {**BATCH_CASES, **FOLD_CASES}[case]
    once = get_pass("canonicalize").apply(parse_graph(before))
    twice = get_pass("canonicalize").apply(once)
    assert print_graph(twice) == print_graph(once)


def test_input_graph_is_not_mutated():
    graph = parse_graph(EMBED_NORM_LINEAR_BEFORE)
    text = print_graph(graph)
    get_pass("canonicalize").apply(graph)
    assert print_graph(graph) == text == canonical(EMBED_NORM_LINEAR_BEFORE)


# -- known bugs --------------------------------------------------------------------------------

NEGATIVE_REDUCE_DIM = """graph {
  %input_ids = input : i64[1,T]
  @embed = param : f32[16,8]
  %0 = embedding(@embed, %input_ids) : f32[1,T,8]
  %1 = sum(%0) {"dims": [-1], "keepdim": false} : f32[1,T]
  %2 = OP
  %3 = reshape(%2) {"shape": [1, "T", 1]} : f32[1,T,1]
  %4 = mul(%0, %3) : f32[1,T,8]
  return %4
}"""


def test_negative_reduce_dim_then_permute():
    before = NEGATIVE_REDUCE_DIM.replace("%2 = OP", '%2 = permute(%1) {"dims": [1, 0]} : f32[T,1]')
    graph = parse_graph(before)
    verify(graph)
    result = get_pass("canonicalize").apply(graph)
    verify(result)
    assert_equivalent("canonicalize", graph, result)


def test_negative_reduce_dim_then_softmax_over_batch_axis():
    before = NEGATIVE_REDUCE_DIM.replace("%2 = OP", '%2 = softmax(%1) {"dim": 0} : f32[1,T]')
    graph = parse_graph(before)
    verify(graph)
    result = get_pass("canonicalize").apply(graph)
    verify(result)
    assert_equivalent("canonicalize", graph, result)


def test_expand_of_batch_axis_to_more_than_one():
    before = """graph {
  %input_ids = input : i64[1,T]
  @embed = param : f32[16,8]
  %0 = embedding(@embed, %input_ids) : f32[1,T,8]
  %1 = expand(%0) {"shape": [3, -1, -1]} : f32[3,T,8]
  return %1
}"""
    graph = parse_graph(before)
    result = get_pass("canonicalize").apply(graph)
    verify(result)
    assert_equivalent("canonicalize", graph, result)


def test_reshape_round_trip_folds_away():
    before = """graph {
  %input_ids = input : i64[T]
  @embed = param : f32[16,8]
  %0 = embedding(@embed, %input_ids) : f32[T,8]
  %1 = reshape(%0) {"shape": ["T", 2, 4]} : f32[T,2,4]
  %2 = reshape(%1) {"shape": ["T", 8]} : f32[T,8]
  return %2
}"""
    after = """graph {
  %input_ids = input : i64[T]
  @embed = param : f32[16,8]
  %0 = embedding(@embed, %input_ids) : f32[T,8]
  return %0
}"""
    rewrite("canonicalize", before, after)


def test_negative_argmax_dim_then_permute():
    before = """graph {
  %input_ids = input : i64[1,T]
  @embed = param : f32[16,8]
  %0 = embedding(@embed, %input_ids) : f32[1,T,8]
  %1 = argmax(%0) {"dim": -1, "keepdim": false} : i64[1,T]
  %2 = permute(%1) {"dims": [1, 0]} : i64[T,1]
  %3 = cast(%2) {"dtype": "float32"} : f32[T,1]
  %4 = mul(%0, %3) : f32[1,T,8]
  return %4
}"""
    graph = parse_graph(before)
    verify(graph)
    result = get_pass("canonicalize").apply(graph)
    verify(result)
    assert_equivalent("canonicalize", graph, result)
