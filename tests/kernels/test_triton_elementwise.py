"""Triton silu_and_mul, gelu_and_mul, softcap and gather_rows against their ops' torch
references (float32 and float16 in Triton's interpreter without a GPU; bfloat16 at model sizes
on one)."""

from __future__ import annotations

import pytest
import torch

from kiln.ir.ops import OPS
from kiln.kernels.triton_kernels.elementwise import LAUNCHERS, row_layout

DEV = "cuda" if torch.cuda.is_available() else "cpu"
# Results round where the reference rounds; what is left is exp/erf/tanh's own error.
TOL = {torch.float32: 2e-6, torch.float16: 1e-3, torch.bfloat16: 1.6e-2}


def _check(name: str, args: list, attrs: dict, dtype: torch.dtype) -> None:
    want = OPS[name].impl(*args, **attrs)
    out = torch.full_like(want, float("nan"))
    LAUNCHERS[name]([out], args, attrs)
    assert out.dtype == want.dtype
    torch.testing.assert_close(out, want, atol=TOL[dtype], rtol=TOL[dtype])


def _randn(*shape: int, dtype: torch.dtype, seed: int = 0, scale: float = 2.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g) * scale).to(device=DEV, dtype=dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_silu_and_mul(dtype):
    _check("silu_and_mul", [_randn(7, 2 * 300, dtype=dtype)], {}, dtype)


@pytest.mark.parametrize("approximate", ["none", "tanh"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_gelu_and_mul(approximate, dtype):
    _check("gelu_and_mul", [_randn(5, 2 * 150, dtype=dtype)], {"approximate": approximate}, dtype)


def test_gated_activation_of_a_strided_three_axis_input():
    # [T, 2, 2I] heads of a wider buffer: rows collapse into two strided axes
    x = _randn(3, 2, 2 * 24 + 5, dtype=torch.float32)[..., : 2 * 24]
    assert row_layout(x)[1] == 2 and not x.is_contiguous()
    _check("gelu_and_mul", [x], {"approximate": "tanh"}, torch.float32)


def test_gelu_rejects_an_unknown_approximation():
    x = _randn(1, 4, dtype=torch.float32)
    with pytest.raises(ValueError, match="approximate 'fast'"):
        LAUNCHERS["gelu_and_mul"]([torch.empty(1, 2)], [x], {"approximate": "fast"})


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_softcap(dtype):
    # values from far inside the cap (tanh's series) to far past it (saturation)
    x = torch.cat([_randn(3, 77, dtype=dtype, scale=30.0), _randn(2, 77, dtype=dtype, seed=1, scale=0.05)])
    _check("softcap", [x], {"cap": 30.0}, dtype)


def test_softcap_of_attention_scores_view():
    x = _randn(2, 3, 40, dtype=torch.float32, scale=60.0).transpose(0, 1)  # rows of [3, 2] strided
    _check("softcap", [x], {"cap": 50.0}, torch.float32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_gather_rows(dtype):
    x = _randn(9, 100, dtype=dtype)
    idx = torch.tensor([8, 0, 3], device=DEV)
    _check("gather_rows", [x, idx], {}, dtype)


def test_gather_rows_of_heads_and_strided_rows():
    x = _randn(6, 4, 8, dtype=torch.float32)
    _check("gather_rows", [x, torch.tensor([5, 5, 1], device=DEV)], {}, torch.float32)
    wide = _randn(6, 50, dtype=torch.float32)[:, 10:30]  # row stride 50, width 20
    _check("gather_rows", [wide, torch.tensor([2], device=DEV)], {}, torch.float32)


def test_row_layout_keeps_the_token_axis_at_any_count():
    merged = _randn(5, 3 * 8 + 4, dtype=torch.float32)
    for t in (1, 5):  # one token: the same layout (so the same compiled variant) as five
        n0, n1, _, s1 = row_layout(merged[:t, :24].unflatten(1, (3, 8)))
        assert (n0, n1, s1) == (t, 3, 8)
        assert row_layout(merged[:t]) == (t, 1, 28, 0)


def test_rows_that_do_not_collapse_are_refused():
    x = _randn(3, 4, 5, 8, dtype=torch.float32)[:, :2, :3]
    with pytest.raises(ValueError, match="two strided axes"):
        row_layout(x)


# -- on a GPU, in bfloat16 at model sizes ------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("t", [1, 7, 2048])
def test_gpu_bf16_activations(t):
    bf = torch.bfloat16
    x = _randn(t, 2 * 14336, dtype=bf)
    _check("silu_and_mul", [x], {}, bf)
    for approximate in ("none", "tanh"):
        _check("gelu_and_mul", [x], {"approximate": approximate}, bf)
    _check("softcap", [_randn(t, 4096, dtype=bf, scale=40.0)], {"cap": 30.0}, bf)
    _check("gather_rows", [_randn(t, 4096, dtype=bf), torch.arange(t - 1, -1, -3, device=DEV)], {}, bf)


@pytest.mark.gpu
def test_gpu_softcap_of_float32_logits():
    _check("softcap", [_randn(64, 256000, dtype=torch.float32, scale=40.0)], {"cap": 30.0}, torch.float32)
