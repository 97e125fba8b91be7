"""Weight folding: param-only subgraphs become stored params; everything else stays."""

from __future__ import annotations

import torch

from kiln.codegen.fold_weights import fold_weights
from kiln.ir import parse_graph, print_graph, run_graph, verify

BEFORE = """
graph {
  %x = input : f32[T,4]
  @a.q_proj.weight = param : f32[4,4]
  @a.k_proj.weight = param : f32[2,4]
  @w = param : f32[4,3]
  %0 = cat(@a.q_proj.weight, @a.k_proj.weight) {"dim": 0} : f32[6,4]
  %1 = linear(%x, %0) : f32[T,6]
  %2 = permute(@w) {"dims": [1, 0]} : f32[3,4]
  %3 = linear(%x, %2) : f32[T,3]
  %4 = expand(@w) {"shape": [2, 4, 3]} : f32[2,4,3]
  %5 = sum(%4) {"dims": [0, 2], "keepdim": false} : f32[4]
  %6 = mul(%x, %5) : f32[T,4]
  %7 = reshape(%x) {"shape": ["T", 1, 4, 1]} : f32[T,1,4,1]
  %8 = mul(%7, %4) : f32[T,2,4,3]
  return %1, %3, %6, %8
}
"""


def test_fold_weights():
    g = parse_graph(BEFORE)
    verify(g)
    weights = {"a.q_proj.weight": torch.randn(4, 4), "a.k_proj.weight": torch.randn(2, 4), "w": torch.randn(4, 3)}
    folded, producers = fold_weights(g, lambda n, t: weights[n])
    # sum(expand(w)) is smaller than w: folded; expand(w) itself is larger: left to run time.
    assert set(producers) == {"a.q_proj+k_proj.weight", "w.permute", "w.sum"}
    text = print_graph(folded)
    assert "@a.q_proj+k_proj.weight = param : f32[6,4]" in text
    assert "expand(@w)" in text
    stored = {**weights, **{k: f() for k, f in producers.items()}}
    x = torch.randn(5, 4)
    for got, want in zip(run_graph(folded, {"x": x}, lambda n, t: stored[n]),
                         run_graph(g, {"x": x}, lambda n, t: weights[n]), strict=True):
        torch.testing.assert_close(got, want)
