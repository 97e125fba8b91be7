"""Helpers of the pass tests: Before/After IR text comparison and numerics on random weights."""

from __future__ import annotations

import torch

from kiln.ir import Graph, parse_graph, print_graph, run_graph, verify
from kiln.ir.dims import evaluate
from kiln.ir.types import torch_dtype
from kiln.passes import Pass, get_pass
from kiln.passes.differential import check_equivalent, sample_batch

VOCAB = 16


def canonical(text: str) -> str:
    """The text as the printer writes it (canonical names and spacing); verified."""
    graph = parse_graph(text)
    verify(graph)
    return print_graph(graph)


def rewrite(pass_: Pass | str, before: str, after: str) -> tuple[Graph, Graph]:
    """Parse and verify `before`, apply the pass, verify, and compare with `after` as text."""
    graph = parse_graph(before)
    verify(graph)
    graph.meta["vocab_size"] = VOCAB
    p = get_pass(pass_) if isinstance(pass_, str) else pass_
    result = p.apply(graph)
    verify(result)
    assert print_graph(result) == canonical(after)
    return graph, result


def random_weights(graph: Graph, seed: int = 0) -> dict[str, torch.Tensor]:
    """A random tensor per param of the graph, keyed by param name."""
    g = torch.Generator().manual_seed(seed)
    return {
        p.name: (torch.randn([evaluate(d, {}) for d in p.type.shape], generator=g) * 0.5).to(
            torch_dtype(p.type.dtype)
        )
        for p in graph.params
    }


def weight_fn(weights: dict[str, torch.Tensor]):
    return lambda name, type_: weights[name]


def batch_inputs(graph: Graph, seed: int = 0) -> dict[str, torch.Tensor]:
    """The inputs check_equivalent feeds a graph (a [1, T] input gets the batch axis)."""
    batch = sample_batch(VOCAB, seed)
    return {
        n.name: batch[n.name].reshape(1, -1)
        if n.type.rank == 2 and batch[n.name].dim() == 1
        else batch[n.name]
        for n in graph.inputs
    }


def assert_equivalent(
    name: str, before: Graph, after: Graph, *, all_rows: bool = True, tol: float = 1e-5
) -> float:
    """check_equivalent on random weights; with all_rows, also every element of every output
    (check_equivalent itself compares only the rows the runtime samples)."""
    weights = random_weights(before)
    err = check_equivalent(name, before, after, weight_fn(weights))
    assert err <= tol
    if all_rows:
        with torch.no_grad():
            want = run_graph(before, batch_inputs(before), weight_fn(weights))
            got = run_graph(after, batch_inputs(after), weight_fn(weights))
        assert len(got) == len(want)
        for a, b in zip(got, want, strict=True):
            assert a.dtype == b.dtype
            assert a.numel() == b.numel(), f"{tuple(a.shape)} vs {tuple(b.shape)}"
            torch.testing.assert_close(a.reshape(b.shape), b, rtol=tol, atol=tol)
    return err
