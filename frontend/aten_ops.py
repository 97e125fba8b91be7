"""aten op -> kiln IR, one small converter per aten op (keyed by its schema name).

Each converter receives the Converter, the call's arguments bound by schema name, and torch's
fake value of the result (used only for dtypes of factory ops). Arguments that are tensors
arrive as IR nodes, sizes as ints or symbolic dims.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch

from kiln.frontend.convert import Converter
from kiln.ir.dims import Dim, from_expr, to_expr
from kiln.ir.graph import Node
from kiln.ir.types import dtype_name, torch_dtype

Conv = Callable[[Converter, dict[str, Any], Any], Any]
TABLE: dict[str, Conv] = {}

_BIG = 1 << 62


def conv(*names: str) -> Callable[[Conv], Conv]:
    def deco(fn: Conv) -> Conv:
        for n in names:
            TABLE[n] = fn
        return fn

    return deco


def _reshape(cv: Converter, x: Node, shape: list[Dim]) -> Node:
    return cv.emit("reshape", [x], shape=list(shape))


# -- elementwise -----------------------------------------------------------------------------

_UNARY = {
    "neg": "neg", "exp": "exp", "log": "log", "sqrt": "sqrt", "rsqrt": "rsqrt", "sin": "sin",
    "cos": "cos", "tanh": "tanh", "sigmoid": "sigmoid", "silu": "silu", "relu": "relu",
    "abs": "abs", "reciprocal": "reciprocal", "erf": "erf", "floor": "floor", "ceil": "ceil",
    "logical_not": "logical_not", "bitwise_not": "logical_not", "sign": "sign", "square": "square",
    "log1p": "log1p", "expm1": "expm1", "exp2": "exp2", "mish": "mish", "hardswish": "hardswish",
    "hardsigmoid": "hardsigmoid", "isnan": "isnan", "isinf": "isinf",
}
for _aten, _op in _UNARY.items():
    TABLE[_aten] = lambda cv, a, val, _op=_op: cv.emit(_op, [a["self"]])

_BINARY = {
    "mul": "mul", "eq": "eq", "ne": "ne", "lt": "lt", "le": "le", "gt": "gt", "ge": "ge",
    "logical_and": "logical_and", "logical_or": "logical_or", "maximum": "maximum",
    "minimum": "minimum", "remainder": "remainder", "bitwise_and": "bitwise_and",
    "bitwise_or": "bitwise_or",
}
for _aten, _op in _BINARY.items():
    TABLE[_aten] = lambda cv, a, val, _op=_op: cv.emit(_op, [cv.tensor(a["self"]), cv.tensor(a["other"])])


@conv("add", "sub")
def _add_sub(cv: Converter, a: dict, val: Any) -> Node:
    other = cv.tensor(a["other"])
    if a.get("alpha", 1) != 1:
        other = cv.emit("mul", [other, cv.tensor(a["alpha"])])
    op = cv.fx_node.target._schema.name.split("::")[-1].rstrip("_")
    return cv.emit(op, [cv.tensor(a["self"]), other])


@conv("rsub")
def _rsub(cv: Converter, a: dict, val: Any) -> Node:
    x = cv.tensor(a["self"])
    if a.get("alpha", 1) != 1:
        x = cv.emit("mul", [x, cv.tensor(a["alpha"])])
    return cv.emit("sub", [cv.tensor(a["other"]), x])


@conv("div")
def _div(cv: Converter, a: dict, val: Any) -> Node:
    attrs = {"rounding_mode": a["rounding_mode"]} if a.get("rounding_mode") else {}
    return cv.emit("div", [cv.tensor(a["self"]), cv.tensor(a["other"])], **attrs)


@conv("floor_divide")
def _floordiv(cv: Converter, a: dict, val: Any) -> Node:
    return cv.emit("div", [cv.tensor(a["self"]), cv.tensor(a["other"])], rounding_mode="floor")


@conv("pow")
def _pow(cv: Converter, a: dict, val: Any) -> Node:
    return cv.emit("pow", [cv.tensor(a["self"]), cv.tensor(a["exponent"])])


@conv("gelu")
def _gelu(cv: Converter, a: dict, val: Any) -> Node:
    return cv.emit("gelu", [a["self"]], approximate=a["approximate"])


@conv("softplus")
def _softplus(cv: Converter, a: dict, val: Any) -> Node:
    return cv.emit("softplus", [a["self"]], beta=float(a["beta"]), threshold=float(a["threshold"]))


@conv("clamp", "clamp_min", "clamp_max", "hardtanh")
def _clamp(cv: Converter, a: dict, val: Any) -> Node:
    bounds = {k: a.get(k, a.get(f"{k}_val")) for k in ("min", "max")}
    if any(isinstance(v, Node) for v in bounds.values()):  # tensor bounds: elementwise max/min
        x = a["self"]
        if bounds["min"] is not None:
            x = cv.emit("maximum", [x, bounds["min"]])
        if bounds["max"] is not None:
            x = cv.emit("minimum", [x, bounds["max"]])
        return x
    return cv.emit("clamp", [a["self"]], **{k: v for k, v in bounds.items() if v is not None})


@conv("leaky_relu")
def _leaky_relu(cv: Converter, a: dict, val: Any) -> Node:
    return cv.emit("leaky_relu", [a["self"]], negative_slope=float(a["negative_slope"]))


@conv("elu")
def _elu(cv: Converter, a: dict, val: Any) -> Node:
    if (a.get("alpha", 1), a.get("scale", 1), a.get("input_scale", 1)) != (1, 1, 1):
        raise cv.unsupported(hint="elu with alpha/scale other than 1 is not supported")
    return cv.emit("elu", [a["self"]])


@conv("where")
def _where(cv: Converter, a: dict, val: Any) -> Node:
    return cv.emit("where", [cv.tensor(a["condition"]), cv.tensor(a["self"]), cv.tensor(a["other"])])


@conv("masked_fill")
def _masked_fill(cv: Converter, a: dict, val: Any) -> Node:
    value = cv.tensor(a["value"])
    if value.type.dtype != a["self"].type.dtype:
        value = cv.emit("cast", [value], dtype=a["self"].type.dtype)
    return cv.emit("where", [a["mask"], value, a["self"]])


@conv("to", "_to_copy", "type_as")
def _to(cv: Converter, a: dict, val: Any) -> Node:
    return cv.emit("cast", [a["self"]], dtype=dtype_name(val.dtype))


@conv("alias", "clone", "contiguous", "detach", "lift_fresh_copy", "view_as_real_copy")
def _identity(cv: Converter, a: dict, val: Any) -> Node:
    return a["self"]


@conv("dropout", "feature_dropout", "alpha_dropout")
def _dropout(cv: Converter, a: dict, val: Any) -> Node:
    return cv.emit("dropout", [a["input"]], p=float(a["p"]))


# -- shapes ----------------------------------------------------------------------------------


@conv("sym_size")
def _sym_size(cv: Converter, a: dict, val: Any) -> Dim:
    return a["self"].type.shape[a["dim"]]


@conv("view", "reshape", "_unsafe_view")
def _view(cv: Converter, a: dict, val: Any) -> Node:
    sizes = a["size"] if a.get("size") is not None else a["shape"]
    return _reshape(cv, a["self"], [cv.dim(d) for d in sizes])


@conv("unsqueeze", "squeeze", "flatten", "unflatten", "view_as")
def _to_fake_shape(cv: Converter, a: dict, val: Any) -> Node:
    return _reshape(cv, a["self"], [cv.dim(d) for d in val.shape])


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
        if v >= _BIG:
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
    return _slice(cv, a["self"], a["dim"], a["start"], a["end"], a["step"])


@conv("narrow")
def _narrow(cv: Converter, a: dict, val: Any) -> Node:
    start = cv.dim(a["start"])
    return _slice(cv, a["self"], a["dim"], start, from_expr(to_expr(start) + to_expr(cv.dim(a["length"]))))


@conv("select")
def _select(cv: Converter, a: dict, val: Any) -> Node:
    x, dim, i = a["self"], cv.axis(a["dim"], a["self"].type.rank), cv.dim(a["index"])
    end = from_expr(to_expr(i) + 1) if not (isinstance(i, int) and i == -1) else _BIG
    sl = _slice(cv, x, dim, i, end)
    return _reshape(cv, sl, [d for k, d in enumerate(sl.type.shape) if k != dim])


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
    return tuple(_reshape(cv, p, [d for k, d in enumerate(p.type.shape) if k != dim]) for p in parts)


@conv("cat", "concat")
def _cat(cv: Converter, a: dict, val: Any) -> Node:
    xs = [t for t in a["tensors"] if not (t.type.rank == 1 and t.type.shape[0] == 0)]
    return cv.emit("cat", xs, dim=cv.axis(a["dim"], xs[0].type.rank))


@conv("stack")
def _stack(cv: Converter, a: dict, val: Any) -> Node:
    xs = a["tensors"]
    dim = cv.axis(a["dim"], xs[0].type.rank + 1)
    parts = [_reshape(cv, x, [*x.type.shape[:dim], 1, *x.type.shape[dim:]]) for x in xs]
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
    op = cv.fx_node.target._schema.name.split("::")[-1].rstrip("_")
    return cv.emit(op, [a["self"]], diagonal=a["diagonal"])


# -- factories -------------------------------------------------------------------------------


@conv("arange")
def _arange(cv: Converter, a: dict, val: Any) -> Node:
    start = cv.dim(a.get("start", 0) if a.get("start") is not None else 0)
    step = a.get("step", 1) or 1
    if any(isinstance(v, float) for v in (start, a["end"], step)):
        raise cv.unsupported(hint="arange with float bounds is not supported")
    return cv.emit("arange", [], start=start, end=cv.dim(a["end"]), step=step, dtype=dtype_name(val.dtype))


@conv("full", "zeros", "ones", "new_full", "new_zeros", "new_ones", "empty", "new_empty")
def _full(cv: Converter, a: dict, val: Any) -> Node:
    name = cv.fx_node.target._schema.name.split("::")[-1]
    value = a.get("fill_value", 1 if name.endswith("ones") else 0)
    return cv.emit("full", [], shape=[cv.dim(d) for d in val.shape], value=value, dtype=dtype_name(val.dtype))


@conv("full_like", "zeros_like", "ones_like", "empty_like")
def _full_like(cv: Converter, a: dict, val: Any) -> Node:
    name = cv.fx_node.target._schema.name.split("::")[-1]
    value = a.get("fill_value", 1 if name.startswith("ones") else 0)
    return cv.emit("full_like", [a["self"]], value=value, dtype=dtype_name(val.dtype))


@conv("scalar_tensor")
def _scalar_tensor(cv: Converter, a: dict, val: Any) -> Node:
    return cv.emit("cast", [cv.tensor(a["s"])], dtype=dtype_name(val.dtype))


# -- reductions ------------------------------------------------------------------------------


def _dims(cv: Converter, x: Node, dims: Any) -> list[int]:
    if dims is None or dims == []:
        return list(range(x.type.rank))
    dims = [dims] if isinstance(dims, int) else dims
    return sorted(cv.axis(d, x.type.rank) for d in dims)


@conv("mean", "sum", "amax", "amin")
def _reduce(cv: Converter, a: dict, val: Any) -> Node:
    op = cv.fx_node.target._schema.name.split("::")[-1]
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
    name = cv.fx_node.target._schema.name.split("::")[-1]
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
    name = cv.fx_node.target._schema.name.split("::")[-1].lstrip("_")
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
    col = _reshape(cv, x, [x.type.shape[0], 1])
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
