"""Every op's type rule against its torch reference, and attention against a naive loop."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
import torch

from kiln.errors import VerifyError
from kiln.ir import Graph, Node, TensorType, const_node, input_node, run_graph, verify
from kiln.ir.dims import evaluate
from kiln.ir.ops import OPS, get_op, infer_type, resolve_attrs
from kiln.ir.printer import _parse_type
from kiln.ir.step_inputs import contiguous_paged_inputs
from kiln.ir.types import LONG, TupleType, dtype_name, torch_dtype


def _t(text: str) -> TensorType | TupleType:
    """'f32[T,4]' -> TensorType, '(f32[T,4], i64[T])' -> TupleType (the IR text form of a type)."""
    if text.startswith("("):
        return _parse_type(text)
    dtype, dims = text[:-1].split("[")
    shape = tuple(int(d) if d.lstrip("-").isdigit() else d for d in dims.split(",") if d)
    return TensorType(LONG[dtype], shape)


@dataclass
class Case:
    op: str
    inputs: list[str]
    attrs: dict[str, Any] = field(default_factory=dict)
    expected: str | None = None
    """The inferred type, when the symbolic form itself is worth pinning."""
    values: dict[int, Callable[[int], torch.Tensor]] = field(default_factory=dict)
    """Inputs that must hold particular values, by position, as functions of T."""

    @property
    def id(self) -> str:
        return f"{self.op}({','.join(self.inputs)}){self.attrs or ''}"


UNARY = [
    "neg", "exp", "log", "sqrt", "rsqrt", "sin", "cos", "tanh", "sigmoid", "silu", "relu", "abs",
    "reciprocal", "erf", "floor", "ceil", "sign", "square", "log1p", "expm1", "exp2", "mish",
    "hardswish", "hardsigmoid", "elu",
]  # fmt: skip


def _cu(t: int) -> torch.Tensor:
    # three sequences of the flattened batch: [0, 1), [1, t-1), [t-1, t)
    return torch.tensor([0, 1, t - 1, t], dtype=torch.int32)


ATTN = {"scale": 0.35, "causal": True, "sliding_window": 0, "softcap": 0.0}
PAGED_CACHES = {
    "k_cache": TensorType("float32", ("NB", 4, 2, 8)),
    "v_cache": TensorType("float32", ("NB", 4, 2, 6)),
}


def _paged(name: str) -> Callable[[int], torch.Tensor]:
    # caches and block metadata for the three sequences of _cu(t), blocks in shuffled order
    return lambda t: contiguous_paged_inputs((1, t - 2, 1), 4, PAGED_CACHES, shuffle_seed=0)[name]


CASES: list[Case] = [
    *(Case(op, ["f32[T,4]"], expected="f32[T,4]") for op in UNARY),
    Case("isnan", ["f32[T,4]"], expected="bool[T,4]"),
    Case("isinf", ["f16[T,4]"], expected="bool[T,4]"),
    Case("logical_not", ["bool[T,4]"], expected="bool[T,4]"),
    Case("neg", ["bf16[2,T]"], expected="bf16[2,T]"),
    Case("gelu", ["f32[T,4]"], {"approximate": "tanh"}),
    Case("gelu", ["f16[T,4]"], {"approximate": "none"}, expected="f16[T,4]"),
    Case("softplus", ["f32[T,4]"], {"beta": 2.0, "threshold": 10.0}),
    Case("leaky_relu", ["f32[T,4]"], {"negative_slope": 0.1}),
    Case("cast", ["f32[T,4]"], {"dtype": "bfloat16"}, expected="bf16[T,4]"),
    Case("cast", ["i64[T]"], {"dtype": "bool"}, expected="bool[T]"),
    Case("clamp", ["f32[T,4]"], {"min": -1.0}),
    Case("clamp", ["f32[T,4]"], {"min": -1.0, "max": 1.0}),
    Case("dropout", ["f32[T,4]"], {"p": 0.1}, expected="f32[T,4]"),
    Case("full_like", ["f32[T,4]"], {"value": 2.0, "dtype": "int32"}, expected="i32[T,4]"),
    # binary, broadcasting, with type promotion
    Case("add", ["f32[T,4]", "f32[4]"], expected="f32[T,4]"),
    Case("add", ["i64[T]", "f32[]"], expected="f32[T]"),
    Case("add", ["f16[T,4]", "f32[]"], expected="f16[T,4]"),
    Case("sub", ["f32[T,1]", "f32[1,4]"], expected="f32[T,4]"),
    Case("mul", ["bf16[T,4]", "bf16[T,4]"], expected="bf16[T,4]"),
    Case("mul", ["i32[T]", "i64[T]"], expected="i64[T]"),
    Case("div", ["f32[T,4]", "f32[T,1]"], expected="f32[T,4]"),
    Case("div", ["i64[T]", "i64[]"], expected="f32[T]"),
    Case("div", ["i64[T]", "i64[]"], {"rounding_mode": "floor"}, expected="i64[T]"),
    Case("pow", ["f32[T,4]", "f32[]"]),
    # a fused group (the cpu pipeline's fuse-elementwise): (x / r) ** 2 * 0.5, r one value per row
    Case("fused_elementwise", ["f32[T,4]", "f32[T,1]"],
         {"expr": [["div", ["x0", "x1"], {}], ["pow", ["v0", 2.0], {}], ["mul", ["v1", 0.5], {}]]},
         expected="f32[T,4]"),
    Case("remainder", ["i64[T]", "i64[]"], expected="i64[T]"),
    Case("maximum", ["f32[T,4]", "f32[4]"]),
    Case("minimum", ["f32[T,4]", "f32[T,4]"]),
    *(Case(op, ["f32[T,4]", "f32[4]"], expected="bool[T,4]") for op in ("eq", "ne", "lt", "le", "gt", "ge")),
    Case("logical_and", ["bool[T]", "bool[T]"], expected="bool[T]"),
    Case("logical_or", ["bool[T,1]", "bool[3]"], expected="bool[T,3]"),
    Case("bitwise_and", ["i64[T]", "i64[T]"], expected="i64[T]"),
    Case("bitwise_or", ["bool[T]", "bool[T]"], expected="bool[T]"),
    Case("where", ["bool[T,1]", "f32[T,4]", "f32[4]"], expected="f32[T,4]"),
    # projections, norms
    Case("linear", ["f32[T,4]", "f32[6,4]"], expected="f32[T,6]"),
    Case("linear", ["f32[2,T,4]", "f32[6,4]", "f32[6]"], expected="f32[2,T,6]"),
    Case("matmul", ["f32[T,4]", "f32[4,5]"], expected="f32[T,5]"),
    Case("matmul", ["f32[2,T,4]", "f32[2,4,T]"], expected="f32[2,T,T]"),
    Case("embedding", ["f32[10,4]", "i64[T]"], expected="f32[T,4]"),
    Case("embedding", ["f16[10,4]", "i64[1,T]"], expected="f16[1,T,4]"),
    Case("layer_norm", ["f32[T,4]", "f32[4]", "f32[4]"], {"normalized_shape": [4], "eps": 1e-5}),
    Case("layer_norm", ["f32[T,4]", "f32[4]"], {"normalized_shape": [4], "eps": 1e-5, "has_bias": False}),
    Case("layer_norm", ["f32[T,4]"], {"normalized_shape": [4], "eps": 1e-5, "has_weight": False, "has_bias": False}),
    Case("rms_norm", ["f32[T,4]", "f32[4]"], {"normalized_shape": [4], "eps": 1e-6}, expected="f32[T,4]"),
    Case("rms_norm", ["bf16[T,2,4]"], {"normalized_shape": [4], "eps": 1e-6}, expected="bf16[T,2,4]"),
    Case("einsum", ["f32[T,4]", "f32[3,4]"], {"equation": "td,hd->th"}, expected="f32[T,3]"),
    # reductions and ops along one axis
    Case("sum", ["f32[T,4]"], {"dims": [1], "keepdim": False}, expected="f32[T]"),
    Case("sum", ["f32[T,4]"], {"dims": [0], "keepdim": False, "dtype": "float64"}, expected="f64[4]"),
    Case("mean", ["f32[T,4]"], {"dims": [-1], "keepdim": True}, expected="f32[T,1]"),
    Case("amax", ["f32[T,2,4]"], {"dims": [0, 2], "keepdim": False}, expected="f32[2]"),
    Case("amin", ["i64[T,4]"], {"dims": [1], "keepdim": True}, expected="i64[T,1]"),
    Case("var", ["f32[T,4]"], {"dims": [1], "keepdim": False, "correction": 1}),
    Case("logsumexp", ["f32[T,4]"], {"dims": [-1], "keepdim": False}, expected="f32[T]"),
    Case("vector_norm", ["f32[T,4]"], {"ord": 2.0, "dims": [1], "keepdim": True}, expected="f32[T,1]"),
    Case("argmax", ["f32[T,4]"], {"dim": 1, "keepdim": False}, expected="i64[T]"),
    Case("max_dim", ["f32[T,4]"], {"dim": 1, "keepdim": False, "output": 0}, expected="f32[T]"),
    Case("max_dim", ["f32[T,4]"], {"dim": 0, "keepdim": True, "output": 1}, expected="i64[1,4]"),
    Case("softmax", ["f32[T,4]"], {"dim": -1}, expected="f32[T,4]"),
    Case("softmax", ["bf16[T,4]"], {"dim": 1, "dtype": "float32"}, expected="f32[T,4]"),
    Case("log_softmax", ["f16[T,4]"], {"dim": 1, "dtype": "float32"}, expected="f32[T,4]"),
    Case("cumsum", ["i32[T]"], {"dim": 0}, expected="i64[T]"),
    Case("cumsum", ["f32[T,4]"], {"dim": 0, "dtype": "float64"}, expected="f64[T,4]"),
    Case("topk", ["f32[T,4]"], {"k": 2, "dim": 1, "largest": True, "sorted": True, "output": 0}, expected="f32[T,2]"),
    Case("topk", ["f32[T,4]"], {"k": 2, "dim": 0, "largest": False, "sorted": True, "output": 1}, expected="i64[2,4]"),
    Case("sort", ["f32[T,4]"], {"dim": 0, "descending": True, "output": 1}, expected="i64[T,4]"),
    # data movement
    Case("reshape", ["f32[T,4]"], {"shape": ["T", 2, 2]}, expected="f32[T,2,2]"),
    Case("reshape", ["f32[T,4]"], {"shape": [-1]}, expected="f32[4*T]"),
    Case("reshape", ["f32[1,T,4]"], {"shape": ["2*T", 2]}, expected="f32[2*T,2]"),
    Case("repeat", ["f32[T,4]"], {"repeats": [2, 1]}, expected="f32[2*T,4]"),
    Case("repeat", ["f32[T,4]"], {"repeats": [3, 1, 2]}, expected="f32[3,T,8]"),
    Case("permute", ["f32[T,2,4]"], {"dims": [1, 2, 0]}, expected="f32[2,4,T]"),
    Case("expand", ["f32[T,1]"], {"shape": [-1, 4]}, expected="f32[T,4]"),
    Case("expand", ["f32[T,4]"], {"shape": [2, "T", 4]}, expected="f32[2,T,4]"),
    Case("slice", ["f32[T,4]"], {"dim": 0, "start": 1, "end": "T", "step": 1}, expected="f32[T-1,4]"),
    Case("slice", ["f32[T,4]"], {"dim": 1, "start": 1, "end": 3, "step": 1}, expected="f32[T,2]"),
    Case("slice", ["f32[T,4]"], {"dim": 0, "start": 0, "end": 9223372036854775807, "step": 1}, expected="f32[T,4]"),
    Case("cat", ["f32[T,4]", "f32[2,4]"], {"dim": 0}, expected="f32[T+2,4]"),
    Case("cat", ["f32[T,4]", "f32[T,1]", "f32[T,3]"], {"dim": -1}, expected="f32[T,8]"),
    Case("index_select", ["f32[T,4]", "i64[2]"], {"dim": 0}, expected="f32[2,4]"),
    Case("index_select", ["f32[T,4]", "i64[T]"], {"dim": 1}, expected="f32[T,T]"),
    Case("gather", ["f32[T,4]", "i64[T,2]"], {"dim": 1}, expected="f32[T,2]"),
    Case("index", ["f32[T,4]", "i64[5]"], {"axes": [0]}, expected="f32[5,4]"),
    Case("index", ["f32[T,4,3]", "i64[T]", "i64[T]"], {"axes": [0, 1]}, expected="f32[T,3]"),
    Case("scatter_add", ["f32[T,4]", "i64[T,2]", "f32[T,2]"], {"dim": 1}, expected="f32[T,4]"),
    Case("scatter", ["f32[T,4]", "i64[T,2]", "f32[T,2]"], {"dim": 1}, expected="f32[T,4]"),
    Case("repeat_interleave", ["f32[T,4]"], {"repeats": 2, "dim": 0}, expected="f32[2*T,4]"),
    Case("flip", ["f32[T,4]"], {"dims": [0, 1]}),
    Case("tril", ["f32[T,T]"], {"diagonal": 0}, expected="f32[T,T]"),
    Case("triu", ["f32[T,4]"], {"diagonal": 1}),
    Case("arange", [], {"start": 0, "end": "T", "step": 1, "dtype": "int64"}, expected="i64[T]"),
    Case("arange", [], {"start": 1, "end": "T+1", "step": 1, "dtype": "float32"}, expected="f32[T]"),
    Case("full", [], {"shape": ["T", 3], "value": 0.5, "dtype": "float16"}, expected="f16[T,3]"),
    # attention over a flattened batch
    Case("attention", ["f32[T,4,8]", "f32[T,2,8]", "f32[T,2,6]", "i32[4]"], ATTN, "f32[T,4,6]", {3: _cu}),
    Case("attention", ["f32[T,4,8]", "f32[T,2,8]", "f32[T,2,8]", "i32[4]", "f32[4]"],
         {**ATTN, "sliding_window": 2, "softcap": 20.0}, "f32[T,4,8]", {3: _cu}),
    Case("attention", ["bf16[1,T,2,8]", "bf16[1,T,1,8]", "bf16[1,T,1,8]", "i32[4]"], ATTN, "bf16[1,T,2,8]", {3: _cu}),
    Case("paged_attention",
         ["f32[T,4,8]", "f32[NB,4,2,8]", "f32[NB,4,2,6]", "i32[3,MB]", "i32[3]", "i32[4]"],
         ATTN, "f32[T,4,6]",
         {1: _paged("k_cache"), 2: _paged("v_cache"), 3: _paged("block_tables"), 4: _paged("seq_lens"), 5: _cu}),
    # the rest of the kernel op set
    Case("kv_cache_write", ["f32[T,2,8]", "f32[T,2,6]", "f32[NB,4,2,8]", "f32[NB,4,2,6]", "i64[T]"], {},
         "(f32[NB,4,2,8], f32[NB,4,2,6])",
         {2: _paged("k_cache"), 3: _paged("v_cache"), 4: _paged("slot_mapping")}),
    Case("get_result", ["(f32[T,4], i64[T])"], {"index": 1}, "i64[T]",
         {0: lambda t: (torch.randn(t, 4), torch.arange(t))}),
    Case("fused_add_rms_norm", ["bf16[T,8]", "bf16[T,8]", "bf16[8]"],
         {"eps": 1e-6, "offset": 1.0, "weight_fp32": True}, "(bf16[T,8], bf16[T,8])"),
    Case("fused_add_rms_norm", ["f32[T,8]", "f32[T,8]"], {"eps": 1e-6, "offset": 0.0, "weight_fp32": False},
         "(f32[T,8], f32[T,8])"),
    Case("rms_norm", ["bf16[T,2,4]", "bf16[4]"], {"normalized_shape": [4], "eps": 1e-6, "offset": 0.0,
         "weight_fp32": False}, expected="bf16[T,2,4]"),
    Case("rope", ["bf16[T,4,8]", "i64[T]", "bf16[16,8]", "bf16[16,8]"], {"style": "neox", "rotary_dim": 8},
         "bf16[T,4,8]", {1: lambda t: torch.arange(t)}),
    Case("rope", ["f32[T,4,8]", "i64[T]", "f32[16,4]", "f32[16,4]"], {"style": "interleaved", "rotary_dim": 4},
         "f32[T,4,8]", {1: lambda t: torch.arange(t)}),
    Case("rope_kv_cache_write",
         ["f32[T,4,8]", "f32[T,2,8]", "f32[T,2,6]", "i64[T]", "f32[16,4]", "f32[16,4]", "f32[NB,4,2,8]",
          "f32[NB,4,2,6]", "i64[T]"], {"style": "neox", "rotary_dim": 4},
         "(f32[NB,4,2,8], f32[NB,4,2,6], f32[T,4,8])",
         {3: lambda t: torch.arange(t), 6: _paged("k_cache"), 7: _paged("v_cache"), 8: _paged("slot_mapping")}),
    Case("silu_and_mul", ["f32[T,8]"], expected="f32[T,4]"),
    Case("gelu_and_mul", ["bf16[T,2,8]"], {"approximate": "tanh"}, "bf16[T,2,4]"),
    Case("gated_linear", ["f32[T,8]", "f32[6,4]", "f32[6]"], {"gate": "silu_and_mul"}, "(f32[T,6], f32[T,4])"),
    Case("gated_linear", ["bf16[T,8]", "bf16[3,4]"], {"gate": "gelu_and_mul", "approximate": "none"},
         "(bf16[T,3], bf16[T,4])"),
    Case("softcap", ["f32[T,4]"], {"cap": 30.0}),
    Case("gather_rows", ["f32[T,4]", "i64[2]"], {}, "f32[2,4]", {1: lambda t: torch.tensor([0, t - 1])}),
    Case("expert_linear", ["f32[T,8]", "f32[3,5,8]", "i64[T]"], {}, "f32[T,5]",
         {2: lambda t: torch.arange(t) % 3}),
    Case("lora", ["f32[T,8]", "f32[3,4,8]", "f32[3,6,4]", "i32[T]"], {}, "f32[T,6]",
         {3: lambda t: (torch.arange(t) % 4 - 1).to(torch.int32)}),
    Case("lora", ["f32[T,8]", "f32[3,4,8]", "f32[3,6,4]", "i32[T]", "f32[T,6]"], {}, "f32[T,6]",
         {3: lambda t: (torch.arange(t) % 4 - 1).to(torch.int32)}),
    # quantized weights (ir/ops/quant.py, quant_linear.py): canonical packed ints, fp8 blocks
    Case("dequant_int", ["u8[6,4]", "f16[6,2]", "u8[6,2]"], {"bits": 4, "group_size": 4, "dtype": "float32"},
         "f32[6,8]"),
    Case("dequant_int", ["u8[6,8]", "f32[6,2]", "i32[8]"], {"bits": 8, "group_size": 4, "dtype": "bfloat16"},
         "bf16[6,8]", {2: lambda t: torch.arange(8, dtype=torch.int32) % 2}),
    Case("dequant_int_offset", ["u8[6,4]", "f16[6,2]", "f16[6,2]"], {"bits": 4, "group_size": 4, "dtype": "float32"},
         "f32[6,8]"),
    Case("dequant_fp8", ["f8e4m3[6,8]", "f32[2,1]"], {"block_n": 4, "block_k": 8, "dtype": "float16"}, "f16[6,8]"),
    Case("quant_act", ["f32[T,8]"], {"format": "int8"}, "f32[T,8]"),
    # compile-time weight quantization (ir/ops/quantize.py): the parts weight folding packs
    Case("quantize_int", ["f32[6,8]"], {"bits": 4, "group_size": 4, "part": "qweight"}, "u8[6,4]"),
    Case("quantize_int", ["bf16[6,8]"], {"bits": 4, "group_size": 4, "part": "zeros"}, "u8[6,2]"),
    Case("quantize_int", ["f32[6,8]"], {"bits": 8, "group_size": 8, "part": "scales"}, "f32[6,1]"),
    Case("quantize_fp8", ["f16[6,8]"], {"part": "qweight"}, "f8e4m3[6,8]"),
    Case("quantize_fp8", ["f32[6,8]"], {"part": "scales"}, "f32[6,1]"),
    Case("quantized_linear", ["f32[T,8]", "u8[6,4]", "f32[6,2]", "u8[6,2]", "f32[6]"],
         {"format": "int", "bits": 4, "group_size": 4, "act": "none", "dtype": "float32", "has_zeros": True,
          "has_g_idx": False, "has_bias": True}, "f32[T,6]"),
    Case("quantized_linear", ["bf16[2,T,8]", "f8e4m3[6,8]", "f32[6,1]"],
         {"format": "fp8", "block_n": 1, "block_k": 8, "act": "float8_e4m3fn", "dtype": "bfloat16",
          "has_zeros": False, "has_g_idx": False, "has_bias": False}, "bf16[2,T,6]"),
    Case("quantized_linear", ["f32[T,8]", "u8[6,4]", "f16[6,2]", "f16[6,2]", "f32[6]"],
         {"format": "int", "bits": 4, "group_size": 4, "act": "none", "dtype": "float32", "has_zeros": False,
          "has_offsets": True, "has_g_idx": False, "has_bias": True}, "f32[T,6]"),
]  # fmt: skip


def _random(type_: TensorType, bindings: dict[str, int], g: torch.Generator) -> torch.Tensor:
    shape = [evaluate(d, bindings) for d in type_.shape]
    dtype = torch_dtype(type_.dtype)
    if type_.dtype == "bool":
        return torch.rand(shape, generator=g) > 0.5
    if dtype.is_floating_point:
        return torch.randn(shape, generator=g).to(dtype)
    # integers double as indices (every indexed axis in CASES has at least 3 entries) and as
    # divisors (never 0)
    return torch.randint(1, 3, shape, generator=g, dtype=dtype)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_infer_type_matches_reference_impl(case: Case):
    op = get_op(case.op)
    types = [_t(s) for s in case.inputs]
    inferred = infer_type(op, types, case.attrs)
    if case.expected is not None:
        assert inferred.same_as(_t(case.expected)), f"inferred {inferred}, expected {case.expected}"
    g = torch.Generator().manual_seed(0)
    for t in (3, 7):
        bindings = {"T": t}
        args = [
            case.values[i](t) if i in case.values else _random(ty, bindings, g)
            for i, ty in enumerate(types)
        ]
        for ty, a in zip(types, args, strict=True):  # symbols only given values fix (NB, MB)
            for d, size in zip(ty.shape if isinstance(ty, TensorType) else (), getattr(a, "shape", ()), strict=False):
                if isinstance(d, str) and d.isidentifier():
                    bindings.setdefault(d, size)
        out = op.impl(*args, **resolve_attrs(op, case.attrs, bindings))
        outs = out if isinstance(inferred, TupleType) else (out,)
        assert len(outs) == len(inferred.types)
        for got, want in zip(outs, inferred.types, strict=True):
            assert dtype_name(got.dtype) == want.dtype, f"T={t}: ran to {got.dtype}, inferred {inferred}"
            assert list(got.shape) == [evaluate(d, bindings) for d in want.shape], (
                f"T={t}: ran to {tuple(got.shape)}, inferred {inferred}"
            )


def test_cases_cover_every_registered_op():
    missing = sorted(set(OPS) - {c.op for c in CASES})
    assert not missing, f"add a Case to tests/ir/test_ops.py for: {', '.join(missing)}"


def test_infer_type_fits_affine_shapes_in_two_symbols():
    op = get_op("cat")
    got = infer_type(op, [_t("f32[T,4]"), _t("f32[2*S+1,4]")], {"dim": 0})
    assert got.same_as(_t("f32[T+2*S+1,4]"))


def test_infer_type_rejects_shapes_not_affine_in_a_symbol():
    # a stride-2 slice has ceil(T/2) rows
    with pytest.raises(VerifyError, match="not affine in symbol T"):
        infer_type(get_op("slice"), [_t("f32[T,4]")], {"dim": 0, "start": 0, "end": "T", "step": 2})


def test_resolve_attrs_binds_only_dim_attrs():
    op = get_op("slice")
    attrs = {"dim": 0, "start": "S", "end": "2*S + 1", "step": 1}
    assert resolve_attrs(op, attrs, {"S": 4}) == {"dim": 0, "start": 4, "end": 9, "step": 1}
    reshape = get_op("reshape")
    assert resolve_attrs(reshape, {"shape": ["T", -1, 4]}, {"T": 3}) == {"shape": [3, -1, 4]}
    assert resolve_attrs(get_op("softmax"), {"dim": 1}, {}) == {"dim": 1}


def test_registering_an_op_twice_is_an_error():
    from kiln.ir.ops import register

    with pytest.raises(ValueError, match="op 'add' registered twice"):
        register("add", arity=2)(lambda a, b: a + b)


# -- scalar literals: the interpreter passes Python numbers, inference probes 0-dim tensors ---

_LITERAL_DTYPES = {float: "float32", int: "int64", bool: "bool"}


@pytest.mark.parametrize(
    ("op", "tensor", "literal", "literal_first"),
    [
        ("add", "f16[T]", 1.5, False),
        ("add", "i32[T]", 2, False),
        ("add", "bool[T]", 1, False),
        ("mul", "i64[T]", 0.5, True),
        ("sub", "bf16[T]", 1, True),
        ("pow", "i64[T]", 2.0, False),
        ("pow", "f32[T]", 2, True),
        ("div", "i32[T]", 2, False),
        ("remainder", "i32[T]", 3, False),
        ("maximum", "i32[T]", 1.5, False),
        ("minimum", "f16[T]", 0, True),
        ("lt", "i64[T]", 0.5, False),
        ("eq", "f16[T]", True, True),
        ("bitwise_and", "bool[T]", True, False),
        ("logical_or", "f32[T]", False, True),
    ],
)
def test_scalar_literal_operands_type_like_they_run(op, tensor, literal, literal_first):
    x = input_node("x", _t(tensor))
    c = const_node(literal, TensorType(_LITERAL_DTYPES[type(literal)], ()))
    operands = [c, x] if literal_first else [x, c]
    node = Node(op, tuple(operands), {}, infer_type(get_op(op), [o.type for o in operands], {}))
    graph = Graph([x, c, node], [node])
    verify(graph)
    (out,) = run_graph(
        graph, {"x": _random(x.type, {"T": 5}, torch.Generator().manual_seed(1))}, lambda n, t: None
    )
    assert dtype_name(out.dtype) == node.type.dtype and list(out.shape) == [5]


@pytest.mark.parametrize(
    ("cond", "a", "b"),
    [
        ("bool[T]", 1.0, 0.0),
        ("bool[T]", 1, 0),
        ("bool[T]", "f16[T]", 0.0),
        ("bool[T]", 1, "i32[T]"),
    ],
)
def test_where_with_scalar_branches_types_like_it_runs(cond, a, b):
    nodes, operands, inputs = [], [], {}
    g = torch.Generator().manual_seed(2)
    for i, v in enumerate([cond, a, b]):
        if isinstance(v, str):
            n = input_node(f"x{i}", _t(v))
            inputs[n.name] = _random(n.type, {"T": 4}, g)
        else:
            n = const_node(v, TensorType(_LITERAL_DTYPES[type(v)], ()))
        nodes.append(n)
        operands.append(n)
    node = Node(
        "where", tuple(operands), {}, infer_type(get_op("where"), [o.type for o in operands], {})
    )
    (out,) = run_graph(Graph([*nodes, node], [node]), inputs, lambda n, t: None)
    assert dtype_name(out.dtype) == node.type.dtype and list(out.shape) == [4]
