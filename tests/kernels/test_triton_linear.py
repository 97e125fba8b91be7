"""The Triton GEMM and GEMV of the cuda target's `linear` against torch (float32 and float16 in
Triton's interpreter without a GPU; bfloat16 at model sizes on one), and the per-shape,
per-bucket choice between them and cuBLAS that tuning.json makes."""

from __future__ import annotations

import pytest
import torch

from kiln.ir.ops import OPS
from kiln.kernels.triton_kernels.gemv import gemv, supports
from kiln.kernels.triton_kernels.linear import (
    LAUNCHERS,
    GemmConfig,
    GemvConfig,
    gemm,
    make_launcher,
    make_launchers,
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


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize(("m", "k", "n", "config"), [
    (1, 64, 32, GemvConfig(1, 4, 32, 1)),  # even: no masks on the weight
    (1, 72, 30, GemvConfig(1, 4, 32, 1)),  # K and N past the last tile
    (3, 64, 24, GemvConfig(4, 8, 16, 2)),  # a bucket of 4 rows holding 3
    (5, 48, 16, GemvConfig(2, 2, 16, 1)),  # more rows than a program's tile: a grid of row tiles
])
@pytest.mark.parametrize("bias", [False, True])
def test_gemv_matches_the_reference(dtype, m, k, n, config, bias):
    x, w = _randn(m, k, dtype=dtype), _randn(n, k, dtype=dtype, seed=1) / k**0.5
    b = _randn(n, dtype=dtype, seed=2) if bias else None
    y = torch.full((m, n), float("nan"), dtype=dtype, device=DEV)
    gemv(y, x, w, b, config)
    want = OPS["linear"].impl(x, w, *([b] if bias else []))
    torch.testing.assert_close(y, want, atol=TOL[dtype], rtol=TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize(("gate", "approximate"), [("silu_and_mul", None), ("gelu_and_mul", "tanh"),
                                                   ("gelu_and_mul", "none")])
def test_gated_linear_fuses_the_activation_into_the_gemv_and_matches_the_reference(dtype, gate, approximate):
    attrs = {"gate": gate, **({"approximate": approximate} if approximate else {})}
    x, w, b = _randn(3, 80, dtype=dtype), _randn(24, 40, dtype=dtype, seed=1) / 40**0.5, _randn(24, dtype=dtype, seed=2)
    want_y, want_h = OPS["gated_linear"].impl(x, w, b, **attrs)
    gemv_table = {"40x24": [{"max_m": 4, "provider": "gemv", "config": GemvConfig(4, 8, 16, 2).__dict__}]}
    for table in (gemv_table, None):  # fused by the GEMV; the gated kernel into h, then cuBLAS
        y, h = torch.full((3, 24), float("nan"), dtype=dtype, device=DEV), torch.zeros(3, 40, dtype=dtype, device=DEV)
        make_launchers(table)["gated_linear"]([y, h], [x, w, b], attrs)
        torch.testing.assert_close(y, want_y, atol=TOL[dtype], rtol=TOL[dtype])
        if table is None:
            torch.testing.assert_close(h, want_h, atol=TOL[dtype], rtol=TOL[dtype])
        else:
            assert not h.any()  # the fused GEMV never writes the activation


def test_gemv_reads_strided_rows_and_refuses_what_it_cannot_read():
    x = _randn(2, 96, dtype=torch.float32)[:, 16:80]  # rows of a wider buffer
    w = _randn(24, 64, dtype=torch.float32, seed=3)
    y = torch.empty(2, 24, device=DEV)
    assert supports(x, w, y, "out_in")
    gemv(y, x, w, None, GemvConfig(2, 8, 32, 1))
    torch.testing.assert_close(y, x @ w.t(), atol=1e-4, rtol=1e-4)
    assert not supports(x, w, y, "in_out")  # [K, N] weights: the GEMM's or cuBLAS's
    assert not supports(x, w.t().contiguous().t(), y, "out_in")  # columns of stride != 1
    assert not supports(x.t().contiguous().t(), w, y, "out_in")


def test_a_gemv_choice_runs_the_gemv_and_falls_back_where_it_cannot(monkeypatch):
    from kiln.kernels.triton_kernels import linear as mod

    calls = []
    monkeypatch.setattr(mod, "gemv", lambda y, x, w, b, c: calls.append(c) or y.copy_(x @ w.t()))
    config = GemvConfig(1, 4, 32, 1)
    launch = make_launcher({"32x8": [{"max_m": 1, "provider": "gemv", "config": config.__dict__}]})
    w = _randn(8, 32, dtype=torch.float32)
    x, y = _randn(1, 32, dtype=torch.float32), torch.empty(1, 8, device=DEV)
    launch([y], [x, w], {})
    assert calls == [config]
    launch([y], [x, w.t().contiguous()], {"weight_layout": "in_out"})  # cuBLAS
    torch.testing.assert_close(y, x @ w.t(), atol=1e-4, rtol=1e-4)
    assert len(calls) == 1


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
    {"4x8": [{"max_m": 1, "provider": "gemv"}]},
    {"4x8": [{"max_m": 1, "provider": "gemv", "config": {"group_m": 4}}]},
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


@pytest.mark.gpu
@pytest.mark.parametrize(("m", "k", "n"), [(1, 4096, 6144), (3, 2048, 16384), (1, 14336, 4096), (4, 4000, 1000)])
def test_gemv_in_bfloat16_at_model_sizes(m, k, n):
    x, w = _randn(m, k, dtype=torch.bfloat16), _randn(n, k, dtype=torch.bfloat16, seed=1) * 0.02
    for c in (GemvConfig(4, 4, 512, 4), GemvConfig(4, 8, 256, 8), GemvConfig(1, 16, 1024, 8)):
        y = torch.empty(m, n, dtype=torch.bfloat16, device=DEV)
        gemv(y, x, w, None, c)
        torch.testing.assert_close(y, x @ w.t(), atol=2e-2, rtol=2e-2)


@pytest.mark.gpu
@pytest.mark.parametrize(("m", "k", "n"), [(1, 14336, 4096), (3, 8192, 2048)])
def test_gated_gemv_in_bfloat16_at_model_sizes(m, k, n):
    x, w = _randn(m, 2 * k, dtype=torch.bfloat16), _randn(n, k, dtype=torch.bfloat16, seed=1) * 0.02
    want, _ = OPS["gated_linear"].impl(x, w, gate="silu_and_mul")
    y = torch.empty(m, n, dtype=torch.bfloat16, device=DEV)
    gemv(y, x, w, None, GemvConfig(4, 8, 1024, 4), act=0)
    torch.testing.assert_close(y, want, atol=3e-2, rtol=3e-2)
