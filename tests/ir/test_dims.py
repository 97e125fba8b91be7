"""Symbolic dims: evaluation, equality, symbol extraction (sympy's own names must not leak in)."""

from __future__ import annotations

import pytest
import sympy

from kiln.ir.dims import dims_equal, evaluate, from_expr, shape_symbols, symbols, to_expr

# Names sympy.sympify would read as its own objects: S (singleton registry), N (numeric eval),
# E (Euler's number), I (imaginary unit), Q (assumptions), O (order term), pi, beta, gamma.
SYMPY_NAMES = ["S", "N", "E", "I", "Q", "O", "pi", "beta", "gamma"]


@pytest.mark.parametrize(
    ("dim", "bindings", "value"),
    [
        (7, {}, 7),
        ("T", {"T": 5}, 5),
        ("2*T", {"T": 5}, 10),
        ("S + 1", {"S": 3}, 4),
        ("S+1", {"S": 0}, 1),
        ("T - 1", {"T": 9}, 8),
        ("3*T + 2*S", {"T": 2, "S": 5}, 16),
        ("T*H", {"T": 3, "H": 4}, 12),
        ("16", {}, 16),
        ("T", {"T": 5, "unused": 1}, 5),
    ],
)
def test_evaluate(dim, bindings, value):
    got = evaluate(dim, bindings)
    assert got == value
    assert type(got) is int


def test_evaluate_unbound_symbol_names_the_symbol_and_the_dim():
    with pytest.raises(KeyError, match=r"symbol 'S' of dim 'S \+ T' is not bound"):
        evaluate("S + T", {"T": 1})


@pytest.mark.parametrize(
    ("a", "b"),
    [
        (4, 4),
        ("T", "T"),
        ("2*T", "T + T"),
        ("T + 1", "1 + T"),
        ("T*2 - T", "T"),
        ("4", 4),
        ("S+1", "S + 1"),
        ("N*S", "S*N"),
    ],
)
def test_dims_equal(a, b):
    assert dims_equal(a, b)
    assert dims_equal(b, a)


@pytest.mark.parametrize(
    ("a", "b"), [(4, 5), ("T", "S"), ("T", 4), ("2*T", "T + 2"), ("S + 1", "S"), ("N", "E")]
)
def test_dims_not_equal(a, b):
    assert not dims_equal(a, b)
    assert not dims_equal(b, a)


@pytest.mark.parametrize("name", SYMPY_NAMES)
def test_sympy_reserved_names_are_plain_symbols(name):
    assert to_expr(name) == sympy.Symbol(name)
    assert symbols(name) == {name}
    assert symbols(f"2*{name} + 1") == {name}
    assert evaluate(f"2*{name} + 1", {name: 3}) == 7
    assert dims_equal(f"{name} + {name}", f"2*{name}")
    assert not dims_equal(name, 3)


def test_symbols_of_expressions():
    assert symbols(4) == set()
    assert symbols("8") == set()
    assert symbols("S + N") == {"S", "N"}
    assert symbols("T*Hkv + T") == {"T", "Hkv"}


def test_shape_symbols_sorted_over_several_shapes():
    assert shape_symbols([("T", 4), ("S + 1",), (2, "N*T")]) == ["N", "S", "T"]
    assert shape_symbols([(1, 2), ()]) == []


def test_from_expr_canonical_forms():
    assert from_expr(sympy.Integer(6)) == 6
    assert type(from_expr(sympy.Integer(6))) is int
    assert from_expr(to_expr("T + T")) == "2*T"
    assert from_expr(to_expr("(T + 1)*2")) == "2*T + 2"
    assert from_expr(to_expr("T - T + 3")) == 3
    assert dims_equal(from_expr(to_expr("S + 1")), "S + 1")
