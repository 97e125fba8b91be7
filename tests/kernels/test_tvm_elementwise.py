"""TVM silu_and_mul, gelu_and_mul (erf, tanh), softcap, gather_rows and embedding against their
ops' torch references, on odd token counts and strided inputs."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("tvm")

from test_tvm_norms import _merged, _randn, check  # noqa: E402


@pytest.mark.parametrize("t", [1, 7, 33])
@pytest.mark.parametrize("op,attrs", [("silu_and_mul", {}), ("gelu_and_mul", {"approximate": "none"}),
                                      ("gelu_and_mul", {"approximate": "tanh"})])
def test_gated_activations(op, attrs, t):
    check(op, [_merged(t, 2 * 48) * 3], attrs)


def test_gated_activation_bfloat16_and_rank3():
    check("silu_and_mul", [_randn(7, 128, dtype=torch.bfloat16) * 3], {})
    check("gelu_and_mul", [_randn(2, 5, 64) * 3], {"approximate": "tanh"})


@pytest.mark.parametrize("t", [1, 7, 33])
def test_softcap(t):
    check("softcap", [_merged(t, 100) * 40], {"cap": 30.0})


@pytest.mark.parametrize("t", [1, 7, 33])
def test_gather_rows(t):
    x = _merged(40, 64)
    idx = torch.randint(0, 40, (t,), generator=torch.Generator().manual_seed(t))
    check("gather_rows", [x, idx], {})


@pytest.mark.parametrize("t", [1, 7, 33])
def test_embedding(t):
    ids = torch.randint(0, 50, (t,), generator=torch.Generator().manual_seed(t))
    check("embedding", [_randn(50, 72), ids], {})


def _check_ewise(op: str, args: list, attrs: dict | None = None) -> None:
    """Like test_tvm_norms.check, with scalar operands built into the kernel (OpInfo.consts)
    and every tensor of the result's shape symbolic in its first dim."""
    from test_tvm_norms import _type

    from kiln.codegen.cpu.build import launcher_of
    from kiln.ir.ops import OPS
    from kiln.kernels.tvm_kernels import OpInfo, build

    attrs = attrs or {}
    want = OPS[op].impl(*args, **attrs)
    static = [a.dim() == 0 or a.numel() == 1 for a in args if isinstance(a, torch.Tensor)]
    tensors = iter(static)
    info = OpInfo(op, tuple(_type(a, next(tensors)) if isinstance(a, torch.Tensor) else None for a in args),
                  (_type(want),), attrs, consts=tuple(None if isinstance(a, torch.Tensor) else a for a in args))
    kernel = build(info)
    assert kernel is not None, f"no TVM kernel for {op} {info}"
    out = torch.full_like(want, -7)
    launcher_of(kernel)([out], args, attrs)
    tol = 1e-6 if want.dtype != torch.bfloat16 else 1.6e-2  # (test_tvm_norms.TOL)
    torch.testing.assert_close(out, want, atol=tol, rtol=tol)


@pytest.mark.parametrize("t", [1, 33])
@pytest.mark.parametrize("op,attrs", [("gelu", {"approximate": "none"}), ("gelu", {"approximate": "tanh"}),
                                      ("relu", {}), ("tanh", {}), ("sigmoid", {}), ("silu", {}), ("neg", {}),
                                      ("clamp", {"min": -1.5, "max": 2.0}), ("clamp", {"max": 7.0})])
def test_unary(op, attrs, t):
    _check_ewise(op, [_merged(t, 40) * 3], attrs)


@pytest.mark.parametrize("op", ["add", "sub", "mul", "div"])
def test_binary_tensor_tensor_and_broadcast_scalar(op):
    a, b = _merged(7, 64), _randn(7, 64, seed=5) + 4
    _check_ewise(op, [a, b])
    _check_ewise(op, [a, torch.tensor(8.0)])  # a one-element tensor (Gemma's embedding normalizer)
    _check_ewise(op, [a, b[:, :1]])  # one value per row (MoE routing weights), a strided column


def test_binary_per_row_broadcast_over_heads():
    """[T, K, D] * [T, K, 1] (Mixtral's weighted expert outputs) and [T, K] / [T, 1]."""
    w = torch.softmax(_randn(5, 2, seed=2), -1)
    _check_ewise("mul", [_randn(5, 2, 64), w.unsqueeze(-1)])
    _check_ewise("div", [w, w.sum(-1, keepdim=True)])


@pytest.mark.parametrize("op,args", [("mul", [None, 0.044715]), ("add", [None, 1.0]), ("sub", [1.0, None]),
                                     ("div", [None, 3.0]), ("pow", [None, 3.0]), ("pow", [None, 2]),
                                     ("pow", [None, 0.5]), ("add", [None, 2])])
def test_binary_with_a_constant(op, args):
    x = _merged(9, 48).abs() if op == "pow" else _merged(9, 48)
    _check_ewise(op, [x if a is None else a for a in args])


@pytest.mark.parametrize("op,args", [("div", [None, 3.0]), ("pow", [None, 3.0]), ("gelu", [None]), ("mul", [None, None])])
def test_bfloat16(op, args):
    x = _merged(9, 48, dtype=torch.bfloat16) * 3
    _check_ewise(op, [x if a is None else a for a in args], {"approximate": "tanh"} if op == "gelu" else {})


def test_integer_add_of_a_token_vector():
    """OPT's position offset: i64[T] + 2, a symbolic inner dim."""
    _check_ewise("add", [torch.arange(11), 2])


@pytest.mark.parametrize("t", [1, 7, 33])
@pytest.mark.parametrize("op,make,attrs", [
    ("silu_and_mul", lambda t: [_merged(t, 2 * 48) * 3], {}),
    ("gelu_and_mul", lambda t: [_merged(t, 2 * 48) * 3], {"approximate": "tanh"}),
    ("softcap", lambda t: [_merged(t, 100) * 40], {"cap": 30.0}),
    ("embedding", lambda t: [_randn(50, 72), torch.arange(t) % 50], {}),
    ("gather_rows", lambda t: [_merged(40, 64), torch.arange(t) % 40], {}),
    ("add", lambda t: [_merged(t, 64), _randn(t, 64, seed=5)], {}),
    ("mul", lambda t: [_merged(t, 64), _randn(t, 1, seed=5)], {}),
    ("sigmoid", lambda t: [_merged(t, 40) * 3], {}),
])
def test_serial_and_parallel_rows_agree_bitwise(op, make, attrs, t):
    """A decode-sized call runs its rows on the calling thread (default `ser`), ser=0 runs them
    in TVM's pool: one row body, the same bits."""
    from test_tvm_norms import _type, run_with

    from kiln.ir.ops import OPS
    from kiln.kernels.tvm_kernels import OpInfo, build

    args = make(t)
    want = OPS[op].impl(*args, **attrs)
    table = op in ("embedding", "gather_rows")  # its first input is a table of static shape
    info = OpInfo(op, tuple(_type(a, table and i == 0) for i, a in enumerate(args)), (_type(want),), attrs)
    got = []
    for config in ({}, {"ser": 0}):
        out = torch.full_like(want, float("nan"))
        run_with(build(info, config), [out], args, attrs)
        got.append(out)
    assert torch.equal(got[0], got[1])
    torch.testing.assert_close(got[0], want, atol=1e-6, rtol=1e-6)
