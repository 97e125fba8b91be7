"""last-token-logits: the LM head (and what follows it row-wise) only on the sampled rows."""

from __future__ import annotations

import pytest
import torch
from pass_harness import assert_equivalent, batch_inputs, random_weights, rewrite, weight_fn

from kiln.ir import run_graph
from kiln.passes import get_pass
from kiln.passes.last_token_logits import LastTokenLogits

LM_HEAD_BEFORE = """graph {
  %input_ids = input : i64[T]
  @embed = param : f32[16,8]
  %0 = embedding(@embed, %input_ids) : f32[T,8]
  @norm = param : f32[8]
  %1 = rms_norm(%0, @norm) {"normalized_shape": [8], "eps": 1e-06} : f32[T,8]
  @lm_head = param : f32[16,8]
  %2 = linear(%1, @lm_head) : f32[T,16]
  return %2
}"""
LM_HEAD_AFTER = """graph {
  %input_ids = input : i64[T]
  %logits_indices = input : i64[R]
  @embed = param : f32[16,8]
  %0 = embedding(@embed, %input_ids) : f32[T,8]
  @norm = param : f32[8]
  %1 = rms_norm(%0, @norm) {"normalized_shape": [8], "eps": 1e-06} : f32[T,8]
  %2 = gather_rows(%1, %logits_indices) : f32[R,8]
  @lm_head = param : f32[16,8]
  %3 = linear(%2, @lm_head) : f32[R,16]
  return %3
}"""

SOFTCAP_BEFORE = """graph {
  %input_ids = input : i64[T]
  @embed = param : f32[16,8]
  %0 = embedding(@embed, %input_ids) : f32[T,8]
  @lm_head = param : f32[16,8]
  @lm_head.bias = param : f32[16]
  %1 = linear(%0, @lm_head, @lm_head.bias) : f32[T,16]
  %2 = div(%1, 30.0) : f32[T,16]
  %3 = tanh(%2) : f32[T,16]
  %4 = mul(%3, 30.0) : f32[T,16]
  @logit_scale = param : f32[16]
  %5 = mul(@logit_scale, %4) : f32[T,16]
  return %5
}"""
SOFTCAP_AFTER = """graph {
  %input_ids = input : i64[T]
  %logits_indices = input : i64[R]
  @logit_scale = param : f32[16]
  @embed = param : f32[16,8]
  %0 = embedding(@embed, %input_ids) : f32[T,8]
  %1 = gather_rows(%0, %logits_indices) : f32[R,8]
  @lm_head = param : f32[16,8]
  @lm_head.bias = param : f32[16]
  %2 = linear(%1, @lm_head, @lm_head.bias) : f32[R,16]
  %3 = div(%2, 30.0) : f32[R,16]
  %4 = tanh(%3) : f32[R,16]
  %5 = mul(%4, 30.0) : f32[R,16]
  %6 = mul(@logit_scale, %5) : f32[R,16]
  return %6
}"""

HEAD_CAST_BEFORE = """graph {
  %input_ids = input : i64[T]
  @embed = param : f32[16,8]
  %0 = embedding(@embed, %input_ids) : f32[T,8]
  @lm_head = param : f32[16,8]
  %1 = linear(%0, @lm_head) : f32[T,16]
  %2 = cast(%1) {"dtype": "float16"} : f16[T,16]
  return %2
}"""
HEAD_CAST_AFTER = """graph {
  %input_ids = input : i64[T]
  %logits_indices = input : i64[R]
  @embed = param : f32[16,8]
  %0 = embedding(@embed, %input_ids) : f32[T,8]
  %1 = gather_rows(%0, %logits_indices) : f32[R,8]
  @lm_head = param : f32[16,8]
  %2 = linear(%1, @lm_head) : f32[R,16]
  %3 = cast(%2) {"dtype": "float16"} : f16[R,16]
  return %3
}"""

