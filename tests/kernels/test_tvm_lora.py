"""The TVM `lora` (a shrink and an expand per token, reading its slot's rows) against the op's
torch reference: mixed slots, tokens without an adapter (-1), a rank padded by zero rows,
strided x and y, 16-bit dtypes, every knob, with and without base (the linear's result the update
is added to); and the cpu lowering building it, not a fallback.
Compiled for this CPU."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("tvm")

from kiln.codegen.cpu.build import launcher_of  # noqa: E402
from kiln.ir.graph import Graph, input_node  # noqa: E402
from kiln.ir.ops import OPS  # noqa: E402
from kiln.ir.types import TensorType, dtype_name  # noqa: E402
from kiln.kernels.tvm_kernels import OpInfo, build  # noqa: E402
from kiln.kernels.tvm_kernels.lora import KNOBS  # noqa: E402
from kiln.passes.base import make  # noqa: E402

# float32: the sum order differs from torch's; 16-bit: v and y round where the reference rounds
TOL = {torch.float32: 1e-5, torch.bfloat16: 1.6e-2, torch.float16: 2e-3}


def operands(t: int, k: int, n: int, r: int, nl: int, dtype=torch.float32, rank: int | None = None,
             seed: int = 0) -> tuple[torch.Tensor, ...]:
    """x [T, K], a [NL, R, K], b [NL, N, R] (rows and columns past `rank` zero, as a slot of a
    smaller adapter) and index [T] int32 mixing every slot and -1."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(t, k, generator=g)
    a = torch.randn(nl, r, k, generator=g) / k**0.5
    b = torch.randn(nl, n, r, generator=g) / r**0.5
    if rank is not None:
        a[:, rank:] = 0
        b[:, :, rank:] = 0
    index = torch.randint(-1, nl, (t,), generator=g, dtype=torch.int32)
    index[0] = nl - 1 if t > 1 else index[0]
    return x.to(dtype), a.to(dtype), b.to(dtype), index


def kernel_of(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, config: dict | None = None, base: bool = False):
    dt = dtype_name(x.dtype)
    out = TensorType(dt, ("T", b.shape[1]))
    info = OpInfo("lora", (TensorType(dt, ("T", x.shape[1])), TensorType(dt, ("NL", *a.shape[1:])),
                           TensorType(dt, ("NL", *b.shape[1:])), TensorType("int32", ("T",)), *([out] if base else [])),
                  (out,))
    kernel = build(info, config)
    assert kernel is not None
    return kernel


def check(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, index: torch.Tensor, y: torch.Tensor | None = None,
          config: dict | None = None, base: torch.Tensor | None = None) -> None:
    args = [x, a, b, index, *([] if base is None else [base])]
    want = OPS["lora"].impl(*args)
    y = torch.full_like(want, float("nan")) if y is None else y.fill_(float("nan"))
    kernel = kernel_of(x, a, b, config, base=base is not None)
    if config:
        from kiln.codegen.cpu.build import compile_kernels
        from kiln.kernels.tvm_provider import make_launcher

        make_launcher(compile_kernels([kernel])[kernel.name], kernel.table())([y], args, {})
    else:
        launcher_of(kernel)([y], args, {})
    torch.testing.assert_close(y, want, atol=TOL[x.dtype], rtol=TOL[x.dtype])
    assert (y[index < 0] == (0 if base is None else base[index < 0])).all()  # -1: the base row exactly


@pytest.mark.parametrize("t", [1, 37])
@pytest.mark.parametrize(("k", "n", "r", "nl"), [(64, 48, 8, 2), (40, 24, 12, 3), (96, 40, 48, 4)])
def test_lora_matches_the_reference(t, k, n, r, nl):
    check(*operands(t, k, n, r, nl))


def test_rank_padding_and_tokens_without_adapters():
    x, a, b, index = operands(37, 64, 32, 16, 3, rank=5)
    index[::3] = -1
    check(x, a, b, index)
    check(x, a, b, torch.full_like(index, -1))


def test_an_index_past_the_slots_reads_nothing():
    x, a, b, index = operands(37, 64, 32, 8, 3, torch.float32)
    index[1::4] = 3
    y = torch.full((37, 32), float("nan"), device=x.device)
    launcher_of(kernel_of(x, a, b))([y], [x, a, b, index], {})
    torch.testing.assert_close(y, OPS["lora"].impl(x, a, b, torch.where(index < 3, index, -1)), atol=1e-4, rtol=1e-4)


def test_strided_x_and_y():
    _, a, b, index = operands(37, 48, 40, 8, 3)
    wide = torch.randn(37, 48 + 17)[:, 5: 5 + 48]  # rows of a merged projection
    check(wide, a, b, index, y=torch.empty(37, 40 + 9)[:, 2: 2 + 40])
    check(wide, a, b, index, y=torch.empty(37, 2 * 40)[:, ::2])  # a strided y: computed aside, copied back


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_16_bit(dtype):
    check(*operands(37, 64, 48, 16, 3, dtype=dtype, rank=11))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("t", [1, 37])
def test_base_is_added(dtype, t):
    x, a, b, index = operands(t, 64, 48, 16, 3, dtype=dtype, rank=11)
    index[::3] = -1
    check(x, a, b, index, base=torch.randn(t, 48).to(dtype))
    wide = torch.randn(t, 48 + 24).to(dtype)[:, 8: 8 + 48]  # a slice of a merged projection's result
    check(x, a, b, index, y=torch.empty(t, 48 + 9, dtype=dtype)[:, 2: 2 + 48], base=wide)


@pytest.mark.parametrize("knob", sorted(KNOBS["lora"]))
def test_every_knob_gives_the_same_result(knob):
    x, a, b, index = operands(37, 64, 48, 16, 3)
    base = torch.randn(37, 48)
    for value in KNOBS["lora"][knob]:
        check(x, a, b, index, config={knob: value})
        check(x, a, b, index, config={knob: value}, base=base)


def test_a_config_that_does_not_divide_the_shape_is_refused():
    x, a, b, _ = operands(1, 36, 24, 12, 2)
    with pytest.raises(ValueError, match="does not divide"):
        kernel_of(x, a, b, {"rb": 8})


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_model_size(dtype):
    x, a, b, index = operands(32, 4096, 4096, 16, 8, dtype=dtype, rank=12)
    check(x[:1], a, b, index[:1])
    check(x, a, b, index)


def test_the_cpu_lowering_builds_lora():
    from kiln.codegen.cpu import lower

    x = input_node("x", TensorType("float32", ("T", 32)))
    a = input_node("lora.q.a", TensorType("float32", ("NL", 8, 32)))
    b = input_node("lora.q.b", TensorType("float32", ("NL", 16, 8)))
    index = input_node("lora_index", TensorType("int32", ("T",)))
    lowered = lower(Graph([], []).with_nodes([x, a, b, index], [make("lora", [x, a, b, index])]))
    assert [s.kernel for s in lowered.plan.steps] == ["tvm:lora_k32n16r8_f32"]
    assert lowered.fallbacks == []
    base = input_node("base", TensorType("float32", ("T", 16)))
    lowered = lower(Graph([], []).with_nodes([x, a, b, index, base], [make("lora", [x, a, b, index, base])]))
    assert [s.kernel for s in lowered.plan.steps] == ["tvm:lora_k32n16r8_f32_base"]
    assert lowered.fallbacks == []
