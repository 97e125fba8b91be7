"""The cuda target's GEMV: `linear` of a few rows (decode steps), where reading the weight once
at the memory's speed is the whole cost.

    x [M, K] (unit stride along K)   w [N, K] (contiguous rows)   bias [N]
    y [M, N] = x @ w^T (+ bias), accumulated in float32, rounded once to y's dtype

A program owns BLOCK_N weight rows and BLOCK_M rows of x (grid: N / BLOCK_N x M / BLOCK_M;
a bucket of at most BLOCK_M rows is one row tile, so each weight row is read once):

    acc [BLOCK_M, BLOCK_N, BLOCK_K] = 0                 float32, in registers
    (the first weight tile loads before the PDL wait: see pdl.py)
    for k0 in 0, BLOCK_K, ... < K:
        w = W[n0 : n0 + BLOCK_N, k0 : k0 + BLOCK_K]     streamed (evict first)
        acc += x[m0 : m0 + BLOCK_M, None, k0 : ...] * w[None]   (no reduction in the loop)
    y[m, n] = sum over the last axis of acc

With ACT set (the fused `gated_linear`), x is a gated activation's input [M, 2K] = [gate | up]
and each loaded chunk becomes act(gate) * up first (elementwise.gated_value, rounded to x's
dtype as the separate kernel writes it), so the activation is never written to memory.

Unlike a tensor-core tile (16 rows at least, mostly padding at batch 1) and unlike cuBLAS's
split-K GEMV (a second kernel that reduces the partial sums), every program streams whole rows
and the grid alone spreads the weight over the GPU.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import triton
import triton.language as tl

from kiln.kernels.triton_kernels import pdl
from kiln.kernels.triton_kernels.elementwise import gated_value

Tensor = torch.Tensor

MAX_REGS = 64
"""float32 accumulators per thread a config may hold (BLOCK_M * BLOCK_N * BLOCK_K / threads)."""


@dataclass(frozen=True)
class GemvConfig:
    """The knobs of the GEMV (block_m: rows of x per program, the bucket's bound)."""

    block_m: int = 1
    block_n: int = 4
    block_k: int = 512
    num_warps: int = 4
    num_stages: int = 1

    def fits(self) -> bool:
        """Whether its accumulators fit MAX_REGS per thread and each thread loads 16 bytes or more."""
        threads = 32 * self.num_warps
        return self.block_m * self.block_n * self.block_k <= MAX_REGS * threads \
            and self.block_n * self.block_k >= 8 * threads


KNOBS: dict[str, tuple[Any, ...]] = {
    "block_n": (2, 4, 8, 16, 32),
    "block_k": (256, 512, 1024),
    "num_warps": (4, 8),
}
"""The search space of the GEMV's knobs for the autotuner (block_m is the bucket's bound)."""

MAX_M = 4
"""The largest bucket the GEMV is timed on (a larger one is a tensor-core GEMM's)."""


@triton.jit
def _load_w(w_ptrs, n_ok, k_ok, EVEN: tl.constexpr):
    if EVEN:  # N % BLOCK_N == 0 and K % BLOCK_K == 0: no masks on the weight
        return tl.load(w_ptrs, eviction_policy="evict_first")
    else:
        return tl.load(w_ptrs, mask=n_ok[:, None] & k_ok[None, :], other=0.0, eviction_policy="evict_first")


@triton.jit
def _accumulate(acc, w, x_ptrs, x_ok, K, ACT: tl.constexpr):
    """acc += this chunk's x (act(gate) * up when ACT >= 0) times its weight tile."""
    x = tl.load(x_ptrs, mask=x_ok, other=0.0).to(tl.float32)
    if ACT >= 0:  # x holds [gate | up]: this chunk's act(gate) * up, in x's dtype
        up = tl.load(x_ptrs + K, mask=x_ok, other=0.0).to(tl.float32)
        x = gated_value(x, up, ACT, x_ptrs.dtype.element_ty).to(x_ptrs.dtype.element_ty).to(tl.float32)
    return acc + x[:, None, :] * w.to(tl.float32)[None, :, :]


@triton.jit(do_not_specialize=["M"])
def _gemv_kernel(
    x_ptr, w_ptr, b_ptr, y_ptr, M, N, K, stride_xm, stride_wn, stride_ym,
    HAS_BIAS: tl.constexpr, EVEN: tl.constexpr, ACT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PDL: tl.constexpr,
):
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_k = tl.arange(0, BLOCK_K)
    m_ok = offs_m < M
    n_ok = offs_n < N
    w_ptrs = w_ptr + offs_n[:, None].to(tl.int64) * stride_wn + offs_k[None, :]
    x_ptrs = x_ptr + offs_m[:, None].to(tl.int64) * stride_xm + offs_k[None, :]
    # The first weight tile streams in while the kernel before this one finishes (weights are
    # never written); x is that kernel's output, read after the wait.
    w = _load_w(w_ptrs, n_ok, offs_k < K, EVEN)
    pdl.wait(PDL)
    acc = tl.zeros([BLOCK_M, BLOCK_N, BLOCK_K], dtype=tl.float32)
    acc = _accumulate(acc, w, x_ptrs, m_ok[:, None] & (offs_k < K)[None, :], K, ACT)
    for k in range(BLOCK_K, K, BLOCK_K):
        k_ok = offs_k < K - k
        w = _load_w(w_ptrs + k, n_ok, k_ok, EVEN)
        acc = _accumulate(acc, w, x_ptrs + k, m_ok[:, None] & k_ok[None, :], K, ACT)
    y = tl.sum(acc, axis=2)
    if HAS_BIAS:
        y += tl.load(b_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    y_ptrs = y_ptr + offs_m[:, None].to(tl.int64) * stride_ym + offs_n[None, :]
    tl.store(y_ptrs, y.to(y_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


def supports(x: Tensor, w: Tensor, y: Tensor, weight_layout: str) -> bool:
    """Whether the GEMV reads these operands as they are: an out_in weight of contiguous rows,
    x and y of unit stride along their last axis."""
    return weight_layout == "out_in" and w.stride(1) == 1 and x.stride(1) == 1 and y.stride(1) == 1


def gemv(y: Tensor, x: Tensor, w: Tensor, bias: Tensor | None, config: GemvConfig, act: int = -1) -> None:
    """y = x @ w^T (+ bias) by the GEMV (operands as `supports` says; x and y 2-D); with act >= 0
    (elementwise.gated_value's code) y = (act(x[:, :K]) * x[:, K:]) @ w^T (+ bias)."""
    m, k = x.shape[0], w.shape[1]
    if x.shape[1] != (2 * k if act >= 0 else k):
        raise ValueError(f"gemv of x {tuple(x.shape)} by w {tuple(w.shape)}" + (" after a gated activation" if act >= 0 else ""))
    n = w.shape[0]
    c = config
    grid = (triton.cdiv(n, c.block_n), triton.cdiv(m, c.block_m))
    _gemv_kernel[grid](
        x, w, bias if bias is not None else w, y, m, n, k, x.stride(0), w.stride(0), y.stride(0),
        HAS_BIAS=bias is not None, EVEN=n % c.block_n == 0 and k % c.block_k == 0, ACT=act,
        BLOCK_M=c.block_m, BLOCK_N=c.block_n, BLOCK_K=c.block_k,
        num_warps=c.num_warps, num_stages=c.num_stages, **pdl.options(x),
    )


__all__ = ["KNOBS", "MAX_M", "GemvConfig", "gemv", "supports"]
