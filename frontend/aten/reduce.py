"""Reductions and ops along one axis."""

from __future__ import annotations

from typing import Any

from kiln.frontend.aten.table import Converter, conv
from kiln.ir.graph import Node
from kiln.ir.types import dtype_name

# -- reductions ------------------------------------------------------------------------------


def _dims(cv: Converter, x: Node, dims: Any) -> list[int]:
    if dims is None or dims == []:
        return list(range(x.type.rank))
    dims = [dims] if isinstance(dims, int) else dims
    return sorted(cv.axis(d, x.type.rank) for d in dims)


@conv("mean", "sum", "amax", "amin")
def _reduce(cv: Converter, a: dict, val: Any) -> Node:
    op = cv.op_name()
    x = a["self"]
    attrs: dict[str, Any] = {"dims": _dims(cv, x, a.get("dim")), "keepdim": bool(a.get("keepdim", False))}
    if a.get("dtype") is not None:
        attrs["dtype"] = dtype_name(a["dtype"])
    return cv.emit(op, [x], **attrs)


@conv("logsumexp")
def _logsumexp(cv: Converter, a: dict, val: Any) -> Node:
    x = a["self"]
    return cv.emit("logsumexp", [x], dims=_dims(cv, x, a.get("dim")), keepdim=bool(a.get("keepdim")))


@conv("linalg_vector_norm", "norm")
def _vector_norm(cv: Converter, a: dict, val: Any) -> Node:
    x = a["self"]
    ord_ = a.get("ord", a.get("p", 2))
    ord_ = 2.0 if ord_ is None else float(ord_)
    return cv.emit("vector_norm", [x], ord=ord_, dims=_dims(cv, x, a.get("dim")), keepdim=bool(a.get("keepdim")))


@conv("var")
def _var(cv: Converter, a: dict, val: Any) -> Node:
    x = a["self"]
    correction = a.get("correction")
    correction = 1 if correction is None and a.get("unbiased", True) else correction or 0
    return cv.emit("var", [x], dims=_dims(cv, x, a.get("dim")), keepdim=bool(a.get("keepdim")), correction=correction)


@conv("max", "min")
def _max(cv: Converter, a: dict, val: Any) -> Any:
    x = a["self"]
    name = cv.op_name()
    if a.get("other") is not None:
        return cv.emit("maximum" if name == "max" else "minimum", [x, cv.tensor(a["other"])])
    if a.get("dim") is None:
        return cv.emit("amax" if name == "max" else "amin", [x], dims=list(range(x.type.rank)), keepdim=False)
    if name == "min":
        raise cv.unsupported(hint="min along a dim with indices is not supported")
    dim = cv.axis(a["dim"], x.type.rank)
    keep = bool(a.get("keepdim"))
    return tuple(cv.emit("max_dim", [x], dim=dim, keepdim=keep, output=i) for i in range(2))


@conv("argmax")
def _argmax(cv: Converter, a: dict, val: Any) -> Node:
    if a.get("dim") is None:
        raise cv.unsupported(hint="argmax over all elements is not supported")
    return cv.emit("argmax", [a["self"]], dim=cv.axis(a["dim"], a["self"].type.rank), keepdim=bool(a["keepdim"]))


@conv("softmax", "_softmax", "log_softmax", "_log_softmax")
def _softmax(cv: Converter, a: dict, val: Any) -> Node:
    name = cv.op_name().lstrip("_")
    x = a["self"]
    attrs: dict[str, Any] = {"dim": cv.axis(a["dim"], x.type.rank)}
    if dtype_name(val.dtype) != x.type.dtype:
        attrs["dtype"] = dtype_name(val.dtype)
    return cv.emit(name, [x], **attrs)


@conv("cumsum")
def _cumsum(cv: Converter, a: dict, val: Any) -> Node:
    x = a["self"]
    attrs: dict[str, Any] = {"dim": cv.axis(a["dim"], x.type.rank)}
    if dtype_name(val.dtype) != x.type.dtype:
        attrs["dtype"] = dtype_name(val.dtype)
    return cv.emit("cumsum", [x], **attrs)


@conv("topk")
def _topk(cv: Converter, a: dict, val: Any) -> tuple[Node, Node]:
    x = a["self"]
    attrs = {"k": a["k"], "dim": cv.axis(a["dim"], x.type.rank), "largest": a["largest"], "sorted": a["sorted"]}
    return tuple(cv.emit("topk", [x], **attrs, output=i) for i in range(2))


@conv("sort")
def _sort(cv: Converter, a: dict, val: Any) -> tuple[Node, Node]:
    x = a["self"]
    attrs = {"dim": cv.axis(a["dim"], x.type.rank), "descending": bool(a["descending"])}
    return tuple(cv.emit("sort", [x], **attrs, output=i) for i in range(2))
