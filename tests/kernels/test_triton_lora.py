"""The Triton `lora` (shrink and expand, one token's slot per program) against the op's torch
reference: mixed slots, tokens without an adapter (-1), a rank padded by zero rows, strided x,
with and without base (the linear's result the update is added to; float32 and float16 in
Triton's interpreter without a GPU; bfloat16 at model sizes on one); and the cuda lowering
running it as a kernel, not a fallback."""

from __future__ import annotations

import pytest
import torch

from kiln.ir.graph import Graph, input_node
from kiln.ir.ops import OPS
from kiln.ir.types import TensorType
from kiln.kernels.triton_kernels.lora import K_SPLIT, LAUNCHERS
from kiln.passes.base import make

DEV = "cuda" if torch.cuda.is_available() else "cpu"
# The kernel keeps the rank vector and the update in float32 where the reference rounds them to x's dtype.
TOL = {torch.float32: 1e-4, torch.float16: 4e-3, torch.bfloat16: 3e-2}


def operands(t: int, k: int, n: int, r: int, nl: int, dtype: torch.dtype, rank: int | None = None,
             seed: int = 0) -> tuple[torch.Tensor, ...]:
    """x [T, K], a [NL, R, K], b [NL, N, R] (rows and columns past `rank` zero, as a slot of a
    smaller adapter) and index [T] int32 mixing every slot and -1."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(t, k, generator=g)
    a = torch.randn(nl, r, k, generator=g) / k**0.5
    b = torch.randn(nl, n, r, generator=g) / r**0.5
    if rank is not None:
        a[:, rank:] = 0
        b[:, :, rank:] = 0
    index = torch.randint(-1, nl, (t,), generator=g, dtype=torch.int32)
    index[0] = nl - 1 if t > 1 else index[0]
    return tuple(v.to(device=DEV, dtype=dtype) for v in (x, a, b)) + (index.to(DEV),)


def check(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, index: torch.Tensor,
          base: torch.Tensor | None = None) -> None:
    args = [x, a, b, index, *([] if base is None else [base])]
    want = OPS["lora"].impl(*args)
    y = torch.full_like(want, float("nan"))
    LAUNCHERS["lora"]([y], args, {})
    torch.testing.assert_close(y, want, atol=TOL[x.dtype], rtol=TOL[x.dtype])
    assert (y[index < 0] == (0 if base is None else base[index < 0])).all()  # -1: the base row exactly


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize(("t", "k", "n", "r", "nl"), [
    (1, 64, 48, 8, 2),  # one token
    (37, 40, 24, 8, 3),  # K and N past their tiles
    (37, K_SPLIT + 72, 20, 12, 4),  # K over two shrink programs; R padded to 16 by masks
])
def test_lora_matches_the_reference(dtype, t, k, n, r, nl):
    check(*operands(t, k, n, r, nl, dtype))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize(("t", "k", "n", "r", "nl"), [(1, 64, 48, 8, 2), (37, K_SPLIT + 72, 300, 12, 4)])
def test_base_is_added(dtype, t, k, n, r, nl):
    x, a, b, index = operands(t, k, n, r, nl, dtype)
    index[1::3] = -1
    check(x, a, b, index, base=torch.randn(t, n, device=DEV).to(dtype))
    wide = torch.randn(t, n + 24, device=DEV).to(dtype)[:, 8: 8 + n]  # a slice of a merged projection's result
    check(x, a, b, index, base=wide)
    check(x, a, b, index, base=wide.t().contiguous().t())  # column-major base: a stride along N


def test_rank_padding_and_tokens_without_adapters():
    x, a, b, index = operands(37, 64, 32, 16, 3, torch.float32, rank=5)
    index[::3] = -1
    check(x, a, b, index)
    check(x, a, b, torch.full_like(index, -1))


def test_an_index_past_the_slots_reads_nothing():
    x, a, b, index = operands(37, 64, 32, 8, 3, torch.float32)
    index[1::4] = 3
    y = torch.full((37, 32), float("nan"), device=x.device)
    LAUNCHERS["lora"]([y], [x, a, b, index], {})
    torch.testing.assert_close(y, OPS["lora"].impl(x, a, b, torch.where(index < 3, index, -1)), atol=1e-4, rtol=1e-4)


def test_strided_x_and_y():
    x, a, b, index = operands(37, 48, 40, 8, 3, torch.float32)
    wide = torch.randn(37, 48 + 17, device=DEV)[:, 5: 5 + 48]  # rows of a merged projection
    check(wide, a, b, index)
    check(x.t().contiguous().t(), a, b, index)  # column-major x: a stride along K
    y = torch.zeros(37, 2 * 40, device=DEV)[:, ::2]
    LAUNCHERS["lora"]([y], [wide, a, b, index], {})
    torch.testing.assert_close(y, OPS["lora"].impl(wide, a, b, index), atol=1e-4, rtol=1e-4)


def test_shapes_are_checked():
    x, a, b, index = operands(3, 16, 8, 4, 2, torch.float32)
    with pytest.raises(ValueError, match="lora"):
        LAUNCHERS["lora"]([torch.empty(3, 8, device=DEV)], [x, a, b, index.long()], {})
    with pytest.raises(ValueError, match="lora"):
        LAUNCHERS["lora"]([torch.empty(3, 8, device=DEV)], [x, a, b[:, :, :2], index], {})
    with pytest.raises(ValueError, match="base"):
        LAUNCHERS["lora"]([torch.empty(3, 8, device=DEV)], [x, a, b, index, torch.empty(3, 7, device=DEV)], {})


def test_the_cuda_lowering_runs_lora_in_triton():
    from kiln.codegen.cuda import lower

    x = input_node("x", TensorType("bfloat16", ("T", 32)))
    a = input_node("lora.q.a", TensorType("bfloat16", ("NL", 8, 32)))
    b = input_node("lora.q.b", TensorType("bfloat16", ("NL", 16, 8)))
    index = input_node("lora_index", TensorType("int32", ("T",)))
    base = input_node("base", TensorType("bfloat16", ("T", 16)))
    for ins in ([x, a, b, index], [x, a, b, index, base]):
        lowered = lower(Graph([], []).with_nodes(ins, [make("lora", ins)]))
        assert [s.kernel for s in lowered.plan.steps] == ["triton:lora"]
        assert lowered.fallbacks == []


@pytest.mark.gpu
@pytest.mark.parametrize("t", [1, 32, 256])
@pytest.mark.parametrize("n", [4096, 14336])
def test_bfloat16_at_model_size(n, t):
    x, a, b, index = operands(t, 4096, n, 16, 8, torch.bfloat16, rank=12)
    check(x, a, b, index)
    check(x, a, b, index, base=torch.randn(t, n, device=DEV, dtype=torch.bfloat16))
