"""The cuda target's quantized_linear kernels (GEMV and GEMM over packed int4 / int8 and fp8 weights)
against the op's torch reference: in Triton's interpreter (float32 / float16, small shapes) and,
marked gpu, compiled in bfloat16 at model shapes."""

from __future__ import annotations

import pytest
import torch

from kiln.ir.graph import Graph, input_node, param_node
from kiln.ir.ops import OPS
from kiln.ir.ops.quant import dequant_fp8, dequant_int, pack_int
from kiln.ir.types import TensorType
from kiln.kernels.triton_kernels.linear import GemmConfig
from kiln.kernels.triton_kernels.quant_linear import (
    LAUNCHERS,
    MAX_M,
    QGemvConfig,
    covers,
    fp8_linear,
    quant_linear,
)
from kiln.passes.base import make

REF = OPS["quantized_linear"].impl


def operands(n: int, k: int, bits: int, group: int, zeros: bool, g_idx: bool, dtype: torch.dtype,
             device: str = "cpu", seed: int = 0) -> dict:
    """Random canonical packed weights with the op's attributes (weights of magnitude ~0.05)."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randint(0, 1 << bits, (n, k), generator=g)
    groups = k // group
    scale = 0.08 / (1 << (bits - 1))
    ops = {
        "qweight": pack_int(q, bits),
        "scales": ((torch.rand(n, groups, generator=g) + 0.5) * scale).to(dtype),
        "zeros": torch.randint(0, 1 << bits, (n, groups), generator=g, dtype=torch.uint8) if zeros else None,
        "g_idx": (torch.arange(k) // group)[torch.randperm(k, generator=g)].to(torch.int32) if g_idx else None,
        "bias": (torch.randn(n, generator=g) * 0.1).to(dtype),
    }
    return {name: t.to(device) if t is not None else None for name, t in ops.items()}


def reference(x: torch.Tensor, ops: dict, bits: int, group: int) -> torch.Tensor:
    """The op's weight (dequant_int, in x's dtype) times x in float32 (a CPU float16 matmul
    would round differently), checked against the op's torch reference."""
    dtype = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}[x.dtype]
    extra = [t for t in (ops["zeros"], ops["g_idx"]) if t is not None]
    w = dequant_int(ops["qweight"], ops["scales"], *extra, bits=bits, group_size=group, dtype=dtype)
    want = x.float() @ w.float().T + ops["bias"].float()
    full = REF(x, ops["qweight"], ops["scales"], *extra, ops["bias"], format="int", act="none", bits=bits,
               group_size=group, dtype=dtype, has_zeros=ops["zeros"] is not None, has_g_idx=ops["g_idx"] is not None,
               has_bias=True)
    torch.testing.assert_close(full.float(), want, rtol=2e-2, atol=2e-2)
    return want


