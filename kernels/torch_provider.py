"""The `torch` provider: every IR op's torch reference, run into destination buffers.

Hot ops call torch's `out=` variants (the same kernels as the reference, so results are
identical); every other op runs its reference and copies the result into the destination
(`out.copy_(result)`). An in-place op (kv_cache_write) writes its operands, which are its
destinations, so nothing is copied. Ops that make a tensor from nothing (arange, full) get the
destination's device.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import torch

from kiln.ir.ops import OPS, OpDef
from kiln.kernels import Launcher

PREFIX = "torch"

Tensor = torch.Tensor


def _store(outs: list[Tensor], result: Any) -> None:
    results = result if isinstance(result, tuple | list) else (result,)
    for out, r in zip(outs, results, strict=True):
        if r is out:
            continue
        if isinstance(r, Tensor):
            out.copy_(r)
        else:
            out.fill_(r)


def _reference(op: OpDef) -> Launcher:
    impl = op.impl

    if op.device_arg:
        def launch(outs: list[Tensor], args: list[Any], attrs: dict[str, Any]) -> None:
            _store(outs, impl(*args, device=outs[0].device, **attrs))
    else:
        def launch(outs: list[Tensor], args: list[Any], attrs: dict[str, Any]) -> None:
            _store(outs, impl(*args, **attrs))

    return launch


# -- out= launchers ---------------------------------------------------------------------------


def _linear(outs: list[Tensor], args: list[Any], attrs: dict[str, Any]) -> None:
    # On a 2-D input the reference is addmm(bias, x, w.T) or mm(x, w.T) (F.linear), or
    # mm(x, w) (+ bias) for an [in, out] weight: the same kernels, into the destination (a
    # panels weight, which no torch kernel reads as it is, through the reference).
    x, w, *bias = args
    if x.dim() != 2 or attrs.get("weight_layout") == "panels":
        outs[0].copy_(OPS["linear"].impl(*args, **attrs))
    elif attrs.get("weight_layout", "out_in") == "in_out":
        torch.mm(x, w, out=outs[0])
        if bias:
            outs[0].add_(bias[0])
    elif bias:
        torch.addmm(bias[0], x, w.t(), out=outs[0])
    else:
        torch.mm(x, w.t(), out=outs[0])


def _matmul(outs: list[Tensor], args: list[Any], attrs: dict[str, Any]) -> None:
    torch.matmul(args[0], args[1], out=outs[0])


def _embedding(outs: list[Tensor], args: list[Any], attrs: dict[str, Any]) -> None:
    weight, ids = args
    if ids.dim() == 1:
        torch.index_select(weight, 0, ids, out=outs[0])
    else:
        outs[0].copy_(OPS["embedding"].impl(weight, ids))


def _binary(fn: Callable[..., Tensor], name: str, commutative: bool) -> Launcher:
    ref = OPS[name].impl

    def launch(outs: list[Tensor], args: list[Any], attrs: dict[str, Any]) -> None:
        a, b = args
        if isinstance(a, Tensor):
            fn(a, b, out=outs[0])
        elif commutative and isinstance(b, Tensor):
            fn(b, a, out=outs[0])
        else:
            _store(outs, ref(a, b))

    return launch


def _unary(fn: Callable[..., Tensor], name: str) -> Launcher:
    ref = OPS[name].impl

    def launch(outs: list[Tensor], args: list[Any], attrs: dict[str, Any]) -> None:
        if isinstance(args[0], Tensor):
            fn(args[0], out=outs[0])
        else:
            _store(outs, ref(*args))

    return launch


def _reduce(fn: Callable[..., Tensor], name: str) -> Launcher:
    ref = OPS[name].impl

    def launch(outs: list[Tensor], args: list[Any], attrs: dict[str, Any]) -> None:
        if attrs.get("dtype") is None:
            fn(args[0], dim=attrs["dims"], keepdim=attrs["keepdim"], out=outs[0])
        else:
            outs[0].copy_(ref(*args, **attrs))

    return launch


def _div(outs: list[Tensor], args: list[Any], attrs: dict[str, Any]) -> None:
    if attrs.get("rounding_mode") is None and isinstance(args[0], Tensor):
        torch.div(args[0], args[1], out=outs[0])
    else:
        _store(outs, OPS["div"].impl(*args, **attrs))


def _cast(outs: list[Tensor], args: list[Any], attrs: dict[str, Any]) -> None:
    if isinstance(args[0], Tensor):
        outs[0].copy_(args[0])
    else:
        outs[0].fill_(args[0])


def _index_select(outs: list[Tensor], args: list[Any], attrs: dict[str, Any]) -> None:
    torch.index_select(args[0], attrs["dim"], args[1], out=outs[0])


def _gather_rows(outs: list[Tensor], args: list[Any], attrs: dict[str, Any]) -> None:
    torch.index_select(args[0], 0, args[1], out=outs[0])


def _cat(outs: list[Tensor], args: list[Any], attrs: dict[str, Any]) -> None:
    torch.cat(args, dim=attrs["dim"], out=outs[0])


def _arange(outs: list[Tensor], args: list[Any], attrs: dict[str, Any]) -> None:
    torch.arange(attrs["start"], attrs["end"], attrs["step"], out=outs[0])


def _full(outs: list[Tensor], args: list[Any], attrs: dict[str, Any]) -> None:
    outs[0].fill_(attrs["value"])


def _reshape(outs: list[Tensor], args: list[Any], attrs: dict[str, Any]) -> None:
    # A reshape that cannot be a view: copy the elements in order into the destination.
    outs[0].view(args[0].shape).copy_(args[0])


_OUT: dict[str, Launcher] = {
    "linear": _linear,
    "matmul": _matmul,
    "embedding": _embedding,
    "div": _div,
    "cast": _cast,
    "index_select": _index_select,
    "gather_rows": _gather_rows,
    "cat": _cat,
    "arange": _arange,
    "full": _full,
    "reshape": _reshape,
    **{n: _binary(f, n, c) for n, f, c in (
        ("add", torch.add, True), ("mul", torch.mul, True), ("sub", torch.sub, False),
        ("pow", torch.pow, False),
    )},
    **{n: _unary(getattr(torch, n), n) for n in (
        "neg", "exp", "log", "sqrt", "rsqrt", "sin", "cos", "tanh", "sigmoid", "abs", "reciprocal", "erf",
    )},
    **{n: _reduce(getattr(torch, n), n) for n in ("sum", "mean", "amax", "amin")},
}


@functools.cache
def launcher(name: str) -> Launcher | None:
    """The launcher of IR op `name`, or None when no op has that name."""
    if name in _OUT:
        return _OUT[name]
    op = OPS.get(name)
    if op is None or name == "get_result":
        return None
    return _reference(op)
