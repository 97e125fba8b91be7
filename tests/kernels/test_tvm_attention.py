"""The cpu target's paged attention (TVM) against the op's torch reference.

Every batch is built the way the runtime lays it out: shuffled block tables, sequences given as
(context length, query rows), padded sequences (seq_len 0, table row 0) and padded token rows
at the end. Cache slots that no sequence may read (blocks before a window, slots past a
sequence's length, blocks nobody owns) hold NaN, so a kernel that reads them fails.
Tolerances: float32 2e-5; float16 1e-2 and bfloat16 3e-2 (the reference rounds scores and
probabilities to the input dtype, the kernel keeps them in float32).
"""

from __future__ import annotations

import pytest
import torch

tvm = pytest.importorskip("tvm")

from kiln.ir.ops import OPS  # noqa: E402
from kiln.ir.types import TensorType  # noqa: E402
from kiln.kernels.tvm_kernels import OpInfo  # noqa: E402
from kiln.kernels.tvm_kernels.attention import BUILDERS, build, make_prim_func  # noqa: E402

HOST = {"kind": "llvm", "num-cores": 2, "mcpu": tvm.target.codegen.llvm_get_system_cpu()}
"""What the cpu target builds for (runtime/tvm_library.py); GENERIC is LLVM's baseline x86-64."""
GENERIC = {"kind": "llvm", "num-cores": 2}
TOL = {"float32": 2e-5, "float16": 1e-2, "bfloat16": 3e-2}
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
_COMPILED: dict[tuple[str, str], object] = {}


def _types(
    dtype: str, hq: int, hkv: int, d: int, dv: int, bs: int, sinks: bool
) -> list[TensorType]:
    types = [
        TensorType(dtype, ("T", hq, d)),
        TensorType(dtype, ("NB", bs, hkv, d)),
        TensorType(dtype, ("NB", bs, hkv, dv)),
        TensorType("int32", ("S", "MB")),
        TensorType("int32", ("S",)),
        TensorType("int32", ("S+1",)),
    ]
    return types + [TensorType(dtype, (hq,))] if sinks else types


def _kernel(types: list[TensorType], attrs: dict, target: dict = HOST):
    """The compiled function of one specialization (built and compiled once per session)."""
    name, func = build(types, attrs)
    key = (name, str(target))
    if key not in _COMPILED:
        lib = tvm.compile(tvm.IRModule({name: func}), target=tvm.target.Target(target))
        _COMPILED[key] = lib[name]
    return _COMPILED[key]


