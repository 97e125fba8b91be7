"""TVM linear against the op's torch reference: every weight layout, with and without bias,
batch-1 GEMV and odd token counts (the narrow path's row tiles plus a tail; at 70 rows the
packed wide path too, leaving rows to the narrow one), strided inputs, widths that no
vector or block size divides; the panels layout's row tiles and K splits, serial and in
TVM's pool."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("tvm")

from test_tvm_norms import _merged, _randn, check  # noqa: E402


def _weight(layout: str, n: int, k: int, nb: int = 32, dtype=torch.float32) -> torch.Tensor:
    """A [n, k] weight in `layout` (panels of nb columns: what weight-panels folds)."""
    w = _randn(n, k, seed=1, dtype=dtype)
    if layout == "panels":
        return w.view(n // nb, nb, k).transpose(1, 2).contiguous()
    return w if layout == "out_in" else w.t().contiguous()


@pytest.mark.parametrize("t", [1, 7, 33, 70])
@pytest.mark.parametrize("layout", ["out_in", "in_out", "panels"])
@pytest.mark.parametrize("bias", [False, True])
def test_linear(layout, bias, t):
    k, n = 64, 96
    args = [_merged(t, k), _weight(layout, n, k), *([_randn(n, seed=2)] if bias else [])]
    check("linear", args, {} if layout == "out_in" else {"weight_layout": layout}, static=(1, 2))


@pytest.mark.parametrize("config", [{}, {"ser": 0}, {"mr": 6, "mt": 2, "ku": 2, "ser": 0}, {"mr": 4, "mt": 1, "ku": 4},
                                    {"mr": 12, "mt": 8}])
@pytest.mark.parametrize("nb", [8, 16, 32])
def test_linear_panels_tiles(nb, config):
    """Panels of 8-32 columns, K = 36 (no vector divides it) or 40 (ku=4), each row count split
    into mr-row tiles, mt-row tiles and single rows with ku partial sums; in TVM's pool (ser=0)
    and on the calling thread: the same as the reference."""
    k, n = (40 if config.get("ku") == 4 else 36), 96
    w, b = _weight("panels", n, k, nb), _randn(n, seed=2)
    for t in (1, 2, 5, 13, 29):
        check("linear", [_merged(t, k), w, b], {"weight_layout": "panels"}, static=(1, 2), config=config or None)


def test_linear_panels_16_bit_and_rank3_input():
    k, n = 48, 64
    x, w = _randn(2, 3, k, dtype=torch.bfloat16), _weight("panels", n, k, 16, dtype=torch.bfloat16)
    check("linear", [x, w, _randn(n, seed=2, dtype=torch.bfloat16)], {"weight_layout": "panels"}, static=(1, 2))


@pytest.mark.parametrize("layout", ["out_in", "in_out"])
def test_linear_odd_widths_and_rank3_input(layout):
    k, n = 36, 10
    w = _randn(n, k, seed=1) if layout == "out_in" else _randn(k, n, seed=1)
    attrs = {} if layout == "out_in" else {"weight_layout": layout}
    check("linear", [_randn(5, k), w, _randn(n, seed=2)], attrs, static=(1, 2))
    check("linear", [_randn(2, 3, k), w], attrs, static=(1,))


@pytest.mark.parametrize("layout", ["out_in", "in_out"])
@pytest.mark.parametrize("config", [{"mr": 6, "pm": 8, "ku": 2}, {"mr": 4, "nv": 16, "jt": 2, "pm": 4, "mt": 2, "nb": 8},
                                    {"nb1": 16, "nv": 16, "jt": 2, "ku": 2}, {"nv": 8, "par": 4, "pm": 4}])
def test_linear_wide_path_configs(layout, config):
    """Tuned schedules: other register tiles, panels per task and row thresholds, each row count
    split differently between the wide tiles, the narrow tiles and the one-row tail; 12 tasks
    merged in pairs into 6 parallel iterations (par=4)."""
    from kiln.codegen.cpu.build import compile_kernels
    from kiln.ir.ops import OPS
    from kiln.ir.types import TensorType
    from kiln.kernels.tvm_kernels import OpInfo, build
    from kiln.kernels.tvm_provider import make_launcher

    k, n = 64, 96
    w = _randn(n, k, seed=1) if layout == "out_in" else _randn(k, n, seed=1)
    info = OpInfo("linear", (TensorType("float32", ("T", k)), TensorType("float32", tuple(w.shape))),
                  (TensorType("float32", ("T", n)),), {"weight_layout": layout})
    kernel = build(info, config)
    launch = make_launcher(compile_kernels([kernel])[kernel.name], kernel.table())
    for t in (1, 3, 7, 29):
        x = _merged(t, k)
        y = torch.full((t, n), float("nan"))
        launch([y], [x, w], {})
        torch.testing.assert_close(y, OPS["linear"].impl(x, w, weight_layout=layout), atol=1e-5, rtol=1e-5)


def test_torch_fallback_reads_panels():
    """The cpu target's torch launcher (an op no TVM kernel covers) takes a panels weight too."""
    from kiln.kernels import torch_provider

    k, n = 24, 48
    x, w, b = _randn(5, k), _randn(n, k, seed=1), _randn(n, seed=2)
    y = torch.full((5, n), float("nan"))
    torch_provider.launcher("linear")([y], [x, _weight("panels", n, k, 16), b], {"weight_layout": "panels"})
    torch.testing.assert_close(y, torch.nn.functional.linear(x, w, b))
