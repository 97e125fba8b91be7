"""Projections, matmuls, embeddings, norms and attention."""

from __future__ import annotations

import math
from typing import Any

import torch

from kiln.frontend.aten.table import Converter, conv, reshape
from kiln.ir.graph import Node
from kiln.ir.types import dtype_name, torch_dtype

# -- neural-network ops ----------------------------------------------------------------------


@conv("linear")
def _linear(cv: Converter, a: dict, val: Any) -> Node:
    inputs = [a["input"], a["weight"]] + ([a["bias"]] if a.get("bias") is not None else [])
    return cv.emit("linear", inputs)


@conv("addmm")
def _addmm(cv: Converter, a: dict, val: Any) -> Node:
    if a.get("beta", 1) != 1 or a.get("alpha", 1) != 1:
        raise cv.unsupported(hint="addmm with beta/alpha other than 1 is not supported")
    w = cv.emit("permute", [a["mat2"]], dims=[1, 0])
    return cv.emit("linear", [a["mat1"], w, a["self"]])


@conv("mm", "bmm", "matmul")
def _matmul(cv: Converter, a: dict, val: Any) -> Node:
    return cv.emit("matmul", [a["self"], a.get("mat2", a.get("other"))])


@conv("baddbmm")
def _baddbmm(cv: Converter, a: dict, val: Any) -> Node:
    prod = cv.emit("matmul", [a["batch1"], a["batch2"]])
    if a.get("alpha", 1) != 1:
        prod = cv.emit("mul", [prod, cv.tensor(a["alpha"])])
    if a.get("beta", 1) == 0:
        return prod
    base = a["self"] if a.get("beta", 1) == 1 else cv.emit("mul", [a["self"], cv.tensor(a["beta"])])
    return cv.emit("add", [base, prod])


@conv("einsum")
def _einsum(cv: Converter, a: dict, val: Any) -> Node:
    return cv.emit("einsum", list(a["tensors"]), equation=a["equation"])


@conv("outer")
def _outer(cv: Converter, a: dict, val: Any) -> Node:
    x, y = a["self"], a["vec2"]
    col = reshape(cv, x, [x.type.shape[0], 1])
    return cv.emit("mul", [col, y])


@conv("repeat")
def _repeat(cv: Converter, a: dict, val: Any) -> Node:
    return cv.emit("repeat", [a["self"]], repeats=[cv.dim(r) for r in a["repeats"]])


@conv("fill")
def _fill(cv: Converter, a: dict, val: Any) -> Node:
    if isinstance(a["value"], Node):
        raise cv.unsupported(hint="fill with a tensor value is not supported")
    return cv.emit("full_like", [a["self"]], value=a["value"], dtype=dtype_name(val.dtype))


@conv("embedding")
def _embedding(cv: Converter, a: dict, val: Any) -> Node:
    return cv.emit("embedding", [a["weight"], a["indices"]])


@conv("layer_norm")
def _layer_norm(cv: Converter, a: dict, val: Any) -> Node:
    w, b = a.get("weight"), a.get("bias")
    inputs = [a["input"]] + [t for t in (w, b) if t is not None]
    return cv.emit("layer_norm", inputs, normalized_shape=list(a["normalized_shape"]), eps=float(a["eps"]),
                   has_weight=w is not None, has_bias=b is not None)


@conv("rms_norm")
def _rms_norm(cv: Converter, a: dict, val: Any) -> Node:
    x = a["input"]
    eps = a.get("eps")
    if eps is None:
        eps = float(torch.finfo(torch_dtype(x.type.dtype)).eps)
    inputs = [x] + ([a["weight"]] if a.get("weight") is not None else [])
    return cv.emit("rms_norm", inputs, normalized_shape=list(a["normalized_shape"]), eps=float(eps))


@conv("attention")
def _attention(cv: Converter, a: dict, val: Any) -> Node:
    # q/k/v arrive as [B, H, T, D] (transformers' layout); the IR's attention takes [B, T, H, D].
    q, k, v = (cv.emit("permute", [a[n]], dims=[0, 2, 1, 3]) for n in ("q", "k", "v"))
    inputs = [q, k, v, cv.cu_seqlens()]
    if a.get("sinks") is not None:
        inputs.append(a["sinks"])
    scale = float(a["scale"])
    if not math.isfinite(scale):
        raise cv.unsupported(hint=f"attention scale {scale} is not finite")
    return cv.emit("attention", inputs, scale=scale, causal=bool(a["causal"]),
                   sliding_window=int(a["sliding_window"]), softcap=float(a["softcap"]))
