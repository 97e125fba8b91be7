"""The cuda target's activation quantization (quant_act.py) and products in the quantized domain
(scaled_mm.py) against the reference ops: in Triton's interpreter (float32 / float16, small
shapes) and, marked gpu, compiled in bfloat16 at model shapes (cuBLAS's _scaled_mm too)."""

from __future__ import annotations

import pytest
import torch

from kiln.ir.ops import OPS
from kiln.ir.ops.quant import QMAX, dequant_fp8, pack_int, quant_act
from kiln.kernels.triton_kernels.quant_act import LAUNCHERS as ACT_LAUNCHERS
from kiln.kernels.triton_kernels.quant_act import quant_codes, quant_values
from kiln.kernels.triton_kernels.quant_linear import LAUNCHERS
from kiln.kernels.triton_kernels.scaled_mm import ScaledConfig, covers, scaled_linear

REF = OPS["quantized_linear"].impl
SMALL = ScaledConfig(block_m=16, block_n=16, block_k=32, num_warps=4, num_stages=2)


def _x(m: int, k: int, dtype: torch.dtype, device: str = "cpu") -> torch.Tensor:
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(m)) * 0.7
    x[0, :5] = torch.tensor([0.5, -0.5, 1.5, 2.5, -2.5]) * x[0].abs().max() / 63.5  # ties for int8 rounding
    if m > 2:
        x[2] = 0  # an all-zero row
    return x.to(dtype).to(device)


