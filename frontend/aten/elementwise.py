"""Elementwise aten ops: math, activations, comparisons, casts."""

from __future__ import annotations

from typing import Any

from kiln.frontend.aten.table import TABLE, Converter, conv
from kiln.ir.graph import Node
from kiln.ir.types import dtype_name

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
    op = cv.op_name().rstrip("_")
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
    if cv.op_name() == "alias":  # a view of the whole tensor: writes to it reach the original
        cv.record_view(cv.fx_node.args[0], None)
    return a["self"]


@conv("dropout", "feature_dropout", "alpha_dropout")
def _dropout(cv: Converter, a: dict, val: Any) -> Node:
    return cv.emit("dropout", [a["input"]], p=float(a["p"]))