CASES = [  # bits, group size (None: all of K), zeros, g_idx
    (4, 32, True, False),
    (4, 64, False, False),
    (4, None, True, False),
    (4, 32, True, True),
    (8, 32, False, False),
    (8, 64, True, True),
    (8, None, False, False),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("m", [1, 3, 21])
@pytest.mark.parametrize("bits,group,zeros,g_idx", CASES)
def test_matches_the_reference(bits, group, zeros, g_idx, m, dtype):
    n, k = 24, 128
    group = group or k
    ops = operands(n, k, bits, group, zeros, g_idx, dtype)
    x = (torch.randn(m, k, generator=torch.Generator().manual_seed(1)) * 0.5).to(dtype)
    y = torch.empty(m, n, dtype=dtype)
    # small tiles: several K steps and a partial N tile in every path
    quant_linear(y, x, ops["qweight"], ops["scales"], ops["zeros"], ops["g_idx"], ops["bias"], bits, group,
                 gemv=QGemvConfig(block_n=16, block_p=32), gemm=GemmConfig(block_m=16, block_n=16, block_k=32))
    want = reference(x, ops, bits, group)
    tol = 1e-5 if dtype == torch.float32 else 2e-3
    torch.testing.assert_close(y.float(), want, rtol=tol, atol=tol)


@pytest.mark.parametrize("bits,group", [(4, 32), (8, 16)])
def test_tiles_of_several_groups(bits, group):
    n, k, m = 24, 256, 3
    ops = operands(n, k, bits, group, True, False, torch.float32)
    want = None
    for rows in (m, 9):  # the GEMV, then the GEMM
        x = torch.randn(rows, k, generator=torch.Generator().manual_seed(rows))
        y = torch.empty(rows, n)
        quant_linear(y, x, ops["qweight"], ops["scales"], ops["zeros"], None, ops["bias"], bits, group,
                     gemv=QGemvConfig(block_n=8, block_p=64), gemm=GemmConfig(block_m=16, block_n=16, block_k=64))
        want = reference(x, ops, bits, group)
        torch.testing.assert_close(y, want, rtol=1e-5, atol=1e-5)


def test_the_launcher_reads_its_gemv_configs_from_tuning():
    from kiln.kernels.triton_kernels.quant_gemv import candidates, tuning_key
    from kiln.kernels.triton_kernels.quant_linear import from_tuning

    bits, group = 4, 32
    ops = operands(16, 64, bits, group, True, False, torch.float32)
    attrs = dict(format="int", bits=bits, group_size=group, act="none", dtype="float32", has_zeros=True,
                 has_g_idx=False, has_bias=True)
    key = tuning_key(attrs, 64, 16)
    assert key == "64x16:int4g32z:none"
    launch = from_tuning({key: {"config": {"block_n": 2, "block_p": 16, "num_warps": 2}}})["quantized_linear"]
    x = torch.randn(1, 64)
    args = [x, ops["qweight"], ops["scales"], ops["zeros"], ops["bias"]]
    y = torch.empty(1, 16)
    launch([y], args, attrs)
    torch.testing.assert_close(y, REF(*args, **attrs), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="quantized_linear"):
        from_tuning({key: {"config": {"block_q": 3}}})
    found = candidates()
    assert len(found) == len(set(found)) > 10
    assert all(4 <= c.block_n * c.block_p // (32 * c.num_warps) <= 16 for c in found)


def test_the_launcher_takes_the_op_operands_and_leading_axes():
    bits, group = 4, 32
    ops = operands(16, 64, bits, group, True, False, torch.float32)
    x = torch.randn(2, 3, 64)
    attrs = dict(format="int", bits=bits, group_size=group, act="none", dtype="float32", has_zeros=True,
                 has_g_idx=False, has_bias=True)
    args = [x, ops["qweight"], ops["scales"], ops["zeros"], ops["bias"]]
    y = torch.empty(2, 3, 16)
    LAUNCHERS["quantized_linear"]([y], args, attrs)
    torch.testing.assert_close(y, REF(*args, **attrs), rtol=1e-5, atol=1e-5)
    assert MAX_M < 6  # 6 rows: the GEMM


@pytest.mark.parametrize("act", ["int8", "float8_e4m3fn"])
def test_activation_quantization_runs_quant_act_then_the_kernels(act):
    bits, group = 8, 64
    ops = operands(16, 64, bits, group, False, False, torch.float32)
    attrs = dict(format="int", bits=bits, group_size=group, act=act, dtype="float32", has_zeros=False,
                 has_g_idx=False, has_bias=True)
    assert covers(attrs)
    for m in (1, 6):
        x = torch.randn(m, 64, generator=torch.Generator().manual_seed(m))
        args = [x, ops["qweight"], ops["scales"], ops["bias"]]
        y = torch.empty(m, 16)
        LAUNCHERS["quantized_linear"]([y], args, attrs)
        torch.testing.assert_close(y, REF(*args, **attrs), rtol=1e-5, atol=1e-5)


def fp8_operands(n: int, k: int, block_n: int, block_k: int, dtype: torch.dtype, device: str = "cpu") -> dict:
    """Random float8_e4m3fn weights with block scales (weights of magnitude ~0.05)."""
    g = torch.Generator().manual_seed(2)
    ops = {
        "qweight": (torch.randn(n, k, generator=g) * 100).clamp(-448, 448).to(torch.float8_e4m3fn),
        "scales": (torch.rand(-(-n // block_n), -(-k // block_k), generator=g) + 0.5) * 5e-4,
        "bias": (torch.randn(n, generator=g) * 0.1).to(dtype),
    }
    return {name: t.to(device) for name, t in ops.items()}


FP8_BLOCKS = [(1, None), (16, 32), (24, 128)]  # per channel, small blocks, DeepSeek-like uneven blocks


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("m", [1, 3, 21])
@pytest.mark.parametrize("block_n,block_k", FP8_BLOCKS)
def test_fp8_weights_match_the_reference(block_n, block_k, m, dtype):
    n, k = 40, 160
    block_k = block_k or k
    ops = fp8_operands(n, k, block_n, block_k, dtype)
    x = (torch.randn(m, k, generator=torch.Generator().manual_seed(3)) * 0.5).to(dtype)
    y = torch.empty(m, n, dtype=dtype)
    fp8_linear(y, x, ops["qweight"], ops["scales"], ops["bias"], block_n, block_k,
               gemv=QGemvConfig(block_n=16, block_p=32), gemm=GemmConfig(block_m=16, block_n=16, block_k=32))
    dt = {torch.float32: "float32", torch.float16: "float16"}[dtype]
    want = x.float() @ dequant_fp8(ops["qweight"], ops["scales"], block_n=block_n, block_k=block_k,
                                   dtype=dt).float().T + ops["bias"].float()
    tol = 1e-5 if dtype == torch.float32 else 2e-3
    torch.testing.assert_close(y.float(), want, rtol=tol, atol=tol)


def test_the_cuda_lowering_runs_int_and_fp8_weights_in_triton():
    from kiln.codegen.cuda import lower

    x = input_node("x", TensorType("float32", ("T", 32)))
    int4 = make("quantized_linear", [x, param_node("a.qweight", TensorType("uint8", (8, 16))),
                                     param_node("a.scales", TensorType("float32", (8, 1)))],
                format="int", bits=4, group_size=32, act="none", dtype="float32", has_zeros=False, has_g_idx=False,
                has_bias=False)
    fp8 = make("quantized_linear", [int4, param_node("b.qweight", TensorType("float8_e4m3fn", (8, 8))),
                                    param_node("b.scales", TensorType("float32", (1, 1)))],
               format="fp8", block_n=8, block_k=8, act="float8_e4m3fn", dtype="float32", has_zeros=False,
               has_g_idx=False, has_bias=False)
    graph = Graph([], []).with_nodes([x], [fp8])
    lowered = lower(graph)
    assert [s.kernel for s in lowered.plan.steps] == ["triton:quantized_linear", "triton:quantized_linear"]
    assert lowered.fallbacks == []


def test_float_offsets_run_the_reference():
    # GGUF's Q4_1 (has_offsets): no Triton kernel; the launcher and the lowering take the reference
    from kiln.codegen.cuda import lower

    ops = operands(16, 64, 4, 32, False, False, torch.float32)
    offsets = -ops["scales"] * 8
    attrs = dict(format="int", bits=4, group_size=32, has_offsets=True, act="none", dtype="float32", has_zeros=False,
                 has_g_idx=False, has_bias=True)
    assert not covers(attrs)
    x = torch.randn(3, 64, generator=torch.Generator().manual_seed(3))
    args = [x, ops["qweight"], ops["scales"], offsets, ops["bias"]]
    y = torch.empty(3, 16)
    LAUNCHERS["quantized_linear"]([y], args, attrs)
    torch.testing.assert_close(y, REF(*args, **attrs), rtol=0, atol=0)
    xn = input_node("x", TensorType("float32", ("T", 64)))
    node = make("quantized_linear", [xn, *(param_node(f"o.{name}", TensorType(str(t.dtype)[6:], tuple(t.shape)))
                                           for name, t in (("qweight", ops["qweight"]), ("scales", ops["scales"]),
                                                           ("offsets", offsets), ("bias", ops["bias"])))], **attrs)
    lowered = lower(Graph([], []).with_nodes([xn], [node]))
    assert [s.kernel for s in lowered.plan.steps] == ["torch:quantized_linear"]
    assert lowered.fallbacks == ["quantized_linear"]


@pytest.mark.gpu
@pytest.mark.parametrize("m", [1, 2, 4, 5, 16, 64, 300])
@pytest.mark.parametrize("bits,group,zeros,g_idx", [(4, 128, True, False), (4, 128, False, True), (8, None, False, False),
                                                    (4, 32, True, False)])
def test_bfloat16_on_the_gpu(bits, group, zeros, g_idx, m):
    n, k = 4096, 2048
    group = group or k
    ops = operands(n, k, bits, group, zeros, g_idx, torch.bfloat16, device="cuda")
    x = (torch.randn(m, k, device="cuda") * 0.5).to(torch.bfloat16)
    y = torch.empty(m, n, dtype=torch.bfloat16, device="cuda")
    quant_linear(y, x, ops["qweight"], ops["scales"], ops["zeros"], ops["g_idx"], ops["bias"], bits, group)
    want = reference(x, ops, bits, group)
    torch.testing.assert_close(y.float(), want, rtol=2e-2, atol=2e-2)


@pytest.mark.gpu
def test_the_gemv_launches_inside_a_cuda_graph():
    bits, group, n, k = 4, 128, 2048, 1024
    ops = operands(n, k, bits, group, True, False, torch.bfloat16, device="cuda")
    x = torch.randn(1, k, device="cuda").to(torch.bfloat16)
    y = torch.empty(1, n, dtype=torch.bfloat16, device="cuda")

    def run():
        quant_linear(y, x, ops["qweight"], ops["scales"], ops["zeros"], None, ops["bias"], bits, group)

    run()  # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        run()
    y.zero_()
    graph.replay()
    torch.cuda.synchronize()
    torch.testing.assert_close(y.float(), reference(x, ops, bits, group), rtol=2e-2, atol=2e-2)


@pytest.mark.gpu
@pytest.mark.parametrize("m", [1, 3, 5, 64, 300])
@pytest.mark.parametrize("block_n,block_k,n,k", [(1, None, 4096, 2048), (128, 128, 4096, 2048), (128, 128, 64, 96)])
def test_fp8_weights_in_bfloat16_on_the_gpu(block_n, block_k, n, k, m):
    block_k = block_k or k
    ops = fp8_operands(n, k, block_n, block_k, torch.bfloat16, device="cuda")
    x = (torch.randn(m, k, device="cuda") * 0.5).to(torch.bfloat16)
    y = torch.empty(m, n, dtype=torch.bfloat16, device="cuda")
    fp8_linear(y, x, ops["qweight"], ops["scales"], ops["bias"], block_n, block_k)
    w = dequant_fp8(ops["qweight"], ops["scales"], block_n=block_n, block_k=block_k, dtype="bfloat16")
    torch.testing.assert_close(y.float(), x.float() @ w.float().T + ops["bias"].float(), rtol=2e-2, atol=2e-2)
