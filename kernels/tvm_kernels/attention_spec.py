"""The static parameters of one cpu paged-attention specialization
(kiln.kernels.tvm_kernels.attention), the vector and tile sizes that follow from them, and the
key-range and softcap rules that the row path and the tile path share."""

from __future__ import annotations

from dataclasses import dataclass

import tvm
from tvm.script import tirx as T


def _lanes(d: int) -> int:
    """The vector width of the loops over a head of d elements."""
    for lanes in (16, 8, 4, 2):
        if d % lanes == 0:
            return lanes
    return 1


def host_tile_lanes() -> int:
    """The tile width for this machine: 16 float32 lanes with AVX-512 (32 vector registers), else
    0, no tiles: with AVX2's 16 registers, tiles of 8 lanes measured slower than rows."""
    from tvm.target import codegen

    target = tvm.target.Target({"kind": "llvm", "mcpu": codegen.llvm_get_system_cpu()})
    features = {str(f) for f in codegen.llvm_get_cpu_features(target)}
    return 16 if "avx512f" in features else 0


@dataclass(frozen=True)
class AttentionSpec:
    """One specialization of the kernel: what its TIR is built from."""

    dtype: str
    """Element type of q, the caches and out."""
    hq: int
    """Query heads."""
    hkv: int
    """KV heads (hq is a multiple of them)."""
    d: int
    """Head size of q and K."""
    dv: int
    """Head size of V and out."""
    bs: int
    """Tokens per cache block."""
    scale: float
    """Factor of the q . k scores."""
    causal: bool
    """Whether a row sees only keys up to its own position."""
    window: int
    """Sliding window W (a row sees its last W keys), 0 for none."""
    softcap: float
    """Scores become tanh(s / softcap) * softcap when > 0."""
    sinks: bool
    """Whether each query head has a sink logit (one more logit, without a value)."""
    sinks_dtype: str
    """Element type of the sinks buffer (they are rounded to dtype like the reference does)."""
    tile_lanes: int
    """The lanes of a tile's vectors, 0 for no tiles."""
    tile_min: int | None
    """The fewest rows of one sequence that take the tiled path; None: enough rows to fill half
    the tile's lanes (min_tile_rows)."""

    @property
    def g_heads(self) -> int:
        """G: the query heads of one KV head."""
        return self.hq // self.hkv

    @property
    def vl(self) -> int:
        """The vector width of the loops over a q or K head."""
        return _lanes(self.d)

    @property
    def vlv(self) -> int:
        """The vector width of the loops over a V or out head."""
        return _lanes(self.dv)

    @property
    def kb(self) -> int:
        """KB: keys per online-softmax step (the largest power of two <= 16 dividing bs)."""
        return max(k for k in (1, 2, 4, 8, 16) if self.bs % k == 0)

    @property
    def tiled(self) -> bool:
        """Whether prefill rows may take the tiled path."""
        return self.tile_lanes > 0

    @property
    def ml(self) -> int:
        """L: the lanes of a tile, rows x G, padded."""
        return max(self.tile_lanes, 1 << (self.g_heads - 1).bit_length())

    @property
    def rows(self) -> int:
        """R: query rows per tile."""
        return self.ml // self.g_heads

    @property
    def kh(self) -> int:
        """Keys per score buffer: two of them, each under 1 KiB (on the stack)."""
        return self.kb // 2

    @property
    def min_tile_rows(self) -> int:
        """tile_min, or by default enough rows to fill half the tile's lanes (2 at least)."""
        if self.tile_min is None:
            return max(2, -(-self.ml // (2 * self.g_heads)))
        return self.tile_min

    def cap(self, x):
        """The softcapped score x (x itself without softcap)."""
        softcap = self.softcap
        return T.tanh(x / T.float32(softcap)) * T.float32(softcap) if softcap > 0 else x

    def lo_of(self, qp):
        """The first key that the row at position qp sees."""
        return T.max(qp - self.window + 1, T.int64(0)) if self.window > 0 else T.int64(0)

    def hi_of(self, qp, ctx):
        """The end of the keys that the row at position qp sees (ctx: its sequence's length)."""
        return T.min(qp + 1, ctx) if self.causal else ctx
