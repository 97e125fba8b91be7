"""The reference interpreter: runs any graph, at any stage, on torch tensors."""

from __future__ import annotations

from collections.abc import Callable, Mapping

import sympy
import torch

from kiln.errors import KilnError
from kiln.ir.dims import Dim, evaluate, symbols, to_expr
from kiln.ir.graph import Graph, Node
from kiln.ir.ops import get_op, resolve_attrs
from kiln.ir.types import TensorType, torch_dtype

WeightFn = Callable[[str, TensorType], torch.Tensor]


def bind_symbols(types: Mapping[str, TensorType], inputs: Mapping[str, torch.Tensor]) -> dict[str, int]:
    """Symbol values implied by the input shapes (a dim may be affine in one symbol, such as
    S+1); KilnError when an input does not fit its declared type."""
    bindings: dict[str, int] = {}
    pending: list[tuple[str, Dim, int]] = []
    for name, type_ in types.items():
        if name not in inputs:
            raise KilnError(f"missing graph input '{name}' (expects {type_})")
        t = inputs[name]
        if t.dtype != torch_dtype(type_.dtype):
            raise KilnError(f"input '{name}' has dtype {t.dtype}, expected {type_}")
        if t.dim() != type_.rank:
            raise KilnError(f"input '{name}' has shape {tuple(t.shape)}, expected {type_}")
        pending.extend((name, d, size) for d, size in zip(type_.shape, t.shape, strict=True))
    for name, d, size in sorted(pending, key=lambda p: len(symbols(p[1]))):
        free = symbols(d) - bindings.keys()
        if len(free) == 1:
            (sym,) = free
            e = to_expr(d).subs(bindings)
            coeff, offset = e.coeff(sympy.Symbol(sym)), e.subs(sympy.Symbol(sym), 0)
            value = (size - offset) / coeff
            if value != int(value) or value < 0:
                raise KilnError(f"input '{name}' has size {size} where {d} is expected")
            bindings[sym] = int(value)
        elif free:
            raise KilnError(f"input '{name}': dim {d} has more than one unbound symbol")
        if evaluate(d, bindings) != size:
            raise KilnError(f"input '{name}' has size {size} where {d} (= {evaluate(d, bindings)}) is expected")
    return bindings


def const_value(node: Node, device: torch.device | str = "cpu") -> object:
    """A const node's runtime value: a Python number for rank 0, else a tensor."""
    value = node.attrs["value"]
    if node.type.shape == ():
        return value
    return torch.tensor(value, dtype=torch_dtype(node.type.dtype), device=device)


def run_graph(
    graph: Graph,
    inputs: Mapping[str, torch.Tensor],
    weights: WeightFn,
) -> list[torch.Tensor]:
    """Evaluate the graph; `weights(name, type)` supplies each param. Values are dropped after
    their last use, so peak memory is what the graph needs, not the sum of all values."""
    bindings = bind_symbols({n.name: n.type for n in graph.inputs}, inputs)
    last_use: dict[Node, int] = {}
    for i, n in enumerate(graph.nodes):
        for x in n.inputs:
            last_use[x] = i
    keep = set(graph.outputs)
    env: dict[Node, object] = {}
    for i, n in enumerate(graph.nodes):
        if n.op == "input":
            env[n] = inputs[n.name]
        elif n.op == "param":
            env[n] = weights(n.name, n.type)
        elif n.op == "const":
            env[n] = const_value(n)
        else:
            op = get_op(n.op)
            args = [
                env[x] if op.scalar_inputs or not isinstance(env[x], int | float | bool) else torch.tensor(env[x])
                for x in n.inputs
            ]
            attrs = resolve_attrs(op, n.attrs, bindings)
            if op.device_arg:
                attrs["device"] = next((v.device for v in inputs.values()), None)
            env[n] = op.impl(*args, **attrs)
        for x in set(n.inputs):
            if last_use[x] == i and x not in keep:
                del env[x]
    return [
        o if isinstance(o, torch.Tensor) else torch.tensor(o) for o in (env[out] for out in graph.outputs)
    ]
