"""TVM linear against the op's torch reference: both weight layouts, with and without bias,
batch-1 GEMV and odd token counts (full row tiles plus a tail), strided inputs, widths that no
vector or block size divides."""

from __future__ import annotations

import pytest

pytest.importorskip("tvm")

from test_tvm_norms import _merged, _randn, check  # noqa: E402


@pytest.mark.parametrize("t", [1, 7, 33])
@pytest.mark.parametrize("layout", ["out_in", "in_out"])
@pytest.mark.parametrize("bias", [False, True])
def test_linear(layout, bias, t):
    k, n = 64, 96
    w = _randn(n, k, seed=1) if layout == "out_in" else _randn(k, n, seed=1)
    args = [_merged(t, k), w, *([_randn(n, seed=2)] if bias else [])]
    check("linear", args, {} if layout == "out_in" else {"weight_layout": layout}, static=(1, 2))


@pytest.mark.parametrize("layout", ["out_in", "in_out"])
def test_linear_odd_widths_and_rank3_input(layout):
    k, n = 36, 10
    w = _randn(n, k, seed=1) if layout == "out_in" else _randn(k, n, seed=1)
    attrs = {} if layout == "out_in" else {"weight_layout": layout}
    check("linear", [_randn(5, k), w, _randn(n, seed=2)], attrs, static=(1, 2))
    check("linear", [_randn(2, 3, k), w], attrs, static=(1,))
