"""Triton rms_norm, fused_add_rms_norm and layer_norm against their ops' torch references
(float32 and float16 in Triton's interpreter without a GPU; bfloat16 at model sizes on one)."""

from __future__ import annotations

import pytest
import torch

from kiln.ir.ops import OPS
from kiln.kernels.triton_kernels.norms import LAUNCHERS

DEV = "cuda" if torch.cuda.is_available() else "cpu"
# Results round where the reference rounds; what is left is rsqrt's and the sum order's error.
TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def _check(name: str, args: list, attrs: dict, dtype: torch.dtype) -> None:
    want = OPS[name].impl(*args, **attrs)
    want = want if isinstance(want, tuple) else (want,)
    outs = [torch.full_like(w, float("nan")) for w in want]
    LAUNCHERS[name](outs, args, attrs)
    for got, ref in zip(outs, want, strict=True):
        assert got.dtype == ref.dtype
        torch.testing.assert_close(got, ref, atol=TOL[dtype], rtol=TOL[dtype])


def _randn(*shape: int, dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g).to(device=DEV, dtype=dtype)


def _merged(t: int, width: int, dtype: torch.dtype) -> torch.Tensor:
    """Columns [3, 3 + width) of a wider projection output: a row stride past the width."""
    return _randn(t, width + 11, dtype=dtype, seed=3)[:, 3 : 3 + width]


RMS_VARIANTS = {
    "llama": {"offset": 0.0, "weight_fp32": False},
    "llama_offset_in_weight_dtype": {"offset": 1.0, "weight_fp32": False},
    "gemma": {"offset": 1.0, "weight_fp32": True},
    "olmo2": {"offset": 0.0, "weight_fp32": True},
    "as_torch": {},
}


@pytest.mark.parametrize("variant", sorted(RMS_VARIANTS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_rms_norm_variants(variant, dtype):
    x, w = _randn(7, 300, dtype=dtype), _randn(300, dtype=dtype, seed=1)
    _check("rms_norm", [x, w], {"normalized_shape": [300], "eps": 1e-6, **RMS_VARIANTS[variant]}, dtype)


@pytest.mark.parametrize("variant", ["llama", "as_torch"])
def test_rms_norm_without_weight(variant):
    x = _randn(5, 96, dtype=torch.float16)
    _check("rms_norm", [x], {"normalized_shape": [96], "eps": 1e-5, **RMS_VARIANTS[variant]}, torch.float16)


def test_rms_norm_float32_weight_on_half_input():
    x, w = _randn(3, 64, dtype=torch.float16), _randn(64, dtype=torch.float32, seed=1)
    _check("rms_norm", [x, w], {"normalized_shape": [64], "eps": 1e-6, **RMS_VARIANTS["llama"]}, torch.float16)


def test_rms_norm_of_heads_in_a_merged_projection():
    # qk-norm: [T, H, D] heads of a slice of the QKV output (row stride != H * D)
    x = _merged(5, 4 * 24, torch.float32).unflatten(1, (4, 24))
    w = _randn(24, dtype=torch.float32, seed=1)
    _check("rms_norm", [x, w], {"normalized_shape": [24], "eps": 1e-6, **RMS_VARIANTS["gemma"]}, torch.float32)


def test_rms_norm_wider_than_one_block():
    x, w = _randn(3, 9000, dtype=torch.float32), _randn(9000, dtype=torch.float32, seed=1)
    _check("rms_norm", [x, w], {"normalized_shape": [9000], "eps": 1e-6, **RMS_VARIANTS["llama"]}, torch.float32)


@pytest.mark.parametrize("variant", ["llama", "gemma"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_fused_add_rms_norm(variant, dtype):
    x, res = _randn(5, 200, dtype=dtype), _randn(5, 200, dtype=dtype, seed=2)
    w = _randn(200, dtype=dtype, seed=1)
    _check("fused_add_rms_norm", [x, res, w], {"eps": 1e-6, **RMS_VARIANTS[variant]}, dtype)


def test_fused_add_rms_norm_strided_without_weight():
    x, res = _merged(3, 40, torch.float16), _randn(3, 40, dtype=torch.float16, seed=2)
    _check("fused_add_rms_norm", [x, res], {"eps": 1e-6, **RMS_VARIANTS["llama"]}, torch.float16)


def test_fused_add_rms_norm_wider_than_one_block():
    x, res = _randn(2, 8500, dtype=torch.float32), _randn(2, 8500, dtype=torch.float32, seed=2)
    w = _randn(8500, dtype=torch.float32, seed=1)
    _check("fused_add_rms_norm", [x, res, w], {"eps": 1e-6, **RMS_VARIANTS["olmo2"]}, torch.float32)


@pytest.mark.parametrize(("has_weight", "has_bias"), [(True, True), (True, False), (False, False)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_layer_norm(has_weight, has_bias, dtype):
    x = _merged(7, 100, dtype)
    wb = [_randn(100, dtype=dtype, seed=1)] * has_weight + [_randn(100, dtype=dtype, seed=2)] * has_bias
    attrs = {"normalized_shape": [100], "eps": 1e-5, "has_weight": has_weight, "has_bias": has_bias}
    _check("layer_norm", [x, *wb], attrs, dtype)


def test_layer_norm_wider_than_one_block():
    x = _randn(2, 8200, dtype=torch.float32) + 3.0
    w, b = _randn(8200, dtype=torch.float32, seed=1), _randn(8200, dtype=torch.float32, seed=2)
    _check("layer_norm", [x, w, b], {"normalized_shape": [8200], "eps": 1e-5}, torch.float32)


def test_zero_rows_launch_nothing():
    x = _randn(0, 64, dtype=torch.float32)
    out = torch.empty_like(x)
    LAUNCHERS["rms_norm"]([out], [x], {"normalized_shape": [64], "eps": 1e-6})


# -- on a GPU, in bfloat16 at model sizes ------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("t", [1, 7, 2048])
@pytest.mark.parametrize("hidden", [4096, 5120, 16384])
def test_gpu_bf16_norms(t, hidden):
    bf = torch.bfloat16
    x, res, w = _randn(t, hidden, dtype=bf), _randn(t, hidden, dtype=bf, seed=2), _randn(hidden, dtype=bf, seed=1)
    for variant in ("llama", "gemma", "as_torch"):
        _check("rms_norm", [x, w], {"normalized_shape": [hidden], "eps": 1e-6, **RMS_VARIANTS[variant]}, bf)
    for variant in ("llama", "gemma"):
        _check("fused_add_rms_norm", [x, res, w], {"eps": 1e-6, **RMS_VARIANTS[variant]}, bf)
    _check("layer_norm", [x, w, res[0]], {"normalized_shape": [hidden], "eps": 1e-5}, bf)


@pytest.mark.gpu
def test_gpu_bf16_qk_norm_of_merged_heads():
    bf = torch.bfloat16
    qkv = _randn(2048, 6144, dtype=bf)
    q = qkv[:, :4096].unflatten(1, (32, 128))
    w = _randn(128, dtype=bf, seed=1)
    _check("rms_norm", [q, w], {"normalized_shape": [128], "eps": 1e-6, **RMS_VARIANTS["llama"]}, bf)
