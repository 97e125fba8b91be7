"""TVM rms_norm (every variant), fused_add_rms_norm and layer_norm against their ops' torch
references, on odd token counts, strided inputs (a slice of a wider projection) and per-head
norms over [T, H, D] views; compiled for this CPU."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("tvm")

from kiln.codegen.cpu.build import launcher_of  # noqa: E402
from kiln.ir.ops import OPS  # noqa: E402
from kiln.ir.types import TensorType, dtype_name  # noqa: E402
from kiln.kernels.tvm_kernels import OpInfo, build  # noqa: E402

# float32: the sum order and rsqrt differ from torch's; 16-bit results round where torch rounds
TOL = {torch.float32: 1e-5, torch.bfloat16: 1.6e-2}


def _type(t: torch.Tensor, static: bool = False) -> TensorType:
    return TensorType(dtype_name(t.dtype), tuple(t.shape) if static else ("T", *t.shape[1:]))


def check(op: str, args: list, attrs: dict, static: tuple[int, ...] = (), config: dict | None = None) -> None:
    """Run op's TVM kernel (schedule `config`, default None) on args and compare each result
    with the torch reference; the first dim of every input but those at `static` (weights) is
    symbolic ("T")."""
    want = OPS[op].impl(*args, **attrs)
    want = want if isinstance(want, tuple) else (want,)
    info = OpInfo(op, tuple(_type(a, i in static) if isinstance(a, torch.Tensor) else None for i, a in enumerate(args)),
                  tuple(_type(w) for w in want), attrs)
    kernel = build(info, config)
    assert kernel is not None, f"no TVM kernel for {op} {info}"
    outs = [torch.full_like(w, float("nan")) for w in want]
    (run_with if config else lambda k, *a: launcher_of(k)(*a))(kernel, outs, args, attrs)
    for got, ref in zip(outs, want, strict=True):
        tol = TOL[ref.dtype]
        torch.testing.assert_close(got, ref, atol=tol, rtol=tol)


def _randn(*shape: int, dtype=torch.float32, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


def _merged(t: int, width: int, dtype=torch.float32) -> torch.Tensor:
    """Columns [3, 3 + width) of a wider projection output: a row stride past the width."""
    return _randn(t, width + 11, dtype=dtype, seed=3)[:, 3: 3 + width]


RMS = {
    "plain": {},
    "llama": {"offset": 0.0, "weight_fp32": False},
    "offset_in_weight_dtype": {"offset": 1.0, "weight_fp32": False},
    "gemma": {"offset": 1.0, "weight_fp32": True},
    "olmo2": {"offset": 0.0, "weight_fp32": True},
}


@pytest.mark.parametrize("t", [1, 7, 33])
@pytest.mark.parametrize("variant", sorted(RMS))
def test_rms_norm(variant, t):
    x = _merged(t, 64) if t == 7 else _randn(t, 64)
    check("rms_norm", [x, _randn(64, seed=1)], {"normalized_shape": [64], "eps": 1e-6, **RMS[variant]})


def test_rms_norm_without_weight_and_per_head_on_a_strided_view():
    qkv = _randn(7, 3 * 4 * 16)
    q = qkv[:, 16: 16 + 4 * 16].view(7, 4, 16)  # a strided [T, H, D] view
    check("rms_norm", [q, _randn(16, seed=1)], {"normalized_shape": [16], "eps": 1e-6, "offset": 0.0,
                                                 "weight_fp32": False})
    check("rms_norm", [_randn(5, 48)], {"normalized_shape": [48], "eps": 1e-5, "offset": 0.0, "weight_fp32": True})


def test_rms_norm_bfloat16():
    x, w = _randn(33, 64, dtype=torch.bfloat16), _randn(64, dtype=torch.bfloat16, seed=1)
    for variant in ("llama", "gemma"):
        check("rms_norm", [x, w], {"normalized_shape": [64], "eps": 1e-6, **RMS[variant]})


@pytest.mark.parametrize("t", [1, 7, 33])
@pytest.mark.parametrize("variant", ["llama", "gemma"])
def test_fused_add_rms_norm(variant, t):
    x, res = _merged(t, 96), _randn(t, 96, seed=2)
    attrs = {"eps": 1e-6, **RMS[variant]}
    check("fused_add_rms_norm", [x, res, _randn(96, seed=1)], attrs)


def test_fused_add_rms_norm_without_weight():
    check("fused_add_rms_norm", [_randn(7, 64), _randn(7, 64, seed=2)], {"eps": 1e-5, "offset": 0.0,
                                                                         "weight_fp32": False})


@pytest.mark.parametrize("t", [1, 7, 33])
@pytest.mark.parametrize("wb", [(True, True), (True, False), (False, False)])
def test_layer_norm(wb, t):
    has_w, has_b = wb
    x = _merged(t, 80) + 3.0  # an offset mean: the two-pass variance must not cancel
    args = [x, *([_randn(80, seed=1)] if has_w else []), *([_randn(80, seed=2)] if has_b else [])]
    check("layer_norm", args, {"normalized_shape": [80], "eps": 1e-5, "has_weight": has_w, "has_bias": has_b})


def run_with(kernel, outs: list, args: list, attrs: dict) -> None:
    """Compile `kernel` on its own and run it (launcher_of caches by name, and a config keeps
    the name)."""
    from kiln.codegen.cpu.build import compile_kernels
    from kiln.kernels.tvm_provider import make_launcher

    lib = compile_kernels([kernel])
    make_launcher(lib[kernel.name], kernel.table())(outs, args, attrs)


@pytest.mark.parametrize("op", ["rms_norm", "fused_add_rms_norm", "layer_norm"])
def test_serial_and_parallel_rows_agree_bitwise(op):
    """A decode-sized call runs its rows on the calling thread (default `ser`), ser=0 runs
    them in TVM's pool: one row body, the same bits."""
    x, w = _merged(5, 64), _randn(64, seed=1)
    args = {"rms_norm": [x, w], "fused_add_rms_norm": [x, _randn(5, 64, seed=2), w],
            "layer_norm": [x, w, _randn(64, seed=2)]}[op]
    attrs = {"rms_norm": {"normalized_shape": [64], "eps": 1e-6, **RMS["llama"]},
             "fused_add_rms_norm": {"eps": 1e-6, **RMS["llama"]},
             "layer_norm": {"normalized_shape": [64], "eps": 1e-5}}[op]
    want = OPS[op].impl(*args, **attrs)
    want = want if isinstance(want, tuple) else (want,)
    info = OpInfo(op, tuple(_type(a, i >= 1 + (op == "fused_add_rms_norm")) for i, a in enumerate(args)),
                  tuple(_type(t) for t in want), attrs)
    got = []
    for config in ({}, {"ser": 0}):
        outs = [torch.full_like(t, float("nan")) for t in want]
        run_with(build(info, config), outs, args, attrs)
        got.append(outs)
    for serial, parallel, ref in zip(*got, want, strict=True):
        assert torch.equal(serial, parallel)
        torch.testing.assert_close(serial, ref, atol=TOL[ref.dtype], rtol=TOL[ref.dtype])
