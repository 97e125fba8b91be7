"""Views, slicing, concatenation and indexing."""

from __future__ import annotations

from typing import Any

from kiln.frontend.aten.table import BIG, Converter, conv, reshape
from kiln.ir.dims import Dim, from_expr, to_expr
from kiln.ir.graph import Node

# -- shapes ----------------------------------------------------------------------------------


@conv("sym_size")
def _sym_size(cv: Converter, a: dict, val: Any) -> Dim:
    return a["self"].type.shape[a["dim"]]


@conv("view", "reshape", "_unsafe_view")
def _view(cv: Converter, a: dict, val: Any) -> Node:
    sizes = a["size"] if a.get("size") is not None else a["shape"]
    return reshape(cv, a["self"], [cv.dim(d) for d in sizes])


@conv("unsqueeze", "squeeze", "flatten", "unflatten", "view_as")
def _to_fake_shape(cv: Converter, a: dict, val: Any) -> Node:
    return reshape(cv, a["self"], [cv.dim(d) for d in val.shape])


@conv("transpose")
def _transpose(cv: Converter, a: dict, val: Any) -> Node:
    x = a["self"]
    dims = list(range(x.type.rank))
    i, j = cv.axis(a["dim0"], x.type.rank), cv.axis(a["dim1"], x.type.rank)
    dims[i], dims[j] = dims[j], dims[i]
    return cv.emit("permute", [x], dims=dims)


@conv("t")
def _t(cv: Converter, a: dict, val: Any) -> Node:
    x = a["self"]
    return cv.emit("permute", [x], dims=list(range(x.type.rank))[::-1])


@conv("permute")
def _permute(cv: Converter, a: dict, val: Any) -> Node:
    x = a["self"]
    return cv.emit("permute", [x], dims=[cv.axis(d, x.type.rank) for d in a["dims"]])


@conv("expand")
def _expand(cv: Converter, a: dict, val: Any) -> Node:
    return cv.emit("expand", [a["self"]], shape=[cv.dim(d) for d in val.shape])


@conv("expand_as")
def _expand_as(cv: Converter, a: dict, val: Any) -> Node:
    return cv.emit("expand", [a["self"]], shape=list(a["other"].type.shape))


def _bound(cv: Converter, v: Any, size: Dim, default: Dim) -> Dim:
    if v is None:
        return default
    v = cv.dim(v)
    if isinstance(v, int):
        if v >= BIG:
            return size
        if v < 0:
            return from_expr(to_expr(size) + v)
        if isinstance(size, int):
            return min(v, size)
    return v


def _slice(cv: Converter, x: Node, dim: int, start: Any, end: Any, step: int = 1) -> Node:
    dim = cv.axis(dim, x.type.rank)
    size = x.type.shape[dim]
    return cv.emit("slice", [x], dim=dim, start=_bound(cv, start, size, 0), end=_bound(cv, end, size, size), step=step)


@conv("slice")
def _slice_conv(cv: Converter, a: dict, val: Any) -> Node:
    out = _slice(cv, a["self"], a["dim"], a["start"], a["end"], a["step"])
    cv.record_view(cv.fx_node.args[0], out)
    return out


@conv("copy")
def _copy(cv: Converter, a: dict, val: Any) -> Node:
    """``dst.copy_(src)``: ``src`` cast and broadcast to ``dst``; the converter writes it back
    into whatever ``dst`` is a slice of (Converter.write_back)."""
    dst, src = a["self"], cv.tensor(a["src"])
    if src.type.dtype != dst.type.dtype:
        src = cv.emit("cast", [src], dtype=dst.type.dtype)
    if not src.type.same_as(dst.type):
        src = cv.emit("expand", [src], shape=list(dst.type.shape))
    return src


@conv("narrow")
def _narrow(cv: Converter, a: dict, val: Any) -> Node:
    start = cv.dim(a["start"])
    return _slice(cv, a["self"], a["dim"], start, from_expr(to_expr(start) + to_expr(cv.dim(a["length"]))))


@conv("select")
def _select(cv: Converter, a: dict, val: Any) -> Node:
    x, dim, i = a["self"], cv.axis(a["dim"], a["self"].type.rank), cv.dim(a["index"])
    end = from_expr(to_expr(i) + 1) if not (isinstance(i, int) and i == -1) else BIG
    sl = _slice(cv, x, dim, i, end)
    return reshape(cv, sl, [d for k, d in enumerate(sl.type.shape) if k != dim])


