"""The reference interpreter: small graphs against direct torch, symbol binding, input checks."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from kiln.errors import KilnError
from kiln.ir import Graph, TensorType, const_node, parse_graph, run_graph
from kiln.ir.interpreter import bind_symbols

MLP = """graph {
  %x = input : f32[T,8]
  @norm = param : f32[8]
  %0 = rms_norm(%x, @norm) {"normalized_shape": [8], "eps": 1e-06} : f32[T,8]
  @gate = param : f32[16,8]
  %1 = linear(%0, @gate) : f32[T,16]
  %2 = silu(%1) : f32[T,16]
  @up = param : f32[16,8]
  @up_bias = param : f32[16]
  %3 = linear(%0, @up, @up_bias) : f32[T,16]
  %4 = mul(%2, %3) : f32[T,16]
  @down = param : f32[8,16]
  %5 = linear(%4, @down) : f32[T,8]
  %6 = add(%x, %5) : f32[T,8]
  %7 = mul(%6, 0.5) : f32[T,8]
  %8 = softmax(%7) {"dim": -1} : f32[T,8]
  return %8, %0
}
"""


def _weights(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    shapes = {"norm": (8,), "gate": (16, 8), "up": (16, 8), "up_bias": (16,), "down": (8, 16)}
    return {k: torch.randn(s, generator=g) for k, s in shapes.items()}


@pytest.mark.parametrize("t", [1, 5])
def test_mlp_matches_torch(t):
    w = _weights()
    x = torch.randn(t, 8)
    seen: list[tuple[str, TensorType]] = []

    def weights(name: str, type_: TensorType) -> torch.Tensor:
        seen.append((name, type_))
        return w[name]

    out, normed = run_graph(parse_graph(MLP), {"x": x}, weights)
    h = F.rms_norm(x, [8], w["norm"], 1e-6)
    mlp = F.linear(F.silu(F.linear(h, w["gate"])) * F.linear(h, w["up"], w["up_bias"]), w["down"])
    torch.testing.assert_close(normed, h, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(out, torch.softmax((x + mlp) * 0.5, dim=-1), rtol=1e-6, atol=1e-6)
    assert dict(seen) == {
        "norm": TensorType("float32", (8,)),
        "gate": TensorType("float32", (16, 8)),
        "up": TensorType("float32", (16, 8)),
        "up_bias": TensorType("float32", (16,)),
        "down": TensorType("float32", (8, 16)),
    }


def test_scalar_consts_integer_ops_and_passthrough_outputs():
    text = """graph {
  %ids = input : i64[T]
  %0 = mul(%ids, 3) : i64[T]
  %1 = add(%0, 1) : i64[T]
  %2 = div(%1, 2) {"rounding_mode": "floor"} : i64[T]
  %3 = lt(%2, 4) : bool[T]
  %4 = where(%3, %2, -1) : i64[T]
  %5 = cast(%4) {"dtype": "float32"} : f32[T]
  %6 = pow(2.0, %5) : f32[T]
  return %4, %6, %ids
}
"""
    ids = torch.tensor([0, 1, 2, 3, 5])
    graph = parse_graph(text)
    seven_node = const_node(7, TensorType("int64", ()))
    graph = Graph([*graph.nodes, seven_node], [*graph.outputs, seven_node])
    got, powers, same, seven = run_graph(graph, {"ids": ids}, lambda n, t: None)
    want = torch.where((ids * 3 + 1) // 2 < 4, (ids * 3 + 1) // 2, -1)
    assert torch.equal(got, want)
    torch.testing.assert_close(powers, 2.0 ** want.float())
    assert same is ids
    assert seven.dim() == 0 and seven.item() == 7


def test_symbols_bound_from_input_shapes_reach_dim_attrs():
    text = """graph {
  %cu_seqlens = input : i32[S+1]
  %h = input : f32[T,4]
  %0 = arange() {"start": 0, "end": "S", "step": 1, "dtype": "int64"} : i64[S]
  %1 = reshape(%h) {"shape": ["2*T", 2]} : f32[2*T,2]
  %2 = full() {"shape": ["T", "S+1"], "value": 1.5, "dtype": "float32"} : f32[T,S+1]
  return %0, %1, %2
}
"""
    cu = torch.tensor([0, 2, 5, 9], dtype=torch.int32)
    h = torch.randn(9, 4)
    idx, flat, full = run_graph(parse_graph(text), {"cu_seqlens": cu, "h": h}, lambda n, t: None)
    assert torch.equal(idx, torch.arange(3))
    assert torch.equal(flat, h.reshape(18, 2))
    assert torch.equal(full, torch.full((9, 4), 1.5))


@pytest.mark.parametrize(
    ("types", "shapes", "bindings"),
    [
        ({"cu": ("S + 1",)}, {"cu": (4,)}, {"S": 3}),
        ({"cu": ("S+1",)}, {"cu": (1,)}, {"S": 0}),
        ({"x": ("2*T", 3)}, {"x": (10, 3)}, {"T": 5}),
        ({"x": ("T", 3), "y": ("T + 2",)}, {"x": (4, 3), "y": (6,)}, {"T": 4}),
        ({"y": ("T + 2",), "x": ("T", 3)}, {"y": (6,), "x": (4, 3)}, {"T": 4}),
        ({"x": ("T", "N"), "n": ("N",)}, {"x": (2, 7), "n": (7,)}, {"T": 2, "N": 7}),
        ({"x": (4,)}, {"x": (4,)}, {}),
    ],
)
def test_bind_symbols(types, shapes, bindings):
    typed = {k: TensorType("float32", v) for k, v in types.items()}
    tensors = {k: torch.empty(v) for k, v in shapes.items()}
    assert bind_symbols(typed, tensors) == bindings


@pytest.mark.parametrize(
    ("types", "shapes", "match"),
    [
        ({"x": ("T", 4)}, {"x": (3, 5)}, r"input 'x' has size 5 where 4 \(= 4\) is expected"),
        ({"x": ("T", 4)}, {"x": (3,)}, r"input 'x' has shape \(3,\), expected f32\[T,4\]"),
        ({"x": ("T", 4)}, {"x": (3, 4, 1)}, r"input 'x' has shape \(3, 4, 1\)"),
        ({"x": ("2*T",)}, {"x": (7,)}, r"input 'x' has size 7 where 2\*T is expected"),
        ({"cu": ("S+1",)}, {"cu": (0,)}, r"input 'cu' has size 0 where S\+1 is expected"),
        (
            {"x": ("T", 4), "y": ("T",)},
            {"x": (3, 4), "y": (5,)},
            r"input 'y' has size 5 where T \(= 3\) is expected",
        ),
        ({"x": ("T*N",)}, {"x": (6,)}, r"dim T\*N has more than one unbound symbol"),
        ({"x": ("T",), "y": ("T",)}, {"x": (3,)}, r"missing graph input 'y' \(expects f32\[T\]\)"),
    ],
)
def test_bind_symbols_rejects_inputs_that_do_not_fit(types, shapes, match):
    typed = {k: TensorType("float32", v) for k, v in types.items()}
    tensors = {k: torch.empty(v) for k, v in shapes.items()}
    with pytest.raises(KilnError, match=match):
        bind_symbols(typed, tensors)


def test_run_graph_wrong_input_shape_raises_kiln_error():
    with pytest.raises(KilnError, match="input 'x' has size 7 where 8"):
        run_graph(parse_graph(MLP), {"x": torch.randn(3, 7)}, lambda n, t: _weights()[n])
    with pytest.raises(KilnError, match="missing graph input 'x'"):
        run_graph(parse_graph(MLP), {}, lambda n, t: _weights()[n])


def test_run_graph_wrong_input_dtype_raises_kiln_error():
    text = "graph {\n  %x = input : f32[T]\n  %0 = add(%x, 1.0) : f32[T]\n  return %0\n}\n"
    with pytest.raises(KilnError, match="input 'x'"):
        run_graph(parse_graph(text), {"x": torch.ones(3, dtype=torch.float64)}, lambda n, t: None)


def test_values_are_released_after_last_use():
    # The interpreter frees intermediates; outputs must survive even when read again later.
    text = """graph {
  %x = input : f32[T]
  %0 = exp(%x) : f32[T]
  %1 = neg(%0) : f32[T]
  %2 = add(%1, %0) : f32[T]
  return %0, %2
}
"""
    x = torch.randn(4)
    a, b = run_graph(parse_graph(text), {"x": x}, lambda n, t: None)
    torch.testing.assert_close(a, x.exp())
    torch.testing.assert_close(b, torch.zeros(4))
