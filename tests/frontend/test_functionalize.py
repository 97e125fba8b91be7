"""In-place writes into slices (``buf[..., :a].copy_(x)``, ``buf[:, 2:4].mul_(y)``) are
functionalized by the converter: the base is rebound to a ``cat`` of the untouched pieces and
the written value, so the IR has no mutation and later readers see the write."""

from __future__ import annotations

from collections import Counter

import torch

from kiln.frontend.aten import TABLE
from kiln.frontend.convert import Converter
from kiln.ir.interpreter import run_graph


def _convert(module: torch.nn.Module, *args: torch.Tensor):
    tokens = torch.export.Dim("T", min=2, max=1024)
    program = torch.export.export(module, args, dynamic_shapes=[{0: tokens}] * len(args), strict=False)
    val = next(n for n in program.graph.nodes if n.op == "placeholder").meta["val"]
    graph = Converter(program, str(val.shape[0]), "test").run(TABLE)
    names = [n.name for n in graph.inputs]
    return graph, dict(zip(names, args, strict=True))


class _ExpandKV(torch.nn.Module):
    """transformers' DeepSeek ``expand_kv``: two slices of a fresh tensor written by copy_."""

    def forward(self, k_nope: torch.Tensor, k_rot: torch.Tensor) -> torch.Tensor:
        key = k_nope.new_empty(k_nope.shape[0], 4, 6)
        key[..., :4].copy_(k_nope)
        key[..., 4:].copy_(k_rot.expand(-1, 4, -1))  # broadcast source
        return key * 2


class _InPlaceOnSlice(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x.clone()
        y[:, 2:4].mul_(3.0)
        z = y[:, 1:5]
        z[:, 0:1].copy_(torch.ones_like(z[:, 0:1]).to(torch.int32))  # a view of a view, a cast
        return y + 1


def test_copy_into_slices_of_a_fresh_tensor_becomes_a_cat():
    k_nope, k_rot = torch.randn(7, 4, 4), torch.randn(7, 1, 6 - 4)
    graph, inputs = _convert(_ExpandKV(), k_nope, k_rot)
    (got,) = run_graph(graph, inputs, weights=None)
    torch.testing.assert_close(got, _ExpandKV()(k_nope, k_rot))
    live = Counter(n.op for n in graph.ops())
    assert live["cat"] == 1 and live["full"] == 0, live  # cat([k_nope, expand(k_rot)]): no zeros read


def test_in_place_op_on_nested_slices_reaches_the_base():
    x = torch.randn(5, 6)
    graph, inputs = _convert(_InPlaceOnSlice(), x)
    (got,) = run_graph(graph, inputs, weights=None)
    torch.testing.assert_close(got, _InPlaceOnSlice()(x))