REWRITTEN = {
    "plain_lm_head": (LM_HEAD_BEFORE, LM_HEAD_AFTER),
    "soft_capped_and_scaled": (SOFTCAP_BEFORE, SOFTCAP_AFTER),
    "cast_after_head": (HEAD_CAST_BEFORE, HEAD_CAST_AFTER),
}


@pytest.mark.parametrize("case", sorted(REWRITTEN))
def test_rewrites(case):
    before, after = REWRITTEN[case]
    graph, result = rewrite("last-token-logits", before, after)
    assert_equivalent("last-token-logits", graph, result, all_rows=False)


def test_every_row_index_keeps_all_logits():
    graph, result = rewrite("last-token-logits", SOFTCAP_BEFORE, SOFTCAP_AFTER)
    weights = weight_fn(random_weights(graph))
    inputs = batch_inputs(graph)
    (want,) = run_graph(graph, inputs, weights)
    t = inputs["input_ids"].shape[0]
    (got,) = run_graph(result, {**inputs, "logits_indices": torch.arange(t)}, weights)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    (last,) = run_graph(result, {**inputs, "logits_indices": torch.tensor([t - 1, 0])}, weights)
    torch.testing.assert_close(last, want[[t - 1, 0]], rtol=1e-6, atol=1e-6)


UNCHANGED = {
    "softmax_after_head_is_not_elementwise": """graph {
  %input_ids = input : i64[T]
  @embed = param : f32[16,8]
  %0 = embedding(@embed, %input_ids) : f32[T,8]
  @lm_head = param : f32[16,8]
  %1 = linear(%0, @lm_head) : f32[T,16]
  %2 = softmax(%1) {"dim": -1} : f32[T,16]
  return %2
}""",
    "two_outputs": """graph {
  %input_ids = input : i64[T]
  @embed = param : f32[16,8]
  %0 = embedding(@embed, %input_ids) : f32[T,8]
  @lm_head = param : f32[16,8]
  %1 = linear(%0, @lm_head) : f32[T,16]
  return %1, %0
}""",
    "already_has_logits_indices": """graph {
  %input_ids = input : i64[T]
  %logits_indices = input : i64[R]
  @embed = param : f32[16,8]
  %0 = embedding(@embed, %input_ids) : f32[T,8]
  @lm_head = param : f32[16,8]
  %1 = linear(%0, @lm_head) : f32[T,16]
  return %1
}""",
    "batched_hidden_states": """graph {
  %input_ids = input : i64[1,T]
  @embed = param : f32[16,8]
  %0 = embedding(@embed, %input_ids) : f32[1,T,8]
  @lm_head = param : f32[16,8]
  %1 = linear(%0, @lm_head) : f32[1,T,16]
  return %1
}""",
    "elementwise_with_two_activation_operands": """graph {
  %input_ids = input : i64[T]
  @embed = param : f32[16,8]
  %0 = embedding(@embed, %input_ids) : f32[T,8]
  @lm_head = param : f32[16,8]
  %1 = linear(%0, @lm_head) : f32[T,16]
  %2 = add(%1, %1) : f32[T,16]
  return %2
}""",
    "row_varying_operand": """graph {
  %input_ids = input : i64[T]
  @embed = param : f32[16,8]
  %0 = embedding(@embed, %input_ids) : f32[T,8]
  @lm_head = param : f32[16,8]
  %1 = linear(%0, @lm_head) : f32[T,16]
  @bias2d = param : f32[1,16]
  %2 = add(%1, @bias2d) : f32[T,16]
  return %2
}""",
    "output_is_not_a_projection": """graph {
  %input_ids = input : i64[T]
  @embed = param : f32[16,8]
  %0 = embedding(@embed, %input_ids) : f32[T,8]
  %1 = exp(%0) : f32[T,8]
  return %1
}""",
}


@pytest.mark.parametrize("case", sorted(UNCHANGED))
def test_pattern_does_not_match(case):
    graph, result = rewrite("last-token-logits", UNCHANGED[case], UNCHANGED[case])
    assert result is graph


def test_pass_is_registered_under_its_name():
    assert isinstance(get_pass("last-token-logits"), LastTokenLogits)
