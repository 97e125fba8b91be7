"""Complex RoPE (DeepSeek-V2's form) converts through (re, im) pairs: nothing complex in the IR."""

from __future__ import annotations

import pytest
import torch

from kiln.errors import UnsupportedOpError
from kiln.frontend.aten import TABLE
from kiln.frontend.convert import Converter
from kiln.ir.interpreter import run_graph


class _ComplexRope(torch.nn.Module):
    def forward(self, x: torch.Tensor, angle: torch.Tensor) -> torch.Tensor:
        # x: [T, H, D], angle: [T, D/2]
        freqs = torch.polar(torch.ones_like(angle), angle) * 0.5
        xc = torch.view_as_complex(x.reshape(*x.shape[:-1], -1, 2))
        return torch.view_as_real(xc * freqs.unsqueeze(1)).flatten(2)


class _ComplexAbs(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.view_as_complex(x).abs()


def _convert(module, *args):
    tokens = torch.export.Dim("T", min=2, max=1024)
    program = torch.export.export(module, args, dynamic_shapes=[{0: tokens}] * len(args), strict=False)
    val = next(n for n in program.graph.nodes if n.op == "placeholder").meta["val"]
    graph = Converter(program, str(val.shape[0]), "test").run(TABLE)
    return graph, dict(zip([n.name for n in graph.inputs], args, strict=True))


def test_complex_rotation_matches_torch():
    x, angle = torch.randn(7, 3, 8), torch.randn(7, 4)
    graph, inputs = _convert(_ComplexRope(), x, angle)
    assert all("complex" not in str(n.type) for n in graph.nodes)
    (got,) = run_graph(graph, inputs, weights=None)
    torch.testing.assert_close(got, _ComplexRope()(x, angle))


def test_unsupported_complex_op_says_so():
    with pytest.raises(UnsupportedOpError, match="'abs'.*complex operands"):
        _convert(_ComplexAbs(), torch.randn(5, 4, 2))
