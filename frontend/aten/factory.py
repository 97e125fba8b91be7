"""Tensors made from sizes: arange, full and friends."""

from __future__ import annotations

from typing import Any

from kiln.frontend.aten.table import Converter, conv
from kiln.ir.graph import Node
from kiln.ir.types import dtype_name

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
    name = cv.op_name()
    value = a.get("fill_value", 1 if name.endswith("ones") else 0)
    return cv.emit("full", [], shape=[cv.dim(d) for d in val.shape], value=value, dtype=dtype_name(val.dtype))


@conv("full_like", "zeros_like", "ones_like", "empty_like")
def _full_like(cv: Converter, a: dict, val: Any) -> Node:
    name = cv.op_name()
    value = a.get("fill_value", 1 if name.startswith("ones") else 0)
    return cv.emit("full_like", [a["self"]], value=value, dtype=dtype_name(val.dtype))


@conv("scalar_tensor")
def _scalar_tensor(cv: Converter, a: dict, val: Any) -> Node:
    return cv.emit("cast", [cv.tensor(a["s"])], dtype=dtype_name(val.dtype))
