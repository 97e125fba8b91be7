"""Dense linear layers of the cuda target: cuBLAS through torch, a Triton GEMM, or for a few rows
a Triton GEMV (`gemv.py`), chosen per weight shape and token-count bucket by `kiln tune`
(tuning.json's "linear" table).

    x [M, K] (rows may be strided)   w [N, K] ("out_in") or [K, N] ("in_out")   bias [N]
    y [M, N] = x @ w^T (+ bias), accumulated in float32, rounded once to y's dtype

The Triton kernel tiles y into BLOCK_M x BLOCK_N programs that loop over K in BLOCK_K steps with
tl.dot (tensor cores; rows past M load as 0, so a decode step of a few tokens is a tile of 16
rows of which most are padding, which costs nothing when the weight read is the bound). Program
ids are grouped GROUP_M row-tiles at a time so that tiles sharing weight columns run together.

A table entry (`LinearChoice`) names, for weights of shape (K, N), the bucket bounds on M and the
provider with its config in each ("torch", "triton" with a GemmConfig, "gemv" with a
GemvConfig); shapes and buckets not in the table go to cuBLAS, and so does a call whose operands
the GEMV cannot read as they are (`gemv.supports`).
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

import torch
import triton
import triton.language as tl

from kiln.kernels import Launcher
from kiln.kernels.torch_provider import launcher as torch_launcher
from kiln.kernels.triton_kernels import pdl
from kiln.kernels.triton_kernels.elementwise import act_code, launch_gated
from kiln.kernels.triton_kernels.gemv import GemvConfig, gemv, supports

Tensor = torch.Tensor


@dataclass(frozen=True)
class GemmConfig:
    """The knobs of the Triton GEMM."""

    block_m: int = 16
    block_n: int = 64
    block_k: int = 128
    group_m: int = 8
    num_warps: int = 4
    num_stages: int = 4


KNOBS: dict[str, tuple[Any, ...]] = {
    "block_m": (16, 32, 64, 128),
    "block_n": (16, 32, 64, 128, 256),
    "block_k": (64, 128, 256),
    "num_warps": (2, 4, 8),
    "num_stages": (2, 3, 4, 5),
}
"""The search space of each GemmConfig knob, for the autotuner."""

BUCKETS: tuple[int, ...] = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048)
"""Upper bounds on M of the token-count buckets that `kiln tune` times (M above the last: the
last bucket's choice)."""


@triton.jit
def tile_order(pid, M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """(row tile, column tile) of program pid, walking GROUP_M row tiles down each column tile
    before moving right, so neighbouring programs share weight tiles in the L2."""
    tiles_m = tl.cdiv(M, BLOCK_M)
    per_group = GROUP_M * tl.cdiv(N, BLOCK_N)
    first_m = (pid // per_group) * GROUP_M
    group = tl.minimum(tiles_m - first_m, GROUP_M)
    return first_m + (pid % per_group) % group, (pid % per_group) // group


@triton.jit(do_not_specialize=["M"])  # one binary for every token count
def _gemm_kernel(
    x_ptr, w_ptr, b_ptr, y_ptr, M, N, K,
    stride_xm, stride_xk, stride_wn, stride_wk, stride_ym, stride_yn,
    HAS_BIAS: tl.constexpr, IEEE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    PDL: tl.constexpr,
):
    pdl.wait(PDL)
    pm, pn = tile_order(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)

    offs_m = pm * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pn * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    m_ok = offs_m < M
    n_ok = offs_n < N
    x_ptrs = x_ptr + offs_m[:, None].to(tl.int64) * stride_xm + offs_k[None, :] * stride_xk
    w_ptrs = w_ptr + offs_n[None, :].to(tl.int64) * stride_wn + offs_k[:, None] * stride_wk
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k in range(0, K, BLOCK_K):
        k_ok = offs_k < K - k
        a = tl.load(x_ptrs, mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        b = tl.load(w_ptrs, mask=k_ok[:, None] & n_ok[None, :], other=0.0)
        if IEEE:  # float32: no TF32, for parity with the reference
            acc = tl.dot(a, b, acc, input_precision="ieee")
        else:
            acc = tl.dot(a.to(b.dtype), b, acc)
        x_ptrs += BLOCK_K * stride_xk
        w_ptrs += BLOCK_K * stride_wk
    if HAS_BIAS:
        acc += tl.load(b_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    y_ptrs = y_ptr + offs_m[:, None].to(tl.int64) * stride_ym + offs_n[None, :] * stride_yn
    tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


def gemm(y: Tensor, x: Tensor, w: Tensor, bias: Tensor | None, config: GemmConfig, weight_layout: str = "out_in") -> None:
    """y = x @ w^T (+ bias) by the Triton kernel (w [N, K], or [K, N] when weight_layout is
    "in_out"); x and y are 2-D."""
    m, k = x.shape
    n = w.shape[0] if weight_layout == "out_in" else w.shape[1]
    swn, swk = w.stride() if weight_layout == "out_in" else w.stride()[::-1]
    c = config
    grid = (triton.cdiv(m, c.block_m) * triton.cdiv(n, c.block_n),)
    _gemm_kernel[grid](
        x, w, bias if bias is not None else w, y, m, n, k,
        *x.stride(), swn, swk, *y.stride(),
        HAS_BIAS=bias is not None, IEEE=w.dtype == torch.float32,
        BLOCK_M=c.block_m, BLOCK_N=c.block_n, BLOCK_K=c.block_k, GROUP_M=c.group_m,
        num_warps=c.num_warps, num_stages=c.num_stages, **pdl.options(x),
    )


CONFIGS: dict[str, type] = {"triton": GemmConfig, "gemv": GemvConfig}
"""Each Triton provider's config type (the "torch" provider takes none)."""


@dataclass(frozen=True)
class LinearChoice:
    """What runs a weight shape's calls of at most `max_m` rows: "torch" (cuBLAS), or "triton"
    (the GEMM) or "gemv" with `config`."""

    max_m: int
    provider: str
    config: GemmConfig | GemvConfig | None = None

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"max_m": self.max_m, "provider": self.provider}
        if self.config is not None:
            out["config"] = asdict(self.config)
        return out


def parse_table(table: Mapping[str, Any]) -> dict[tuple[int, int], tuple[LinearChoice, ...]]:
    """tuning.json's "linear" entries ({"KxN": [{"max_m", "provider", "config"}, ...]}) as
    choices sorted by max_m; ValueError naming what is malformed."""
    out: dict[tuple[int, int], tuple[LinearChoice, ...]] = {}
    for key, rows in table.items():
        try:
            k, n = (int(v) for v in key.split("x"))
            choices = tuple(sorted((LinearChoice(int(r["max_m"]), r["provider"],
                                                 CONFIGS[r["provider"]](**r["config"]) if r.get("config") else None)
                                    for r in rows), key=lambda c: c.max_m))
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"tuning.json: linear entry {key!r} is malformed ({e})") from e
        for c in choices:
            if c.provider not in ("torch", *CONFIGS) or (c.provider in CONFIGS) != (c.config is not None):
                raise ValueError(f"tuning.json: linear entry {key!r} has a bad choice {c.to_json()}")
        out[(k, n)] = choices
    return out


def run_choice(choice: LinearChoice, y: Tensor, x: Tensor, w: Tensor, bias: Tensor | None,
               weight_layout: str) -> bool:
    """Run a Triton choice ("triton" or "gemv") on these operands; False (nothing run) for
    "torch" or operands the GEMV cannot read."""
    if choice.provider == "triton":
        gemm(y, x, w, bias, choice.config, weight_layout)
        return True
    if choice.provider == "gemv" and supports(x, w, y, weight_layout):
        gemv(y, x, w, bias, choice.config)
        return True
    return False


def make_launchers(table: Mapping[str, Any] | None = None) -> dict[str, Launcher]:
    """The `linear` and `gated_linear` launchers: cuBLAS through torch, except where `table`
    (tuning.json's "linear") chose the Triton GEMM or GEMV for a weight shape and bucket of M.
    gated_linear runs the GEMV with the activation fused where the GEMV was chosen, else the
    gated kernel into its second result and then linear's choice."""
    choices = parse_table(table or {})
    vendor = torch_launcher("linear")

    @functools.lru_cache(maxsize=4096)
    def choose(k: int, n: int, m: int) -> LinearChoice | None:
        rows = choices.get((k, n), ())
        # the first bucket holding m; past the last bound, the last bucket's choice
        return next((c for c in rows if m <= c.max_m), rows[-1] if rows else None)

    def launch(outs: list[Tensor], args: list[Any], attrs: dict[str, Any]) -> None:
        x, w, *bias = args
        if x.dim() == 2 and choices:
            choice = choose(x.shape[1], outs[0].shape[1], x.shape[0])
            if choice is not None and run_choice(choice, outs[0], x, w, bias[0] if bias else None,
                                                 attrs.get("weight_layout", "out_in")):
                return
        vendor(outs, args, attrs)

    def launch_gated_linear(outs: list[Tensor], args: list[Any], attrs: dict[str, Any]) -> None:
        x, w, *bias = args
        y, h = outs
        act = act_code(attrs["gate"], attrs.get("approximate"))
        if x.dim() == 2 and choices:
            choice = choose(w.shape[1], w.shape[0], x.shape[0])
            if choice is not None and choice.provider == "gemv" and supports(x, w, y, "out_in"):
                gemv(y, x, w, bias[0] if bias else None, choice.config, act)
                return
        launch_gated([h], [x], act)
        launch([y], [h, w, *bias], {})

    return {"linear": launch, "gated_linear": launch_gated_linear}


def make_launcher(table: Mapping[str, Any] | None = None) -> Launcher:
    """The `linear` launcher of `make_launchers`."""
    return make_launchers(table)["linear"]


def from_tuning(entry: Mapping[str, Any]) -> dict[str, Launcher]:
    """The launchers that tuning.json's linear entry chose (see `parse_table`)."""
    return make_launchers(entry)


LAUNCHERS: dict[str, Launcher] = make_launchers()

__all__ = ["BUCKETS", "CONFIGS", "KNOBS", "LAUNCHERS", "GemmConfig", "GemvConfig", "LinearChoice", "from_tuning", "gemm",
           "make_launcher", "make_launchers", "parse_table", "run_choice"]
