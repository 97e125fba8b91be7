"""TVM rope (neox, interleaved, partial rotary) and kv_cache_write against their ops' torch
references: odd token counts, q/k as strided views of a merged QKV projection, padded rows
(slot -1) that must write nothing."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("tvm")

from test_tvm_norms import _randn, check, run_with  # noqa: E402

from kiln.ir.types import TensorType  # noqa: E402
from kiln.kernels.tvm_kernels import OpInfo, build  # noqa: E402


def _qkv(t: int, h: int, d: int) -> torch.Tensor:
    """The k part [T, H, D] of a merged [T, (4 + 2) * H * D]-wide projection: strided."""
    return _randn(t, 6 * h * d, seed=t)[:, 4 * h * d: 5 * h * d].view(t, h, d)


@pytest.mark.parametrize("t", [1, 7, 33])
@pytest.mark.parametrize("style", ["neox", "interleaved"])
@pytest.mark.parametrize("rotary", [32, 16])
@pytest.mark.parametrize("config", [None, {"ser": 0}])  # decode-sized calls serial by default; ser=0: TVM's pool
def test_rope(style, rotary, t, config):
    x = _qkv(t, 3, 32)
    pos = torch.randint(0, 64, (t,), generator=torch.Generator().manual_seed(1))
    cos, sin = _randn(64, rotary, seed=2), _randn(64, rotary, seed=3)
    check("rope", [x, pos, cos, sin], {"style": style, "rotary_dim": rotary}, config=config)


def test_longrope_stays_with_the_reference():
    ty = TensorType("float32", ("T", 2, 16))
    tab = TensorType("float32", (64, 16))
    i64 = TensorType("int64", ("T",))
    info = OpInfo("rope", (ty, i64, tab, tab, tab, tab, TensorType("int64", ("S",)), TensorType("int64", ("S+1",))),
                  (ty,), {"style": "neox", "rotary_dim": 16, "long_after": 32})
    assert build(info) is None


@pytest.mark.parametrize("t", [1, 7, 33])
@pytest.mark.parametrize("config", [{}, {"ser": 0}])
def test_kv_cache_write(t, config):
    nb, bs, hkv, d, dv = 10, 4, 2, 16, 8
    k, v = _qkv(t, hkv, d), _randn(t, hkv, dv, seed=5)
    slots = torch.randperm(nb * bs, generator=torch.Generator().manual_seed(t))[:t]
    slots[::3] = -1  # padded rows
    caches = [_randn(nb, bs, hkv, d, seed=7), _randn(nb, bs, hkv, dv, seed=8)]
    want = [c.clone() for c in caches]
    from kiln.ir.ops import OPS

    OPS["kv_cache_write"].impl(k, v, *want, slots)
    info = OpInfo("kv_cache_write", (TensorType("float32", ("T", hkv, d)), TensorType("float32", ("T", hkv, dv)),
                                     TensorType("float32", ("NB", "BS", hkv, d)),
                                     TensorType("float32", ("NB", "BS", hkv, dv)), TensorType("int64", ("T",))),
                  (TensorType("float32", ("NB", "BS", hkv, d)), TensorType("float32", ("NB", "BS", hkv, dv))), {})
    run_with(build(info, config), caches, [k, v, *caches, slots], {})
    for got, ref in zip(caches, want, strict=True):
        assert torch.equal(got, ref)


@pytest.mark.parametrize("t", [1, 7, 33])
@pytest.mark.parametrize("style,rotary", [("neox", 32), ("interleaved", 16)])
@pytest.mark.parametrize("config", [{}, {"ser": 0}])  # decode-sized calls serial by default; ser=0: TVM's pool
def test_rope_kv_cache_write(style, rotary, t, config):
    from kiln.ir.ops import OPS

    nb, bs, hq, hkv, d, dv = 10, 4, 4, 2, 32, 16
    qkv = _randn(t, (hq + 2 * hkv) * d, seed=t)
    q = qkv[:, : hq * d].view(t, hq, d)  # strided views of the merged projection
    k = qkv[:, hq * d: (hq + hkv) * d].view(t, hkv, d)
    v = _randn(t, hkv, dv, seed=4)
    pos = torch.randint(0, 64, (t,), generator=torch.Generator().manual_seed(1))
    cos, sin = _randn(64, rotary, seed=2), _randn(64, rotary, seed=3)
    slots = torch.randperm(nb * bs, generator=torch.Generator().manual_seed(t))[:t]
    slots[1::3] = -1
    caches = [_randn(nb, bs, hkv, d, seed=7), _randn(nb, bs, hkv, dv, seed=8)]
    want_caches = [c.clone() for c in caches]
    attrs = {"style": style, "rotary_dim": rotary}
    want_q = OPS["rope_kv_cache_write"].impl(q, k, v, pos, cos, sin, *want_caches, slots, **attrs)[2]
    f32 = "float32"
    cache_types = (TensorType(f32, ("NB", "BS", hkv, d)), TensorType(f32, ("NB", "BS", hkv, dv)))
    info = OpInfo("rope_kv_cache_write",
                  (TensorType(f32, ("T", hq, d)), TensorType(f32, ("T", hkv, d)), TensorType(f32, ("T", hkv, dv)),
                   TensorType("int64", ("T",)), TensorType(f32, (64, rotary)), TensorType(f32, (64, rotary)),
                   *cache_types, TensorType("int64", ("T",))),
                  (*cache_types, TensorType(f32, ("T", hq, d))), attrs)
    q_rot = torch.full_like(want_q, float("nan"))
    run_with(build(info, config), [*caches, q_rot], [q, k, v, pos, cos, sin, *caches, slots], attrs)
    torch.testing.assert_close(q_rot, want_q, atol=1e-6, rtol=1e-6)
    for got, ref in zip(caches, want_caches, strict=True):
        torch.testing.assert_close(got, ref, atol=1e-6, rtol=1e-6)
