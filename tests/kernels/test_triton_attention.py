"""The Triton paged-attention kernels against the `paged_attention` op's torch reference.

Without a CUDA device the kernels run in Triton's interpreter (bf16 is broken there: float32
and float16 only, small shapes); `gpu` tests repeat the cases in bfloat16 at serving sizes.
Tolerances: float32 1e-4 (the reference's float32 scores, the kernel's ieee dots); float16 and
bfloat16 as their rounding of scores and probabilities (the reference rounds both to the input
dtype, the kernel keeps float32).
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

from kiln.ir.ops import OPS
from kiln.kernels.triton_kernels.attention import (
    KNOBS,
    LAUNCHERS,
    AttentionConfig,
    choose_path,
    make_launcher,
)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOL = {torch.float32: 1e-4, torch.float16: 4e-3, torch.bfloat16: 3e-2}
UNIFIED = make_launcher(AttentionConfig(path="unified", block_m=16, block_n=16))
SPLIT = make_launcher(AttentionConfig(path="split", block_n=16, num_splits=4))


@dataclass
class Batch:
    """One step's paged_attention inputs."""

    args: list
    attrs: dict
    freed: list[int]
    """Physical blocks no query can attend (filled with NaN by tests that check it)."""


def make_batch(seqs: list[tuple[int, int]], *, hq: int = 4, hkv: int = 2, d: int = 32, dv: int | None = None,
               bs: int = 16, dtype: torch.dtype = torch.float32, pad_seqs: int = 0, pad_rows: int = 0,
               causal: bool = True, window: int = 0, softcap: float = 0.0, sinks: bool = False,
               strided_q: bool = False, spare_blocks: int = 3, seed: int = 0) -> Batch:
    """seqs: (context length including this step, query count) per sequence; blocks handed out
    in a shuffled order (block 0 is never used: freed table entries point there)."""
    g = torch.Generator().manual_seed(seed)
    dv = dv or d
    per_seq = [-(-ctx // bs) for ctx, _ in seqs]
    nb = sum(per_seq) + spare_blocks + 1
    order = (torch.randperm(nb - 1, generator=g) + 1).tolist()
    mb = max(per_seq, default=1) + 1
    tables = torch.zeros(len(seqs) + pad_seqs, mb, dtype=torch.int32)
    freed: list[int] = []
    for s, ((ctx, q_len), n) in enumerate(zip(seqs, per_seq, strict=True)):
        tables[s, :n] = torch.tensor(order[:n], dtype=torch.int32)
        order = order[n:]
        if window and causal:  # blocks wholly before the first query's window: freed
            first_key = max(ctx - q_len - window + 1, 0)
            for b in range(first_key // bs):
                freed.append(int(tables[s, b]))
                tables[s, b] = 0
    freed.append(0)
    freed += order  # never-used spare blocks too
    t = sum(q for _, q in seqs) + pad_rows
    k_cache = torch.randn(nb, bs, hkv, d, generator=g).to(dtype)
    v_cache = torch.randn(nb, bs, hkv, dv, generator=g).to(dtype)
    if strided_q:  # q as a slice of a merged QKV projection
        qkv = torch.randn(t, (hq + 2 * hkv) * d, generator=g).to(dtype)
        q = qkv[:, : hq * d].view(t, hq, d)
    else:
        q = torch.randn(t, hq, d, generator=g).to(dtype)
    seq_lens = torch.tensor([ctx for ctx, _ in seqs] + [0] * pad_seqs, dtype=torch.int32)
    cu = torch.zeros(len(seqs) + pad_seqs + 1, dtype=torch.int32)
    cu[1 : len(seqs) + 1] = torch.tensor([q for _, q in seqs]).cumsum(0)
    cu[len(seqs) + 1 :] = cu[len(seqs)]
    args = [q, k_cache, v_cache, tables, seq_lens, cu]
    if sinks:
        args.append(torch.randn(hq, generator=g).to(dtype))
    attrs = {"scale": d**-0.5, "causal": causal, "sliding_window": window, "softcap": softcap}
    return Batch([a.to(DEVICE) for a in args], attrs, freed)


def reference(batch: Batch) -> torch.Tensor:
    return OPS["paged_attention"].impl(*batch.args, **batch.attrs)


def run(launch, batch: Batch) -> torch.Tensor:
    q, v_cache = batch.args[0], batch.args[2]
    out = torch.full((*q.shape[:2], v_cache.shape[-1]), float("nan"), dtype=q.dtype, device=q.device)
    launch([out], batch.args, batch.attrs)
    return out


def check(launch, batch: Batch, expected: torch.Tensor | None = None) -> None:
    expected = reference(batch) if expected is None else expected
    got = run(launch, batch)
    tol = TOL[got.dtype]
    torch.testing.assert_close(got.float(), expected.float(), atol=tol, rtol=tol)


# A fresh prefill (odd length), a chunk continuing a cached context, decodes.
MIXED = [(37, 37), (50, 13), (21, 1), (1, 1), (33, 1)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_triton_attention_mixed_batch(dtype: torch.dtype) -> None:
    check(UNIFIED, make_batch(MIXED, dtype=dtype))


def test_triton_attention_default_launcher_pads() -> None:
    # The default knobs (block_m 64, block_n 64); padded sequences and token rows come out 0.
    batch = make_batch([(70, 9), (5, 2), (40, 1)], pad_seqs=2, pad_rows=3)
    got = run(LAUNCHERS["paged_attention"], batch)
    assert torch.equal(got[-3:], torch.zeros_like(got[-3:]))
    torch.testing.assert_close(got, reference(batch), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize(("hq", "hkv", "bs"), [(4, 1, 8), (2, 2, 32), (8, 2, 16)])
def test_triton_attention_head_groups(hq: int, hkv: int, bs: int) -> None:
    check(UNIFIED, make_batch([(29, 6), (40, 1)], hq=hq, hkv=hkv, bs=bs, pad_rows=1))


@pytest.mark.parametrize("path", ["unified", "split"])
def test_triton_attention_window_skips_freed_blocks(path: str) -> None:
    # Blocks before every query's window hold NaN (freed and reused); table entries may be 0.
    batch = make_batch([(70, 1), (60, 12), (45, 45), (9, 1)], window=11, bs=8, pad_seqs=1)
    expected = reference(batch)
    for b in batch.freed:
        batch.args[1][b] = float("nan")
        batch.args[2][b] = float("nan")
    launch = SPLIT if path == "split" else UNIFIED
    got = run(launch, batch)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)


def test_triton_attention_softcap_sinks_noncausal() -> None:
    check(UNIFIED, make_batch(MIXED[:3], softcap=5.0, sinks=True))
    check(UNIFIED, make_batch([(20, 20), (7, 7)], causal=False, pad_rows=2))


def test_triton_attention_sinks_float16() -> None:
    check(UNIFIED, make_batch([(30, 5), (12, 1)], sinks=True, dtype=torch.float16))


@pytest.mark.parametrize(("d", "dv"), [(192, 128), (80, 80)])
def test_triton_attention_head_sizes(d: int, dv: int) -> None:
    check(UNIFIED, make_batch([(26, 6), (19, 1)], hq=2, hkv=1, d=d, dv=dv))


def test_triton_attention_strided_q() -> None:
    batch = make_batch([(24, 8), (17, 1)], strided_q=True, pad_rows=1)
    assert not batch.args[0].is_contiguous()
    check(UNIFIED, batch)


def test_triton_attention_split_path() -> None:
    # Decodes over long contexts, padded sequences, sinks, softcap; then a mixed batch forced
    # through the split path (correct for any batch, chosen for decode-sized ones).
    check(SPLIT, make_batch([(150, 1), (3, 1), (97, 1)], pad_seqs=2, pad_rows=1, sinks=True, softcap=4.0))
    check(SPLIT, make_batch(MIXED, dtype=torch.float16, pad_rows=2))


def test_triton_attention_path_rule() -> None:
    cfg = AttentionConfig()
    assert choose_path(cfg, t=1, s=1, hkv=8, capacity=4096) == "split"
    assert choose_path(cfg, t=4, s=8, hkv=8, capacity=32768) == "split"
    assert choose_path(cfg, t=64, s=64, hkv=8, capacity=32768) == "unified"  # enough programs
    assert choose_path(cfg, t=9, s=8, hkv=8, capacity=32768) == "unified"  # a prefill in the step
    assert choose_path(cfg, t=1, s=1, hkv=8, capacity=512) == "unified"  # short contexts only
    assert choose_path(AttentionConfig(path="split"), t=500, s=2, hkv=8, capacity=16) == "split"
    assert set(KNOBS) <= set(AttentionConfig.__dataclass_fields__)


# -- mixed steps: two launches ------------------------------------------------------------------

# block_m 32, decode_block_m 16: at GP 2 (hq 4, hkv 2) the short launch takes q_len <= 8 in tiles
# of 8 tokens, the long one q_len >= 9 in tiles of 16.
TWO = make_launcher(AttentionConfig(path="unified", block_m=32, decode_block_m=16, block_n=16))
# Decodes, speculative-sized queries at and around the bound (3, 8, 9), prefill chunks of
# several lengths (fresh and continuing a cached context), interleaved.
STEP = [(21, 1), (40, 17), (9, 8), (1, 1), (33, 33), (30, 9), (65, 1), (12, 3), (50, 21), (7, 1)]


class Launches:
    """Records the attention kernel's launches (grid, constexprs) and runs them."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        from kiln.kernels.triton_kernels import attention

        self.kernel = attention._attention_kernel
        self.seen: list[tuple[tuple, dict]] = []
        monkeypatch.setattr(attention, "_attention_kernel", self)

    def __getitem__(self, grid: tuple):
        def run(*args, **kw):
            self.seen.append((grid, {k: kw[k] for k in ("BLOCK_Q", "MIN_Q", "MAX_Q", "ZERO_PAD")}))
            self.kernel[grid](*args, **kw)

        return run


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_triton_attention_mixed_two_launches(dtype: torch.dtype, monkeypatch: pytest.MonkeyPatch) -> None:
    launches = Launches(monkeypatch)
    batch = make_batch(STEP, dtype=dtype, pad_seqs=2, pad_rows=3)
    got = run(TWO, batch)
    assert torch.equal(got[-3:], torch.zeros_like(got[-3:]))  # the padded rows, zeroed once
    torch.testing.assert_close(got.float(), reference(batch).float(), atol=TOL[dtype], rtol=TOL[dtype])
    t, s = batch.args[0].shape[0], len(STEP) + 2
    assert launches.seen == [
        ((-(-t // 8) + s, 2, 1), {"BLOCK_Q": 8, "MIN_Q": 0, "MAX_Q": 8, "ZERO_PAD": True}),
        ((-(-t // 16) + s, 2, 1), {"BLOCK_Q": 16, "MIN_Q": 9, "MAX_Q": 0, "ZERO_PAD": False}),
    ]


def test_triton_attention_mixed_one_launch_otherwise(monkeypatch: pytest.MonkeyPatch) -> None:
    # One sequence, decode-sized steps, equal tile sizes: one launch, as before.
    launches = Launches(monkeypatch)
    check(TWO, make_batch([(40, 21)], pad_rows=2))
    check(TWO, make_batch([(40, 1), (9, 1)], pad_seqs=1))
    check(UNIFIED, make_batch(STEP[:4], pad_rows=1))
    assert [kw["BLOCK_Q"] for _, kw in launches.seen] == [16, 8, 8]
    assert all(kw["ZERO_PAD"] and kw["MAX_Q"] == 0 for _, kw in launches.seen)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_triton_attention_mixed_window_freed_blocks(dtype: torch.dtype) -> None:
    # Both launches skip the blocks that left every query's window (NaN here).
    batch = make_batch(STEP, window=11, bs=8, dtype=dtype, pad_seqs=1, pad_rows=2)
    expected = reference(batch)
    for b in batch.freed:
        batch.args[1][b] = float("nan")
        batch.args[2][b] = float("nan")
    check(TWO, batch, expected)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_triton_attention_mixed_softcap_sinks(dtype: torch.dtype) -> None:
    check(TWO, make_batch(STEP, softcap=5.0, sinks=True, dtype=dtype, pad_rows=2))
    check(TWO, make_batch(STEP[:6], causal=False, strided_q=True, dtype=dtype, pad_rows=1))


@pytest.mark.parametrize(("hq", "hkv"), [(8, 2), (6, 2), (4, 4)])
def test_triton_attention_mixed_default_knobs(hq: int, hkv: int) -> None:
    # The default knobs (block_m 64, decode_block_m 16, block_n 64) at GP 4, 4 (G 3) and 1.
    check(LAUNCHERS["paged_attention"], make_batch(STEP, hq=hq, hkv=hkv, pad_seqs=1, pad_rows=2, sinks=True))


# -- on an H200, in bfloat16 ----------------------------------------------------------------------


def _serving_seqs(seed: int) -> list[tuple[int, int]]:
    g = torch.Generator().manual_seed(seed)
    ctx = torch.randint(1, 2000, (8,), generator=g).tolist()
    q = [c if i < 2 else (min(c, 64) if i < 4 else 1) for i, c in enumerate(ctx)]
    return list(zip(ctx, q, strict=True))


@pytest.mark.gpu
@pytest.mark.parametrize("path", ["unified", "split"])
def test_triton_attention_gpu_bf16(path: str) -> None:
    launch = make_launcher(AttentionConfig(path=path))
    kw = {"hq": 32, "hkv": 8, "d": 128, "bs": 16, "dtype": torch.bfloat16}
    check(launch, make_batch(_serving_seqs(0), pad_seqs=3, pad_rows=5, **kw))
    check(launch, make_batch(_serving_seqs(1), sinks=True, softcap=30.0, strided_q=True, **kw))
    batch = make_batch(_serving_seqs(2), window=256, **kw)
    expected = reference(batch)
    for b in batch.freed:
        batch.args[1][b] = float("nan")
        batch.args[2][b] = float("nan")
    check(launch, batch, expected)


@pytest.mark.gpu
def test_triton_attention_gpu_mixed_step() -> None:
    # An offline-serving step: many decodes beside prefill chunks, in the default two launches.
    g = torch.Generator().manual_seed(4)
    ctx = torch.randint(100, 1500, (96,), generator=g).tolist()
    seqs = [(c, 1) for c in ctx] + [(800, 390), (130, 130), (600, 5), (300, 4)]
    launch = LAUNCHERS["paged_attention"]
    kw = {"hq": 32, "hkv": 8, "d": 128, "bs": 16, "dtype": torch.bfloat16}
    check(launch, make_batch(seqs, pad_seqs=3, pad_rows=5, **kw))
    check(launch, make_batch(seqs[::-1], sinks=True, softcap=30.0, strided_q=True, **kw))
    batch = make_batch(seqs, window=256, **kw)
    expected = reference(batch)
    for b in batch.freed:
        batch.args[1][b] = float("nan")
        batch.args[2][b] = float("nan")
    check(launch, batch, expected)


@pytest.mark.gpu
def test_triton_attention_gpu_long_decode() -> None:
    batch = make_batch([(4096, 1)], hq=32, hkv=8, d=128, bs=16, dtype=torch.bfloat16)
    capacity = batch.args[3].shape[1] * 16
    assert choose_path(AttentionConfig(), t=1, s=1, hkv=8, capacity=capacity) == "split"
    check(LAUNCHERS["paged_attention"], batch)


@pytest.mark.gpu
def test_triton_attention_gpu_mla_heads() -> None:
    kw = {"hq": 16, "hkv": 16, "d": 192, "dv": 128, "bs": 16, "dtype": torch.bfloat16}
    check(LAUNCHERS["paged_attention"], make_batch(_serving_seqs(3), **kw))
    check(LAUNCHERS["paged_attention"], make_batch([(3000, 1), (1200, 1)], **kw))


@pytest.mark.gpu
def test_triton_attention_gpu_one_binary_per_batch_size() -> None:
    # T and S are do_not_specialize: decode steps of every batch size share one binary.
    from kiln.kernels.triton_kernels.attention import _attention_kernel

    launch = make_launcher(AttentionConfig(path="unified"))
    kw = {"hq": 32, "hkv": 8, "d": 128, "bs": 16, "dtype": torch.bfloat16}
    check(launch, make_batch([(100, 1)], **kw))
    cache = _attention_kernel.device_caches[torch.cuda.current_device()][0]
    compiled = len(cache)
    for n in (2, 3, 16, 17):
        check(launch, make_batch([(100, 1)] * n, **kw))
    assert len(cache) == compiled


def test_triton_attention_all_padding_and_bad_knobs() -> None:
    batch = make_batch([], pad_seqs=0, pad_rows=3)
    batch.args[3] = torch.zeros(0, 1, dtype=torch.int32, device=DEVICE)
    assert torch.equal(run(UNIFIED, batch), torch.zeros(3, 4, 32, device=DEVICE))
    with pytest.raises(ValueError, match="block_n"):
        make_launcher(AttentionConfig(block_n=48))
