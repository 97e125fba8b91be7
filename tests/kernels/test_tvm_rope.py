"""TVM rope (neox, interleaved, partial rotary) and kv_cache_write against their ops' torch
references: odd token counts, q/k as strided views of a merged QKV projection, padded rows
(slot -1) that must write nothing."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("tvm")

from test_tvm_norms import _randn, check  # noqa: E402

from kiln.ir.types import TensorType  # noqa: E402
from kiln.kernels.tvm_kernels import OpInfo, build  # noqa: E402


def _qkv(t: int, h: int, d: int) -> torch.Tensor:
    """The k part [T, H, D] of a merged [T, (4 + 2) * H * D]-wide projection: strided."""
    return _randn(t, 6 * h * d, seed=t)[:, 4 * h * d: 5 * h * d].view(t, h, d)


@pytest.mark.parametrize("t", [1, 7, 33])
@pytest.mark.parametrize("style", ["neox", "interleaved"])
@pytest.mark.parametrize("rotary", [32, 16])
def test_rope(style, rotary, t):
    x = _qkv(t, 3, 32)
    pos = torch.randint(0, 64, (t,), generator=torch.Generator().manual_seed(1))
    cos, sin = _randn(64, rotary, seed=2), _randn(64, rotary, seed=3)
    check("rope", [x, pos, cos, sin], {"style": style, "rotary_dim": rotary})


def test_longrope_stays_with_the_reference():
    ty = TensorType("float32", ("T", 2, 16))
    tab = TensorType("float32", (64, 16))
    i64 = TensorType("int64", ("T",))
    info = OpInfo("rope", (ty, i64, tab, tab, tab, tab, TensorType("int64", ("S",)), TensorType("int64", ("S+1",))),
                  (ty,), {"style": "neox", "rotary_dim": 16, "long_after": 32})
    assert build(info) is None


@pytest.mark.parametrize("t", [1, 7, 33])
def test_kv_cache_write(t):
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
    from kiln.codegen.cpu.build import launcher_of

    launcher_of(build(info))(caches, [k, v, *caches, slots], {})
    for got, ref in zip(caches, want, strict=True):
        assert torch.equal(got, ref)
