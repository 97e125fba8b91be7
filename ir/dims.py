"""Symbolic dimensions: a dim is an int or a string holding a sympy expression ("T", "2*T")."""

from __future__ import annotations

import functools
import re
from collections.abc import Iterable, Mapping

import sympy

Dim = int | str


@functools.lru_cache(maxsize=4096)
def _parse(expr: str) -> sympy.Expr:
    # Every identifier is a symbol (sympify alone would read "S" or "N" as sympy objects).
    names = {n: sympy.Symbol(n) for n in re.findall(r"[A-Za-z_]\w*", expr)}
    return sympy.sympify(expr, locals=names)


def to_expr(d: Dim) -> sympy.Expr:
    """The sympy expression of a dim."""
    return sympy.Integer(d) if isinstance(d, int) else _parse(d)


def from_expr(e: sympy.Expr) -> Dim:
    """Canonical dim for an expression: an int when it is constant."""
    e = sympy.expand(e)
    if e.is_Integer:
        return int(e)
    return str(e)


def symbols(d: Dim) -> set[str]:
    """The symbol names a dim mentions."""
    if isinstance(d, int):
        return set()
    return {s.name for s in to_expr(d).free_symbols}


def shape_symbols(shapes: Iterable[Iterable[Dim]]) -> list[str]:
    """Sorted symbol names over several shapes."""
    out: set[str] = set()
    for shape in shapes:
        for d in shape:
            out |= symbols(d)
    return sorted(out)


@functools.lru_cache(maxsize=4096)
def _compiled(expr: str):
    e = _parse(expr)
    names = sorted(s.name for s in e.free_symbols)
    return names, sympy.lambdify(names, e, modules=[{}, "math"])


def evaluate(d: Dim, bindings: Mapping[str, int]) -> int:
    """The value of a dim once its symbols are bound."""
    if isinstance(d, int):
        return d
    names, fn = _compiled(d)
    try:
        return int(fn(*(bindings[n] for n in names)))
    except KeyError as e:
        raise KeyError(f"symbol {e} of dim '{d}' is not bound") from None


def dims_equal(a: Dim, b: Dim) -> bool:
    """Whether two dims are the same expression."""
    if isinstance(a, int) and isinstance(b, int):
        return a == b
    return sympy.expand(to_expr(a) - to_expr(b)) == 0
