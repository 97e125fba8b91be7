"""The TVM fused_elementwise kernel against the op chain's torch result (the op's reference runs
each step's own op): gpt2's written-out tanh GELU, per-row and one-element operands, shared
steps, odd sizes and strided inputs; float32 to the bit where TVM's math matches torch's
(add, mul, div, pow), bfloat16 at the norms' tolerance."""

from __future__ import annotations

import math

import pytest
import torch

pytest.importorskip("tvm")

from test_tvm_norms import _merged, _randn, _type  # noqa: E402

from kiln.codegen.cpu.build import launcher_of  # noqa: E402
from kiln.ir.ops import OPS  # noqa: E402
from kiln.kernels.tvm_kernels import OpInfo, build  # noqa: E402

K = math.sqrt(2 / math.pi)
# 0.5*x*(1+tanh(K*(x+0.044715*x**3))), as gpt2's NewGELUActivation writes it
GELU_TANH = [["mul", [0.5, "x0"], {}], ["pow", ["x0", 3.0], {}], ["mul", [0.044715, "v1"], {}],
             ["add", ["x0", "v2"], {}], ["mul", [K, "v3"], {}], ["tanh", ["v4"], {}], ["add", [1.0, "v5"], {}],
             ["mul", ["v0", "v6"], {}]]


def _chain(expr: list, args: list) -> torch.Tensor:
    """The expression evaluated op by op, each through its op's torch reference."""
    vals: list = []
    for op, refs, attrs in expr:
        ops = [r if not isinstance(r, str) else args[int(r[1:])] if r[0] == "x" else vals[int(r[1:])] for r in refs]
        vals.append(OPS[op].impl(*ops, **attrs))
    return vals[-1]


def _run(expr: list, args: list, tol: float | None = None) -> None:
    want = _chain(expr, args)
    assert torch.equal(OPS["fused_elementwise"].impl(*args, expr=expr), want)
    static = [a.numel() == 1 for a in args]
    info = OpInfo("fused_elementwise", tuple(_type(a, s) for a, s in zip(args, static, strict=True)), (_type(want),),
                  {"expr": expr})
    kernel = build(info)
    assert kernel is not None, f"no TVM kernel for {info}"
    out = torch.full_like(want, float("nan"))
    launcher_of(kernel)([out], args, {"expr": expr})
    if tol is None:
        torch.testing.assert_close(out, want, atol=0, rtol=0)
    else:
        torch.testing.assert_close(out, want, atol=tol, rtol=tol)


@pytest.mark.parametrize("t,n", [(1, 128), (7, 64), (33, 100), (5, 37), (3, 1)])
def test_gpt2_tanh_gelu(t, n):
    # tanh: TVM's and torch's differ in the last bits
    _run(GELU_TANH, [_merged(t, n) * 3], tol=1e-6)


@pytest.mark.parametrize("t,n", [(1, 64), (9, 37), (4, 129)])
def test_add_mul_div_pow_are_bitwise(t, n):
    """No contraction into a fused multiply-add: (a * c + b) / d ** 2 rounds after every op."""
    expr = [["mul", ["x0", 0.7978845608], {}], ["add", ["v0", "x1"], {}], ["pow", ["x2", 2], {}],
            ["div", ["v1", "v2"], {}], ["sub", [1.0, "v3"], {}]]
    _run(expr, [_merged(t, n), _randn(t, n, seed=1), _randn(t, n, seed=2) + 3])


def test_per_row_and_one_element_operands():
    """[T, K, D] * [T, K, 1] + [1] (a strided column and a one-element tensor), then sigmoid."""
    w = _randn(5, 3, 9, seed=4)[:, :, 2:3]
    expr = [["mul", ["x0", "x1"], {}], ["add", ["v0", "x2"], {}], ["sigmoid", ["v1"], {}], ["mul", ["v2", "v0"], {}]]
    _run(expr, [_randn(5, 3, 64), w, torch.tensor([0.25])], tol=1e-6)


@pytest.mark.parametrize("op,attrs", [("gelu", {"approximate": "none"}), ("gelu", {"approximate": "tanh"}),
                                      ("relu", {}), ("silu", {}), ("neg", {}), ("exp", {}),
                                      ("clamp", {"min": -1.5, "max": 2.0})])
def test_unary_steps(op, attrs):
    expr = [["mul", ["x0", 2.0], {}], [op, ["v0"], attrs], ["add", ["v1", "x0"], {}]]
    _run(expr, [_merged(7, 48)], tol=1e-6)


def test_bfloat16_rounds_after_every_step():
    x = _merged(9, 48, dtype=torch.bfloat16) * 3
    _run(GELU_TANH, [x], tol=1.6e-2)


def test_uncovered_steps_build_nothing():
    from kiln.ir.types import TensorType

    t = TensorType("float32", ("T", 8))
    info = OpInfo("fused_elementwise", (t,), (t,), {"expr": [["log", ["x0"], {}], ["mul", ["v0", "x0"], {}]]})
    assert build(info) is None


@pytest.mark.parametrize("t,n", [(1, 128), (7, 64), (33, 100), (5, 37)])
def test_serial_and_parallel_rows_agree_bitwise(t, n):
    """A decode-sized call runs its rows on the calling thread (default `ser`), ser=0 runs them
    in TVM's pool: one row body, the same bits."""
    from test_tvm_norms import run_with

    args = [_merged(t, n) * 3, _randn(t, 1, seed=1)]
    expr = [*GELU_TANH, ["mul", ["v7", "x1"], {}]]
    want = _chain(expr, args)
    info = OpInfo("fused_elementwise", tuple(_type(a) for a in args), (_type(want),), {"expr": expr})
    got = []
    for config in ({}, {"ser": 0}):
        out = torch.full_like(want, float("nan"))
        run_with(build(info, config), [out], args, {"expr": expr})
        got.append(out)
    assert torch.equal(got[0], got[1])
    torch.testing.assert_close(got[0], want, atol=1e-6, rtol=1e-6)
