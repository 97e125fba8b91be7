"""The Triton GEMM of the cuda target's `linear` against torch (float32 and float16 in Triton's
interpreter without a GPU; bfloat16 at model sizes on one), and the per-shape, per-bucket choice
between it and cuBLAS that tuning.json makes."""

from __future__ import annotations

import pytest
import torch

from kiln.ir.ops import OPS
from kiln.kernels.triton_kernels.linear import (
    LAUNCHERS,
    GemmConfig,
    gemm,
    make_launcher,
    parse_table,
)

DEV = "cuda" if torch.cuda.is_available() else "cpu"
TOL = {torch.float32: 1e-4, torch.float16: 2e-3, torch.bfloat16: 2e-2}
SMALL = GemmConfig(block_m=16, block_n=16, block_k=32, group_m=2, num_warps=2, num_stages=2)


def _randn(*shape: int, dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g).to(device=DEV, dtype=dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize(("m", "k", "n"), [(1, 40, 24), (5, 64, 33), (37, 72, 50)])
@pytest.mark.parametrize("bias", [False, True])
def test_gemm_matches_the_reference(dtype, m, k, n, bias):
    x, w = _randn(m, k, dtype=dtype), _randn(n, k, dtype=dtype, seed=1) / k**0.5
    b = _randn(n, dtype=dtype, seed=2) if bias else None
    y = torch.full((m, n), float("nan"), dtype=dtype, device=DEV)
    gemm(y, x, w, b, SMALL)
    want = OPS["linear"].impl(x, w, *([b] if bias else []))
    torch.testing.assert_close(y, want, atol=TOL[dtype], rtol=TOL[dtype])


def test_gemm_of_strided_rows_and_an_in_out_weight():
    x = _randn(9, 80, dtype=torch.float32)[:, :48]  # rows of a wider buffer
    w = _randn(48, 20, dtype=torch.float32, seed=3)  # [in, out]
    y = torch.empty(9, 20, device=DEV)
    gemm(y, x, w, None, SMALL, weight_layout="in_out")
    torch.testing.assert_close(y, x @ w, atol=1e-4, rtol=1e-4)


def test_the_table_routes_each_bucket_to_its_provider(monkeypatch):
    from kiln.kernels.triton_kernels import linear as mod

    calls = []
    monkeypatch.setattr(mod, "gemm", lambda y, x, w, b, c, layout: calls.append((x.shape[0], c)) or y.copy_(x @ w.t()))
    table = {"40x24": [{"max_m": 4, "provider": "triton", "config": SMALL.__dict__},
                       {"max_m": 64, "provider": "torch"}]}
    launch = make_launcher(table)
    w = _randn(24, 40, dtype=torch.float32)
    for m in (1, 4, 5, 64, 200):
        x = _randn(m, 40, dtype=torch.float32)
        y = torch.empty(m, 24, device=DEV)
        launch([y], [x, w], {})
        torch.testing.assert_close(y, x @ w.t(), atol=1e-4, rtol=1e-4)
    # buckets of at most 4 rows go to Triton; past the last bound, the last bucket's choice (torch)
    assert [m for m, _ in calls] == [1, 4]
    other = _randn(3, 16, dtype=torch.float32)  # a shape the table lacks: cuBLAS
    y = torch.empty(3, 8, device=DEV)
    launch([y], [other, _randn(8, 16, dtype=torch.float32)], {})
    assert len(calls) == 2


def test_untuned_linear_is_the_vendor_reference():
    x, w, b = _randn(3, 16, dtype=torch.float32), _randn(8, 16, dtype=torch.float32), _randn(8, dtype=torch.float32)
    y = torch.empty(3, 8, device=DEV)
    LAUNCHERS["linear"]([y], [x, w, b], {})
    torch.testing.assert_close(y, OPS["linear"].impl(x, w, b))


@pytest.mark.parametrize("entry", [
    {"4x8": [{"max_m": 1, "provider": "cutlass"}]},
    {"4x8": [{"max_m": 1, "provider": "triton"}]},
    {"4by8": [{"max_m": 1, "provider": "torch"}]},
    {"4x8": [{"provider": "torch"}]},
    {"4x8": [{"max_m": 1, "provider": "triton", "config": {"block_q": 4}}]},
])
def test_a_malformed_table_is_refused(entry):
    with pytest.raises(ValueError, match="tuning.json: linear entry"):
        parse_table(entry)


@pytest.mark.gpu
@pytest.mark.parametrize(("m", "k", "n"), [(1, 4096, 6144), (7, 2048, 16384), (300, 4096, 4096)])
def test_gemm_in_bfloat16_at_model_sizes(m, k, n):
    x, w = _randn(m, k, dtype=torch.bfloat16), _randn(n, k, dtype=torch.bfloat16, seed=1) * 0.02
    for c in (GemmConfig(), GemmConfig(128, 128, 64, 8, 8, 3)):
        y = torch.empty(m, n, dtype=torch.bfloat16, device=DEV)
        gemm(y, x, w, None, c)
        torch.testing.assert_close(y, x @ w.t(), atol=2e-2, rtol=2e-2)
