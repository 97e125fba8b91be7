"""FLOP counts and kernel-set coverage (kiln.ir.cost)."""

from __future__ import annotations

from kiln.ir import parse_graph
from kiln.ir.cost import CONTEXT, kernel_coverage, node_flops

GRAPH = """graph {
  %x = input : f32[T,8]
  %cu_seqlens = input : i32[S+1]
  @w = param : f32[16,8]
  @g = param : f32[8]
  %0 = linear(%x, @w) : f32[T,16]
  %1 = reshape(%0) {"shape": ["T", 2, 8]} : f32[T,2,8]
  %2 = attention(%1, %1, %1, %cu_seqlens) {"scale": 0.5, "causal": true, "sliding_window": 0, "softcap": 0.0} : f32[T,2,8]
  %3 = reshape(%2) {"shape": ["T", 16]} : f32[T,16]
  %4 = slice(%3) {"dim": 1, "start": 0, "end": 8, "step": 1} : f32[T,8]
  %5 = mul(%4, @g) : f32[T,8]
  %6 = silu_and_mul(%0) : f32[T,8]
  %7 = add(%5, %6) : f32[T,8]
  return %7
}"""


def test_flops_per_op_kind():
    g = parse_graph(GRAPH)
    by_op = {n.op: node_flops(n, {"T": 10, "S": 1}) for n in g.ops()}
    assert by_op["linear"] == 2 * 10 * 8 * 16
    assert by_op["attention"] == 2 * 10 * CONTEXT * (16 + 16)
    assert by_op["reshape"] == 0 and by_op["slice"] == 0
    assert by_op["mul"] == 10 * 8 and by_op["silu_and_mul"] == 10 * 8


def test_coverage_splits_kernel_set_and_generic_ops():
    g = parse_graph(GRAPH)
    cov = kernel_coverage(g, {"T": 10, "S": 1})
    # the unpaged attention op is not in the kernel set (paged_attention is), nor are mul/add
    generic = 2 * 10 * CONTEXT * 32 + 10 * 8 * 2
    assert cov.flops - cov.kernel_flops == generic
    assert cov.other_ops == {"attention": 1, "reshape": 2, "slice": 1, "mul": 1, "add": 1}
    assert cov.kernel_ops == {"linear": 1, "silu_and_mul": 1}
    # @w feeds a kernel op only, @g a generic mul: 16*8*4 of 16*8*4 + 8*4 bytes covered
    assert cov.kernel_weight_bytes == 16 * 8 * 4 and cov.weight_bytes == 16 * 8 * 4 + 8 * 4


def test_lora_flops_count_the_base_add():
    g = parse_graph("""graph {
  %x = input : f32[T,8]
  %a = input : f32[NL,4,8]
  %b = input : f32[NL,16,4]
  %i = input : i32[T]
  %base = input : f32[T,16]
  %0 = lora(%x, %a, %b, %i) : f32[T,16]
  %1 = lora(%x, %a, %b, %i, %base) : f32[T,16]
  return %0, %1
}""")
    update, with_base = (node_flops(n, {"T": 10, "NL": 2}) for n in g.ops())
    assert update == 2 * 10 * 4 * (8 + 16) and with_base == update + 10 * 16
