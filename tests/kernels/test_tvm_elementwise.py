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
