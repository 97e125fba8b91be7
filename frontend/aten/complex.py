"""Complex tensors as (real, imaginary) pairs of IR values.

kiln's IR has no complex dtype. Models that write RoPE as a complex rotation (DeepSeek-V2's
``torch.polar`` frequencies, ``view_as_complex(x) * freqs``, ``view_as_real``) convert with each
complex value held as a :class:`Complex` pair while converting; nothing complex reaches the IR.
Converters here are looked up as ``complex::<aten name>`` when an operand is a pair.
"""

from __future__ import annotations

from typing import Any

from kiln.frontend.aten.table import Converter, conv, reshape
from kiln.frontend.convert import Complex
from kiln.ir.graph import Node


def _parts(cv: Converter, x: Any) -> tuple[Node, Node | None]:
    """(re, im) of an operand; im is None for a real tensor or scalar."""
    if isinstance(x, Complex):
        return x.re, x.im
    return cv.tensor(x), None


@conv("polar")
def _polar(cv: Converter, a: dict, val: Any) -> Complex:
    r, theta = a["abs"], a["angle"]
    return Complex(cv.emit("mul", [r, cv.emit("cos", [theta])]), cv.emit("mul", [r, cv.emit("sin", [theta])]))


@conv("view_as_complex")
def _view_as_complex(cv: Converter, a: dict, val: Any) -> Complex:
    # x: [..., n, 2] -> re, im: [..., n]
    x = a["self"]
    d, shape = x.type.rank - 1, list(x.type.shape[:-1])
    part = [reshape(cv, cv.emit("slice", [x], dim=d, start=i, end=i + 1, step=1), shape) for i in (0, 1)]
    return Complex(*part)


@conv("complex::view_as_real")
def _view_as_real(cv: Converter, a: dict, val: Any) -> Node:
    c: Complex = a["self"]
    shape = [*c.re.type.shape, 1]
    return cv.emit("cat", [reshape(cv, c.re, shape), reshape(cv, c.im, shape)], dim=len(shape) - 1)


@conv("complex::mul")
def _mul(cv: Converter, a: dict, val: Any) -> Complex:
    (ar, ai), (br, bi) = _parts(cv, a["self"]), _parts(cv, a["other"])
    if ai is None:
        (ar, ai), (br, bi) = (br, bi), (ar, ai)
    if bi is None:  # complex * real
        return Complex(cv.emit("mul", [ar, br]), cv.emit("mul", [ai, br]))
    # (ar + i ai)(br + i bi) = (ar br - ai bi) + i (ar bi + ai br)
    re = cv.emit("sub", [cv.emit("mul", [ar, br]), cv.emit("mul", [ai, bi])])
    im = cv.emit("add", [cv.emit("mul", [ar, bi]), cv.emit("mul", [ai, br])])
    return Complex(re, im)


@conv("complex::to", "complex::_to_copy", "complex::alias", "complex::clone", "complex::contiguous")
def _same(cv: Converter, a: dict, val: Any) -> Complex:
    if not val.dtype.is_complex:
        raise cv.unsupported(hint="casting a complex tensor to a real dtype is not supported")
    return a["self"]


@conv("complex::unsqueeze", "complex::squeeze", "complex::view", "complex::reshape", "complex::expand")
def _per_part(cv: Converter, a: dict, val: Any) -> Complex:
    # Shape-only ops: the same op on each part, with torch's result shape.
    shape = [cv.dim(d) for d in val.shape]
    c: Complex = a["self"]
    if cv.op_name() == "expand":
        return Complex(*(cv.emit("expand", [p], shape=shape) for p in (c.re, c.im)))
    return Complex(reshape(cv, c.re, shape), reshape(cv, c.im, shape))
