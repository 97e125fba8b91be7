"""Triton rope, kv_cache_write and rope_kv_cache_write against their ops' torch references
(float32 and float16 in Triton's interpreter without a GPU; bfloat16 at model sizes on one)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from kiln.frontend import import_model
from kiln.ir import run_graph
from kiln.ir.ops import OPS
from kiln.ir.step_inputs import is_cache_input, whole_sequence_inputs
from kiln.kernels.triton_kernels import elementwise, linear, norms
from kiln.kernels.triton_kernels.rope import LAUNCHERS
from kiln.passes import PassManager, get_pass, resolve_pipeline
from kiln.passes.differential import sample_batch

DEV = "cuda" if torch.cuda.is_available() else "cpu"
# Products and sums round where the reference rounds; float32 may contract them into an FMA.
TOL = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 1.6e-2}
BLOCK_SIZE = 4


def _randn(*shape: int, dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g).to(device=DEV, dtype=dtype)


def _tables(rotary_dim: int, style: str, dtype: torch.dtype, positions: int = 64,
            base: float = 10000.0) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin [positions, rotary_dim] as transformers builds them, cast to dtype."""
    inv = 1.0 / base ** (torch.arange(0, rotary_dim, 2, dtype=torch.float32) / rotary_dim)
    f = torch.arange(positions, dtype=torch.float32)[:, None] * inv
    f = torch.cat([f, f], 1) if style == "neox" else f.repeat_interleave(2, 1)
    return f.cos().to(device=DEV, dtype=dtype), f.sin().to(device=DEV, dtype=dtype)