def _pieces(cv: Converter, x: Node, sizes: list[Dim], dim: int) -> tuple[Node, ...]:
    out, start = [], 0
    for s in sizes:
        end = from_expr(to_expr(start) + to_expr(s))
        out.append(_slice(cv, x, dim, start, end))
        start = end
    return tuple(out)


@conv("split", "split_with_sizes")
def _split(cv: Converter, a: dict, val: Any) -> tuple[Node, ...]:
    x = a["self"]
    dim = cv.axis(a["dim"], x.type.rank)
    sizes = [cv.dim(v.shape[dim]) for v in val]
    return _pieces(cv, x, sizes, dim)


@conv("chunk", "unsafe_chunk")
def _chunk(cv: Converter, a: dict, val: Any) -> tuple[Node, ...]:
    x = a["self"]
    dim = cv.axis(a["dim"], x.type.rank)
    return _pieces(cv, x, [cv.dim(v.shape[dim]) for v in val], dim)


@conv("unbind")
def _unbind(cv: Converter, a: dict, val: Any) -> tuple[Node, ...]:
    x = a["self"]
    dim = cv.axis(a["dim"], x.type.rank)
    parts = _pieces(cv, x, [1] * len(val), dim)
    return tuple(reshape(cv, p, [d for k, d in enumerate(p.type.shape) if k != dim]) for p in parts)


@conv("cat", "concat")
def _cat(cv: Converter, a: dict, val: Any) -> Node:
    xs = [t for t in a["tensors"] if not (t.type.rank == 1 and t.type.shape[0] == 0)]
    return cv.emit("cat", xs, dim=cv.axis(a["dim"], xs[0].type.rank))


@conv("stack")
def _stack(cv: Converter, a: dict, val: Any) -> Node:
    xs = a["tensors"]
    dim = cv.axis(a["dim"], xs[0].type.rank + 1)
    parts = [reshape(cv, x, [*x.type.shape[:dim], 1, *x.type.shape[dim:]]) for x in xs]
    return cv.emit("cat", parts, dim=dim)


@conv("index")
def _index(cv: Converter, a: dict, val: Any) -> Node:
    axes = [i for i, t in enumerate(a["indices"]) if t is not None]
    idx = [t for t in a["indices"] if t is not None]
    return cv.emit("index", [a["self"], *idx], axes=axes)


@conv("index_select")
def _index_select(cv: Converter, a: dict, val: Any) -> Node:
    return cv.emit("index_select", [a["self"], a["index"]], dim=cv.axis(a["dim"], a["self"].type.rank))


@conv("gather")
def _gather(cv: Converter, a: dict, val: Any) -> Node:
    return cv.emit("gather", [a["self"], a["index"]], dim=cv.axis(a["dim"], a["self"].type.rank))


@conv("scatter_add")
def _scatter_add(cv: Converter, a: dict, val: Any) -> Node:
    return cv.emit("scatter_add", [a["self"], a["index"], a["src"]], dim=cv.axis(a["dim"], a["self"].type.rank))


@conv("scatter")
def _scatter(cv: Converter, a: dict, val: Any) -> Node:
    if a.get("reduce") is not None:
        raise cv.unsupported(hint="scatter with a reduce mode is not supported")
    x = a["self"]
    src = a.get("src")
    if src is None:  # scatter.value: one scalar written everywhere index points
        src = cv.emit("full_like", [a["index"]], value=a["value"], dtype=x.type.dtype)
    return cv.emit("scatter", [x, a["index"], src], dim=cv.axis(a["dim"], x.type.rank))


@conv("repeat_interleave")
def _repeat_interleave(cv: Converter, a: dict, val: Any) -> Node:
    if not isinstance(a.get("repeats"), int) or a.get("dim") is None:
        raise cv.unsupported(hint="repeat_interleave needs an integer repeat count and a dim")
    x = a["self"]
    return cv.emit("repeat_interleave", [x], repeats=a["repeats"], dim=cv.axis(a["dim"], x.type.rank))


@conv("flip")
def _flip(cv: Converter, a: dict, val: Any) -> Node:
    return cv.emit("flip", [a["self"]], dims=[cv.axis(d, a["self"].type.rank) for d in a["dims"]])


@conv("tril", "triu")
def _tri(cv: Converter, a: dict, val: Any) -> Node:
    op = cv.op_name().rstrip("_")
    return cv.emit(op, [a["self"]], diagonal=a["diagonal"])
