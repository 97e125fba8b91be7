"""The cpu target's TVM quantized_linear (int4 / int8 weights) against the op's torch
reference: group sizes 16-64 and one group per row, with and without zeros and bias, decode
rows (narrow tiles and a tail), prefill rows (the wide path's dequantized panel plus a
narrow tail), int8 activations (W8A8, W4A8), act-order g_idx, float offsets (GGUF's Q4_1) on
random shapes, strided activations, 16-bit dtypes and tuned schedules (bits 4's table lookup
and per-weight arithmetic both); fp8 nodes run the reference and are listed as fallbacks."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("tvm")

from kiln.ir.graph import Graph, input_node, param_node  # noqa: E402
from kiln.ir.ops import OPS  # noqa: E402
from kiln.ir.ops.quant import pack_int  # noqa: E402
from kiln.ir.types import TensorType, dtype_name  # noqa: E402
from kiln.kernels.tvm_kernels import OpInfo, build, knobs  # noqa: E402
from kiln.passes.base import make  # noqa: E402

REF = OPS["quantized_linear"].impl


def _type(t: torch.Tensor, symbolic: bool = False) -> TensorType:
    return TensorType(dtype_name(t.dtype), ("T", *t.shape[1:]) if symbolic else tuple(t.shape))


def _case(n: int, k: int, bits: int, group: int, zeros: bool, bias: bool, dtype=torch.float32, seed: int = 0,
          offsets: bool = False):
    """(weight operands, attrs) of a random node: outputs of magnitude ~1 for x ~ N(0, 1); with
    offsets, float ones near -2^(bits-1) * scale in place of zeros (Q4_1's minimum per group)."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randint(0, 1 << bits, (n, k), generator=g)
    scale = 0.2 / (1 << (bits - 1)) / k**0.5
    ops = [pack_int(q, bits), ((torch.rand(n, k // group, generator=g) + 0.5) * scale).to(dtype)]
    if zeros:
        ops.append(torch.randint(0, 1 << bits, (n, k // group), generator=g, dtype=torch.uint8))
    if offsets:
        ops.append((-(torch.rand(n, k // group, generator=g) + 0.5) * scale * (1 << (bits - 1))).to(dtype))
    if bias:
        ops.append(torch.randn(n, generator=g).to(dtype))
    attrs = dict(format="int", bits=bits, group_size=group, act="none", dtype=dtype_name(dtype), has_zeros=zeros,
                 has_g_idx=False, has_bias=bias)
    return ops, attrs | ({"has_offsets": True} if offsets else {})


def _run(x: torch.Tensor, ops: list, attrs: dict, config: dict | None = None) -> torch.Tensor:
    from kiln.codegen.cpu.build import compile_kernels
    from kiln.kernels.tvm_provider import make_launcher

    want = REF(x, *ops, **attrs)
    info = OpInfo("quantized_linear", (_type(x, True), *(_type(t) for t in ops)), (_type(want, True),), attrs)
    kernel = build(info, config)
    assert kernel is not None
    y = torch.full_like(want, float("nan"))
    make_launcher(compile_kernels([kernel])[kernel.name], kernel.table())([y], [x, *ops], attrs)
    return y, want


TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 2e-3}


@pytest.mark.parametrize("bits,group,zeros,bias", [(4, 16, True, True), (4, 32, False, False), (4, 64, True, False),
                                                   (8, 32, False, True), (8, 64, True, True), (8, 16, True, False)])
def test_matches_the_reference(bits, group, zeros, bias):
    ops, attrs = _case(48, 64, bits, group, zeros, bias)
    for t in (1, 3, 6, 40):  # a GEMV, a narrow tile's tail, tiles + tail, the wide path + tail
        x = torch.randn(t, 64, generator=torch.Generator().manual_seed(t))
        y, want = _run(x, ops, attrs)
        torch.testing.assert_close(y, want, rtol=TOL[x.dtype], atol=TOL[x.dtype])


@pytest.mark.parametrize("seed", range(4))
def test_offsets_match_the_reference_on_random_shapes(seed):
    # Q4_1 (and an 8-bit peer): w = q * scale + offset per group; decode rows (narrow tiles,
    # lone rows) and prefill rows (the wide path plus a tail), each schedule of bits 4
    g = torch.Generator().manual_seed(100 + seed)
    bits = (4, 4, 8, 4)[seed]
    group = (32, 16, 32, 64)[seed]
    n = 8 * int(torch.randint(1, 13, (1,), generator=g))
    k = group * int(torch.randint(1, 7, (1,), generator=g))
    dtype = (torch.float32, torch.float32, torch.float32, torch.bfloat16)[seed]
    ops, attrs = _case(n, k, bits, group, False, seed % 2 == 0, dtype, seed, offsets=True)
    for config in (None, {"lut": 0}, {"nb": 8, "nj": 4, "nj1": 2, "mr": 4, "pm": 8, "ser": 0}):
        for t in (1, 3, 6, 40):
            x = torch.randn(t, k, generator=g).to(dtype)
            y, want = _run(x, ops, attrs, config)
            torch.testing.assert_close(y.float(), want.float(), rtol=TOL[dtype], atol=TOL[dtype])


def test_offsets_with_int8_activations():
    ops, attrs = _case(32, 64, 4, 32, False, True, offsets=True)
    attrs["act"] = "int8"
    for t in (1, 6, 37):
        y, want = _run(torch.randn(t, 64, generator=torch.Generator().manual_seed(t)), ops, attrs)
        torch.testing.assert_close(y, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("bits,group,dtype", [(8, 64, torch.float32), (4, 32, torch.float32), (8, 32, torch.bfloat16)])
def test_int8_activations_round_as_quant_act(bits, group, dtype):
    ops, attrs = _case(32, 64, bits, group, bits == 4, True, dtype)
    attrs["act"] = "int8"
    for t in (1, 6, 37):  # narrow tiles, a tail, the wide path
        x = torch.randn(t, 64, generator=torch.Generator().manual_seed(t)).to(dtype)
        x[0] = 0  # an all-zero row stays zero
        y, want = _run(x, ops, attrs)
        torch.testing.assert_close(y.float(), want.float(), rtol=TOL[dtype], atol=TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_16_bit_strided_and_rank3_inputs(dtype):
    ops, attrs = _case(32, 128, 4, 128, True, True, dtype)
    wide = torch.randn(5, 128 + 9).to(dtype)
    for x in (wide[:, 4:132], torch.randn(2, 3, 128).to(dtype), torch.randn(35, 128).to(dtype)):
        y, want = _run(x, ops, attrs)
        torch.testing.assert_close(y.float(), want.float(), rtol=TOL[dtype], atol=TOL[dtype])


@pytest.mark.parametrize("config", [{"nb": 4, "v": 8, "mt": 2, "ser": 0}, {"nb": 32, "v": 16, "mt": 1},
                                    {"mr": 4, "pm": 8, "v": 4}, {"mr": 12, "pm": 16, "nb": 8, "ser": 0},
                                    {"lut": 0, "nj": 4, "nj1": 16, "nb": 16}, {"nj": 8, "mt": 2, "nj1": 2},
                                    {"nb": 64, "mr": 6, "pm": 8, "lut": 0}])
def test_tuned_schedules(config):
    assert set(config) <= set(knobs("quantized_linear"))
    ops, attrs = _case(64, 64, 4, 32, True, True)
    for t in (1, 7, 29):
        y, want = _run(torch.randn(t, 64), ops, attrs, config)
        torch.testing.assert_close(y, want, rtol=1e-5, atol=1e-5)


def test_a_config_that_does_not_divide_the_shape_is_refused():
    ops, attrs = _case(48, 64, 4, 16, False, False)
    with pytest.raises(ValueError, match="does not divide"):
        _run(torch.randn(1, 64), ops, attrs, {"v": 32})  # lanes past the group


@pytest.mark.parametrize("bits,act", [(4, "none"), (8, "none"), (4, "int8")])
def test_act_order_groups(bits, act):
    g = torch.Generator().manual_seed(5)
    ops, attrs = _case(32, 64, bits, 16, True, True)
    g_idx = (torch.arange(64) // 16)[torch.randperm(64, generator=g)].to(torch.int32)
    ops.insert(3, g_idx)  # after zeros, before bias
    attrs |= {"has_g_idx": True, "act": act}
    for t in (1, 5, 40):
        y, want = _run(torch.randn(t, 64, generator=g), ops, attrs)
        torch.testing.assert_close(y, want, rtol=1e-5, atol=1e-5)


def test_the_cpu_lowering_runs_the_reference_for_what_tvm_does_not_build():
    from kiln.codegen.cpu import lower

    x = input_node("x", TensorType("float32", ("T", 32)))
    int4 = make("quantized_linear", [x, param_node("a.qweight", TensorType("uint8", (16, 16))),
                                     param_node("a.scales", TensorType("float32", (16, 1)))],
                format="int", bits=4, group_size=32, act="none", dtype="float32", has_zeros=False, has_g_idx=False,
                has_bias=False)
    act_order = make("quantized_linear", [int4, param_node("b.qweight", TensorType("uint8", (16, 8))),
                                          param_node("b.scales", TensorType("float32", (16, 2))),
                                          param_node("b.g_idx", TensorType("int32", (16,)))],
                     format="int", bits=4, group_size=8, act="none", dtype="float32", has_zeros=False,
                     has_g_idx=True, has_bias=False)
    fp8 = make("quantized_linear", [act_order, param_node("c.qweight", TensorType("float8_e4m3fn", (8, 16))),
                                    param_node("c.scales", TensorType("float32", (1, 1)))],
               format="fp8", block_n=8, block_k=16, act="int8", dtype="float32", has_zeros=False, has_g_idx=False,
               has_bias=False)
    lowered = lower(Graph([], []).with_nodes([x], [fp8]))
    kernels = [s.kernel for s in lowered.plan.steps]
    assert kernels[0].startswith("tvm:quantized_linear_k32n16_int4_g32")
    assert kernels[1].startswith("tvm:quantized_linear_k16n16_int4_gidx2")
    assert kernels[2] == "torch:quantized_linear"
    assert lowered.fallbacks == ["quantized_linear"]