@pytest.mark.parametrize("fmt", ["int8", "float8_e4m3fn"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_quant_values_are_quant_act_bit_for_bit(fmt, dtype):
    x = _x(5, 300, dtype)
    torch.testing.assert_close(quant_values(x, fmt), quant_act(x, format=fmt), rtol=0, atol=0)
    y = torch.empty(5, 300, dtype=dtype)
    ACT_LAUNCHERS["quant_act"]([y], [x], {"format": fmt})
    torch.testing.assert_close(y, quant_act(x, format=fmt), rtol=0, atol=0)


@pytest.mark.parametrize("fmt", ["int8", "float8_e4m3fn"])
def test_quant_codes_times_their_scales_are_quant_act(fmt):
    x = _x(4, 200, torch.float32)
    q, s = quant_codes(x, fmt)
    assert q.dtype == {"int8": torch.int8, "float8_e4m3fn": torch.float8_e4m3fn}[fmt] and s.shape == (4,)
    torch.testing.assert_close(s, (x.abs().amax(-1) / QMAX[fmt]).where(x.abs().amax(-1) > 0, torch.ones(4)))
    torch.testing.assert_close(q.float() * s[:, None], quant_act(x, format=fmt), rtol=0, atol=0)


def test_quant_values_rejects_an_unknown_format():
    with pytest.raises(ValueError, match="int4"):
        quant_values(torch.zeros(2, 8), "int4")


def _int8_weight(n: int, k: int, device: str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(5)
    q = torch.randint(1, 256, (n, k), generator=g)
    return pack_int(q, 8).to(device), ((torch.rand(n, 1, generator=g) + 0.5) * 4e-4).to(device)


def _fp8_weight(n: int, k: int, block_n: int, block_k: int, device: str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(6)
    w = (torch.randn(n, k, generator=g) * 100).clamp(-448, 448).to(torch.float8_e4m3fn)
    return w.to(device), ((torch.rand(-(-n // block_n), -(-k // block_k), generator=g) + 0.5) * 5e-4).to(device)


def _int8_attrs(k: int, dtype: str) -> dict:
    return dict(format="int", bits=8, group_size=k, act="int8", dtype=dtype, has_zeros=False, has_g_idx=False,
                has_bias=True)


def _fp8_attrs(block_n: int, block_k: int, dtype: str) -> dict:
    return dict(format="fp8", block_n=block_n, block_k=block_k, act="float8_e4m3fn", dtype=dtype, has_zeros=False,
                has_g_idx=False, has_bias=True)


def test_covers_per_channel_int8_codes_and_fp8_weights_with_fp8_activations():
    assert covers(_int8_attrs(64, "float32"), 64)
    assert not covers({**_int8_attrs(64, "float32"), "group_size": 32}, 64)
    assert not covers({**_int8_attrs(64, "float32"), "has_zeros": True}, 64)
    assert covers(_fp8_attrs(128, 128, "float32"), 512)
    assert not covers(_fp8_attrs(128, 24, "float32"), 512)
    assert not covers({**_fp8_attrs(1, 64, "float32"), "act": "int8"}, 64)


@pytest.mark.parametrize("m", [5, 37])
def test_int8_product_matches_the_reference(m):
    n, k = 40, 96
    w, sw = _int8_weight(n, k)
    bias = torch.randn(n) * 0.1
    x = _x(m, k, torch.float32)
    q, sx = quant_codes(x, "int8")
    y = torch.empty(m, n)
    scaled_linear(y, q, sx, w, sw, bias, 1, k, SMALL)
    torch.testing.assert_close(y, REF(x, w, sw, bias, **_int8_attrs(k, "float32")), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("block_n,block_k", [(1, None), (16, 32), (24, 64)])
def test_fp8_product_matches_the_reference(block_n, block_k):
    m, n, k = 21, 40, 128
    block_k = block_k or k
    w, sw = _fp8_weight(n, k, block_n, block_k)
    bias = torch.randn(n) * 0.1
    x = _x(m, k, torch.float32)
    q, sx = quant_codes(x, "float8_e4m3fn")
    y = torch.empty(m, n)
    scaled_linear(y, q, sx, w, sw, bias, block_n, block_k, SMALL)
    want = REF(x, w, sw, bias, **_fp8_attrs(block_n, block_k, "float32"))
    torch.testing.assert_close(y, want, rtol=1e-5, atol=1e-5)


def test_scaled_linear_rejects_mismatched_operands():
    w, sw = _int8_weight(8, 32)
    q, sx = quant_codes(torch.randn(6, 16), "int8")
    with pytest.raises(ValueError, match="do not fit"):
        scaled_linear(torch.empty(6, 8), q, sx, w, sw, None, 1, 32)


@pytest.mark.parametrize("act", ["int8", "float8_e4m3fn"])
@pytest.mark.parametrize("m", [1, 6])
def test_the_launcher_takes_quantized_activations_on_both_paths(act, m):
    k, n = 64, 24
    if act == "int8":
        (w, sw), attrs = _int8_weight(n, k), _int8_attrs(k, "float32")
    else:
        (w, sw), attrs = _fp8_weight(n, k, 1, k), _fp8_attrs(1, k, "float32")
    x = torch.randn(2, m, k, generator=torch.Generator().manual_seed(m))
    bias = torch.randn(n) * 0.1
    y = torch.empty(2, m, n)
    LAUNCHERS["quantized_linear"]([y], [x, w, sw, bias], attrs)
    torch.testing.assert_close(y, REF(x, w, sw, bias, **attrs), rtol=1e-5, atol=1e-5)


@pytest.mark.gpu
@pytest.mark.parametrize("m", [1, 3, 5, 64, 300])
@pytest.mark.parametrize("weights", ["int8", "fp8 channel", "fp8 blocks"])
@pytest.mark.parametrize("provider", ["triton", "cublas"])
def test_bfloat16_on_the_gpu(weights, m, provider):
    n, k = 4096, 2048
    if weights == "int8":
        (w, sw), attrs = _int8_weight(n, k, "cuda"), _int8_attrs(k, "bfloat16")
    else:
        block_n, block_k = (1, k) if weights == "fp8 channel" else (128, 128)
        (w, sw), attrs = _fp8_weight(n, k, block_n, block_k, "cuda"), _fp8_attrs(block_n, block_k, "bfloat16")
    x = _x(m, k, torch.bfloat16, "cuda")
    bias = (torch.randn(n, device="cuda") * 0.1).to(torch.bfloat16)
    y = torch.empty(m, n, dtype=torch.bfloat16, device="cuda")
    if m > 4:
        q, sx = quant_codes(x, attrs["act"])
        blocks = (attrs.get("block_n", 1), attrs.get("block_k", k))
        scaled_linear(y, q, sx, w, sw, bias, *blocks, ScaledConfig(provider=provider) if m > 64 else None)
    else:
        LAUNCHERS["quantized_linear"]([y], [x, w, sw, bias], attrs)
    # the reference on the CPU: torch's CUDA division may differ from IEEE's in the last place,
    # which moves an fp8 rounding at a boundary by a whole step
    xr = quant_act(x.cpu(), format=attrs["act"]).float()
    wr = (dequant_fp8(w.cpu(), sw.cpu(), block_n=attrs["block_n"], block_k=attrs["block_k"], dtype="float32")
          if attrs["format"] == "fp8" else (w.cpu().float() - 128) * sw.cpu())
    want = xr @ wr.T + bias.cpu().float()
    torch.testing.assert_close(y.cpu().float(), want, rtol=2e-2, atol=2e-2)