def _batch(seqs, *, hq, hkv, d, dv, bs, dtype, window=0, pad_seqs=0, pad_rows=0, seed=0):
    """q, caches and metadata of sequences given as (context length, query rows); a (0, 0)
    entry is an empty sequence in place. Readable slots hold random values, the rest NaN."""
    g = torch.Generator().manual_seed(seed)
    nblocks = [-(-ctx // bs) for ctx, _ in seqs]
    mb = max(nblocks) + 1
    nb = sum(nblocks) + 3
    order = torch.randperm(nb, generator=g)
    k = torch.full((nb, bs, hkv, d), float("nan"))
    v = torch.full((nb, bs, hkv, dv), float("nan"))
    tables = torch.zeros(len(seqs) + pad_seqs, mb, dtype=torch.int32)
    used = 0
    for s, ((ctx, qlen), n) in enumerate(zip(seqs, nblocks, strict=True)):
        tables[s, :n] = order[used : used + n].to(torch.int32)
        used += n
        # From the block of the first query's window start (the reference reads all of it).
        first = max(ctx - qlen - window + 1, 0) // bs * bs if window else 0
        for j in range(first, ctx):
            blk, slot = tables[s, j // bs], j % bs
            k[blk, slot] = torch.randn(hkv, d, generator=g)
            v[blk, slot] = torch.randn(hkv, dv, generator=g)
    seq_lens = torch.tensor([ctx for ctx, _ in seqs] + [0] * pad_seqs, dtype=torch.int32)
    cu = torch.zeros(len(seqs) + pad_seqs + 1, dtype=torch.int32)
    cu[1 : len(seqs) + 1] = torch.tensor([q for _, q in seqs]).cumsum(0)
    cu[len(seqs) + 1 :] = cu[len(seqs)]
    q = torch.randn(int(cu[-1]) + pad_rows, hq, d, generator=g)
    dt = DTYPES[dtype]
    return q.to(dt), k.to(dt), v.to(dt), tables, seq_lens, cu


def _check(
    seqs,
    *,
    hq=8,
    hkv=2,
    d=64,
    dv=None,
    bs=16,
    dtype="float32",
    causal=True,
    window=0,
    softcap=0.0,
    sinks=False,
    scale=None,
    pad_seqs=0,
    pad_rows=0,
    seed=0,
    views=False,
    target=HOST,
    sinks_dtype=None,
):
    dv = dv or d
    attrs = {
        "scale": scale or d**-0.5,
        "causal": causal,
        "sliding_window": window,
        "softcap": softcap,
    }
    args = list(
        _batch(
            seqs,
            hq=hq,
            hkv=hkv,
            d=d,
            dv=dv,
            bs=bs,
            dtype=dtype,
            window=window,
            pad_seqs=pad_seqs,
            pad_rows=pad_rows,
            seed=seed,
        )
    )
    if sinks:
        args.append(
            (torch.randn(hq, generator=torch.Generator().manual_seed(seed + 1)) * 2).to(
                DTYPES[sinks_dtype or dtype]
            )
        )
    types = _types(dtype, hq, hkv, d, dv, bs, sinks)
    if sinks_dtype:
        types[6] = TensorType(sinks_dtype, (hq,))
    fn = _kernel(types, attrs, target)
    out = torch.full((args[0].shape[0], hq, dv), 7.0, dtype=args[0].dtype)  # every row is written
    if views:  # q a slice of a merged QKV projection, out a slice of a wider buffer
        qkv = torch.zeros(args[0].shape[0], hq + 2 * hkv, d, dtype=args[0].dtype)
        qkv[:, hkv : hkv + hq] = args[0]
        args[0] = qkv[:, hkv : hkv + hq]
        out = torch.full((args[0].shape[0], hq + 1, dv), 7.0, dtype=args[0].dtype)[:, 1:]
    fn(*args, out)
    expected = OPS["paged_attention"].impl(*args, **attrs)
    assert not out.isnan().any()
    torch.testing.assert_close(out.float(), expected.float(), atol=TOL[dtype], rtol=TOL[dtype])
    return out


MIXED = [(37, 37), (512 - 3, 1), (0, 0), (21, 3), (40, 9), (1, 1)]
"""A whole prompt, a decode, an empty sequence in place, a chunk continuing a cached context,
a longer chunk, a one-token prompt."""


def test_mixed_prefill_decode_padded() -> None:
    out = _check(MIXED, pad_seqs=2, pad_rows=3, views=True)
    assert out[-3:].eq(0).all()  # padded rows


@pytest.mark.parametrize("hq,hkv", [(4, 1), (6, 6)], ids=["mqa", "mha"])
def test_heads(hq: int, hkv: int) -> None:
    _check([(19, 19), (70, 1), (33, 5)], hq=hq, hkv=hkv, d=80, bs=8, pad_rows=1)


def test_decode_only_and_single_sequence() -> None:
    _check([(300, 1), (5, 1), (129, 1)], pad_seqs=1)
    _check([(61, 61)])


@pytest.mark.parametrize("window", [1, 7, 24])
def test_sliding_window_never_reads_freed_blocks(window: int) -> None:
    _check([(100, 1), (90, 20), (30, 30), (17, 2)], window=window, bs=8, pad_rows=2)


def test_softcap_sinks_scale() -> None:
    _check(MIXED, softcap=5.0, pad_rows=1)
    _check(MIXED, sinks=True, pad_seqs=1)
    _check([(45, 4), (20, 20)], sinks=True, softcap=30.0, window=9, scale=0.3, bs=4)


def test_non_causal() -> None:
    _check([(25, 25), (40, 7)], causal=False)
    _check([(25, 25), (40, 7)], causal=False, window=6)


def test_head_sizes_differ() -> None:
    _check([(50, 50), (75, 2)], hq=4, hkv=2, d=192, dv=128, bs=16, pad_rows=1)


def test_narrow_vectors_and_wide_groups() -> None:
    _check([(40, 40), (70, 1), (33, 5)], d=36, hq=4, hkv=1, bs=12)  # 4 lanes, 4-key steps
    _check([(40, 40), (70, 1), (33, 5)], hq=16, hkv=2, d=128, dv=64, bs=32)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_precision(dtype: str) -> None:
    _check(MIXED, dtype=dtype, pad_rows=1)
    _check([(60, 3), (33, 33)], dtype=dtype, sinks=True, window=16, softcap=20.0)
    _check([(60, 3), (33, 33)], dtype=dtype, sinks=True, sinks_dtype="float32")


def test_generic_target() -> None:
    _check(MIXED, pad_seqs=1, pad_rows=2, target=GENERIC)
    _check(
        [(60, 3), (33, 33)], dtype="bfloat16", sinks=True, window=16, softcap=20.0, target=GENERIC
    )


TILED = [(37, 37), (300, 1), (0, 0), (64, 23), (90, 8), (11, 2), (1, 1), (16, 5)]
"""Prompts and chunks of several tiles whose lengths are not multiples of the tile (whose last
rows go row by row when too few), beside decodes, a 2-row chunk and an empty sequence."""


@pytest.mark.parametrize("hq,hkv", [(12, 4), (8, 8), (8, 4), (16, 2)], ids=["g3", "g1", "g2", "g8"])
def test_tiles_gqa_groups(hq: int, hkv: int) -> None:
    _check(TILED, hq=hq, hkv=hkv, pad_seqs=1, pad_rows=2)


@pytest.mark.parametrize("window", [3, 40])
def test_tiles_sliding_window(window: int) -> None:
    # Rows of one tile start their windows at different keys: blocks before the first row's
    # window are never read (NaN there), each row masks its own keys.
    _check([(200, 150), (90, 33), (45, 1), (29, 7)], hq=12, hkv=4, window=window, bs=8, pad_rows=1)


def test_tiled_and_row_paths_agree() -> None:
    """Every row through the tiled path (tile_min=1: decodes too; tiles of 16 or 8 lanes), the
    default split, and no tiles (the kernel without AVX-512) give the reference's result, with
    a window, a soft-cap and sinks together: on any machine (the default tiles by the CPU)."""
    seqs = [(70, 70), (50, 1), (33, 6), (21, 2)]
    attrs = {"scale": 0.125, "causal": True, "sliding_window": 20, "softcap": 30.0}
    args = list(
        _batch(seqs, hq=12, hkv=4, d=64, dv=64, bs=16, dtype="float32", window=20, pad_rows=1)
    )
    args.append(torch.randn(12, generator=torch.Generator().manual_seed(3)))
    expected = OPS["paged_attention"].impl(*args, **attrs)
    for tile_min, tile_lanes in ((1, 16), (1, 8), (None, 16), (None, 0)):
        func = make_prim_func(
            "float32",
            12,
            4,
            64,
            64,
            16,
            scale=0.125,
            causal=True,
            window=20,
            softcap=30.0,
            sinks=True,
            tile_min=tile_min,
            tile_lanes=tile_lanes,
        ).with_attr("global_symbol", "k")
        fn = tvm.compile(tvm.IRModule({"k": func}), target=tvm.target.Target(HOST))["k"]
        out = torch.full((args[0].shape[0], 12, 64), 7.0)
        fn(*args, out)
        torch.testing.assert_close(out, expected, atol=2e-5, rtol=2e-5)


def test_one_query_head_per_kv_head_without_tiles() -> None:
    """Multi-head attention (as many query heads as KV heads) builds and runs without the tile
    path (a CPU without AVX-512): no tile code, not even its vectors, is generated."""
    seqs = [(9, 9), (30, 1)]
    attrs = {"scale": 0.125, "causal": True, "sliding_window": None, "softcap": None}
    args = list(_batch(seqs, hq=4, hkv=4, d=64, dv=64, bs=16, dtype="float32", window=0, pad_rows=0))
    func = make_prim_func("float32", 4, 4, 64, 64, 16, scale=0.125, causal=True, window=0, softcap=0.0,
                          sinks=False, tile_lanes=0).with_attr("global_symbol", "k")
    fn = tvm.compile(tvm.IRModule({"k": func}), target=tvm.target.Target(HOST))["k"]
    out = torch.full((args[0].shape[0], 4, 64), 7.0)
    fn(*args, out)
    torch.testing.assert_close(out, OPS["paged_attention"].impl(*args, **attrs), atol=2e-5, rtol=2e-5)


def test_empty_step() -> None:
    fn = _kernel(
        _types("float32", 8, 2, 64, 64, 16, False),
        {"scale": 0.125, "causal": True, "sliding_window": 0, "softcap": 0.0},
    )
    q, k, v, tables, lens, cu = _batch([(9, 9)], hq=8, hkv=2, d=64, dv=64, bs=16, dtype="float32")
    out = torch.full((4, 8, 64), 7.0)  # every row padding: no sequences at all
    fn(q[:4], k, v, tables[:0], lens[:0], cu[:1], out)
    assert out.eq(0).all()


def test_names_and_unsupported() -> None:
    attrs = {"scale": 0.125, "causal": True, "sliding_window": 0, "softcap": 0.0}
    name, _ = build(_types("float32", 8, 2, 64, 64, 16, False), attrs)
    assert name == "paged_attention_f32_h8k2_d64_bs16_c1_w0_s0_k0"
    variants = [
        build(_types("float16", 8, 2, 64, 64, 16, False), attrs),
        build(_types("float32", 8, 1, 64, 64, 16, False), attrs),
        build(_types("float32", 8, 2, 64, 32, 16, False), attrs),
        build(_types("float32", 8, 2, 64, 64, 8, False), attrs),
        build(_types("float32", 8, 2, 64, 64, 16, True), attrs),
        build(_types("float32", 8, 2, 64, 64, 16, False), {**attrs, "causal": False}),
        build(_types("float32", 8, 2, 64, 64, 16, False), {**attrs, "sliding_window": 4}),
        build(_types("float32", 8, 2, 64, 64, 16, False), {**attrs, "softcap": 30.5}),
        build(_types("float32", 8, 2, 64, 64, 16, False), {**attrs, "scale": 0.1}),
    ]
    names = {name} | {n for n, _ in variants}
    assert len(names) == len(variants) + 1
    assert build(_types("int8", 8, 2, 64, 64, 16, False), attrs) is None
    assert build(_types("float32", 6, 4, 64, 64, 16, False), attrs) is None
    assert build(_types("float32", 8, 2, 65, 65, 16, False), attrs) is None
    assert build(_types("float32", 8, 2, 64, 64, 1, False), attrs) is None


def test_package_builder() -> None:
    attrs = {"scale": 0.125, "causal": True, "sliding_window": 0, "softcap": 0.0}
    types = _types("float32", 8, 2, 64, 64, 16, True)
    out = TensorType("float32", ("T", 8, 64))
    kernel = BUILDERS["paged_attention"](OpInfo("paged_attention", tuple(types), (out,), attrs))
    assert kernel.name == "paged_attention_f32_h8k2_d64_bs16_c1_w0_s0_k1"
    assert kernel.inputs == tuple(range(7)) and kernel.outputs == (0,)
    assert len(kernel.func.params) == 8