def _qkv(t: int, hq: int, hk: int, d: int, dv: int, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
    """q [T, Hq, D], k [T, Hk, D], v [T, Hk, Dv]: views of one merged projection output."""
    merged = _randn(t, hq * d + hk * d + hk * dv, dtype=dtype, seed=5)
    q = merged[:, : hq * d].unflatten(1, (hq, d))
    k = merged[:, hq * d : (hq + hk) * d].unflatten(1, (hk, d))
    v = merged[:, (hq + hk) * d :].unflatten(1, (hk, dv))
    return q, k, v


def _positions(t: int) -> torch.Tensor:
    return torch.tensor([0, 1, 2, 3, 4, 0, 1, 2, 9, 33, 17, 5, 6][:t], device=DEV)


def _slots(t: int, nb: int) -> torch.Tensor:
    """Distinct slots of a shuffled block table with padded rows (-1) among them."""
    g = torch.Generator().manual_seed(1)
    s = torch.randperm(nb * BLOCK_SIZE, generator=g)[:t]
    s[1::3] = -1
    return s.to(DEV)


def _check_rope(args: list, attrs: dict, dtype: torch.dtype) -> None:
    want = OPS["rope"].impl(*args, **attrs)
    out = torch.full_like(want, float("nan"))
    LAUNCHERS["rope"]([out], args, attrs)
    assert out.dtype == want.dtype
    torch.testing.assert_close(out, want, atol=TOL[dtype], rtol=TOL[dtype])


ROPE_CASES = {
    # name: (style, D, rotary_dim)
    "neox_full": ("neox", 16, 16),
    "neox_partial": ("neox", 20, 8),  # pass-through of 12 features (not a power of two)
    "interleaved_full": ("interleaved", 16, 16),
    "interleaved_partial": ("interleaved", 24, 12),
}


@pytest.mark.parametrize("case", sorted(ROPE_CASES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_rope(case, dtype):
    style, d, r = ROPE_CASES[case]
    q, _, _ = _qkv(7, 3, 1, d, d, dtype)
    cos, sin = _tables(r, style, dtype)
    _check_rope([q, _positions(7), cos, sin], {"style": style, "rotary_dim": r}, dtype)


def test_rope_of_half_input_with_float32_tables_promotes():
    q, _, _ = _qkv(5, 2, 1, 16, 16, torch.float16)
    cos, sin = _tables(16, "neox", torch.float32)
    _check_rope([q, _positions(5), cos, sin], {"style": "neox", "rotary_dim": 16}, torch.float32)


def test_longrope_picks_the_long_tables_per_sequence():
    # three sequences: 3 tokens (whole length 3), 4 tokens (whole length 10: past long_after),
    # 2 tokens (length 2), then two padded rows
    q, _, _ = _qkv(11, 2, 1, 16, 16, torch.float32)
    cos, sin = _tables(16, "neox", torch.float32)
    cos_long, sin_long = _tables(16, "neox", torch.float32, base=500.0)
    total_lens = torch.tensor([3, 10, 2], device=DEV, dtype=torch.int32)
    cu = torch.tensor([0, 3, 7, 9], device=DEV, dtype=torch.int32)
    attrs = {"style": "neox", "rotary_dim": 16, "long_after": 5}
    args = [q, _positions(11), cos, sin, cos_long, sin_long, total_lens, cu]
    _check_rope(args, attrs, torch.float32)
    _check_rope([*args[:6], torch.tensor([3, 10, 9], device=DEV, dtype=torch.int32), cu], attrs, torch.float32)


def test_rope_rejects_tables_of_another_width():
    q, _, _ = _qkv(2, 1, 1, 16, 16, torch.float32)
    cos, sin = _tables(8, "neox", torch.float32)
    with pytest.raises(ValueError, match="rotary_dim=16"):
        LAUNCHERS["rope"]([torch.empty_like(q)], [q, _positions(2), cos, sin], {"style": "neox", "rotary_dim": 16})


def _caches(nb: int, hk: int, d: int, dv: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    return (_randn(nb, BLOCK_SIZE, hk, d, dtype=dtype, seed=7), _randn(nb, BLOCK_SIZE, hk, dv, dtype=dtype, seed=8))


def _check_cache_write(name: str, args: list, cache_at: int, attrs: dict, dtype: torch.dtype) -> None:
    """The op's reference on copies of the caches against the launcher writing the caches."""
    ref_args = [a.clone() if i in (cache_at, cache_at + 1) else a for i, a in enumerate(args)]
    want = OPS[name].impl(*ref_args, **attrs)
    kc, vc = args[cache_at], args[cache_at + 1]
    outs = [kc, vc] + [torch.full_like(w, float("nan")) for w in want[2:]]
    LAUNCHERS[name](outs, args, attrs)
    for got, ref in zip(outs, want, strict=True):
        assert got.dtype == ref.dtype
        torch.testing.assert_close(got, ref, atol=TOL[dtype], rtol=TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_kv_cache_write_skips_padded_rows(dtype):
    _, k, v = _qkv(7, 2, 2, 8, 6, dtype)  # strided views, v narrower than k
    kc, vc = _caches(3, 2, 8, 6, dtype)
    _check_cache_write("kv_cache_write", [k, v, kc, vc, _slots(7, 3)], 2, {}, dtype)


def test_kv_cache_write_casts_to_the_cache_dtype():
    _, k, v = _qkv(5, 1, 2, 8, 8, torch.float32)
    kc, vc = _caches(2, 2, 8, 8, torch.float16)
    _check_cache_write("kv_cache_write", [k, v, kc, vc, _slots(5, 2)], 2, {}, torch.float16)


FUSED_CASES = {
    # name: (style, Hq, Hk, D, Dv, rotary_dim)
    "llama_gqa": ("neox", 4, 2, 16, 16, 16),
    "phi_partial": ("neox", 2, 2, 20, 20, 8),
    "interleaved_partial_narrow_v": ("interleaved", 3, 1, 16, 12, 8),
}


@pytest.mark.parametrize("case", sorted(FUSED_CASES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_rope_kv_cache_write(case, dtype):
    style, hq, hk, d, dv, r = FUSED_CASES[case]
    q, k, v = _qkv(7, hq, hk, d, dv, dtype)
    cos, sin = _tables(r, style, dtype)
    kc, vc = _caches(3, hk, d, dv, dtype)
    args = [q, k, v, _positions(7), cos, sin, kc, vc, _slots(7, 3)]
    _check_cache_write("rope_kv_cache_write", args, 6, {"style": style, "rotary_dim": r}, dtype)


def test_rope_kv_cache_write_with_float32_tables_into_half_caches():
    q, k, v = _qkv(5, 2, 1, 16, 16, torch.float16)
    cos, sin = _tables(16, "neox", torch.float32)
    kc, vc = _caches(2, 1, 16, 16, torch.float16)
    args = [q, k, v, _positions(5), cos, sin, kc, vc, _slots(5, 2)]
    _check_cache_write("rope_kv_cache_write", args, 6, {"style": "neox", "rotary_dim": 16}, torch.float16)


# -- on a GPU, in bfloat16 at model sizes ------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("t", [1, 7, 2048])
@pytest.mark.parametrize(("style", "d", "r"), [("neox", 128, 128), ("neox", 80, 32), ("interleaved", 128, 64)])
def test_gpu_bf16_rope_and_cache_write(t, style, d, r):
    bf = torch.bfloat16
    q, k, v = _qkv(t, 32, 8, d, d, bf)
    cos, sin = _tables(r, style, bf, positions=4096)
    positions = torch.randint(0, 4096, (t,), device=DEV)
    attrs = {"style": style, "rotary_dim": r}
    _check_rope([q, positions, cos, sin], attrs, bf)
    nb = (t + BLOCK_SIZE - 1) // BLOCK_SIZE + 2
    kc, vc = _caches(nb, 8, d, d, bf)
    slots = torch.randperm(nb * BLOCK_SIZE, device=DEV)[:t]
    slots[::5] = -1
    _check_cache_write("kv_cache_write", [k, v, kc, vc, slots], 2, {}, bf)
    _check_cache_write("rope_kv_cache_write", [q, k, v, positions, cos, sin, kc, vc, slots], 6, attrs, bf)


@pytest.mark.gpu
def test_gpu_bf16_longrope():
    bf = torch.bfloat16
    q, _, _ = _qkv(2048, 32, 8, 96, 96, bf)
    cos, sin = _tables(96, "neox", bf, positions=4096)
    cos_long, sin_long = _tables(96, "neox", bf, positions=4096, base=500.0)
    lengths = torch.tensor([1000, 600, 300, 100], device=DEV, dtype=torch.int32)
    cu = torch.cat([torch.zeros(1, device=DEV, dtype=torch.int32), lengths.cumsum(0, dtype=torch.int32)])
    positions = torch.cat([torch.arange(int(n), device=DEV) for n in lengths] + [torch.zeros(48, device=DEV)]).long()
    args = [q, positions, cos, sin, cos_long, sin_long, lengths + 500, cu]
    _check_rope(args, {"style": "neox", "rotary_dim": 96, "long_after": 1024}, bf)


# -- a whole model's cuda-pipeline graph on these kernels -------------------------------------


def _on_triton(name: str, launcher):
    """An op impl that computes through the Triton launcher into fresh destinations (written
    operands: the operands themselves), sized by the reference run on copies."""
    op = OPS[name]

    def impl(*args, **attrs):
        want = op.impl(*(a.clone() if i in op.writes else a for i, a in enumerate(args)), **attrs)
        many = isinstance(want, tuple)
        want = want if many else (want,)
        outs = [args[i] for i in op.writes] + [torch.empty_like(w) for w in want[len(op.writes):]]
        launcher(outs, list(args), attrs)
        return tuple(outs) if many else outs[0]

    return dataclasses.replace(op, impl=impl)


@pytest.mark.parametrize("arch", ["llama", "phi"])
def test_cuda_pipeline_graph_on_triton_kernels_matches_the_reference(checkpoint, monkeypatch, arch):
    imported = import_model(str(checkpoint(arch)), torch.float32)
    graph = PassManager([get_pass(n) for n in resolve_pipeline("cuda", None)]).run(imported.graph)
    lengths = (5, 11, 3)
    batch = sample_batch(int(graph.meta.get("vocab_size", 2)), 0, lengths)
    caches = {n.name: n.type for n in graph.inputs if is_cache_input(n.name)}
    names = {n.name for n in graph.inputs}
    batch.update(whole_sequence_inputs(lengths, names, caches, BLOCK_SIZE, shuffle_seed=3))
    inputs = {n: batch[n] for n in names}
    with torch.no_grad():
        want = run_graph(graph, {k: v.clone() for k, v in inputs.items()}, imported.weights)
        launched = {**norms.LAUNCHERS, **elementwise.LAUNCHERS, **LAUNCHERS,
                    "gated_linear": linear.LAUNCHERS["gated_linear"]}
        used = {n.op for n in graph.ops()} & set(launched)
        assert {"rope_kv_cache_write", "gated_linear" if arch == "llama" else "layer_norm"} <= used
        for name in used:
            monkeypatch.setitem(OPS, name, _on_triton(name, launched[name]))
        got = run_graph(graph, inputs, imported.weights)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
