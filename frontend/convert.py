"""FX graph of an ExportedProgram -> kiln IR."""

from __future__ import annotations

import operator
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import sympy
import torch
import torch.fx
from tqdm.auto import tqdm

from kiln.errors import KilnError, UnsupportedOpError
from kiln.ir.dims import Dim, from_expr, to_expr
from kiln.ir.graph import Graph, Node, const_node, input_node, param_node
from kiln.ir.ops import get_op, infer_type
from kiln.ir.step_inputs import CU_SEQLENS
from kiln.ir.types import TensorType, dtype_name

# The token symbol (kiln.ir.step_inputs names the rest).
TOKENS = "T"
_SKIP = {
    "_assert_tensor_metadata", "_assert_scalar", "sym_constrain_range_for_size", "sym_constrain_range",
    "_assert_async", "_check_is_size", "_functional_assert_async",
}


@dataclass(frozen=True)
class Complex:
    """A complex tensor while converting: two real IR values of one shape (the IR has no
    complex dtype; frontend/aten/complex.py converts the ops that make and use them)."""

    re: Node
    """The real part."""
    im: Node
    """The imaginary part."""


class Converter:
    """Walks the FX graph once, emitting IR nodes; the converter table lives in frontend/aten/."""

    def __init__(self, program: torch.export.ExportedProgram, token_symbol: str, model_type: str):
        self.program = program
        self.model_type = model_type
        self.symbols = {sympy.Symbol(token_symbol): sympy.Symbol(TOKENS)}
        self.nodes: list[Node] = []
        self._cu_seqlens: Node | None = None
        self.fx_node: torch.fx.Node | None = None
        self.env: dict[torch.fx.Node, Any] = {}
        """FX node -> its current IR value (rebound by in-place writes)."""
        self.views: dict[torch.fx.Node, tuple[torch.fx.Node, Node | None]] = {}
        """FX node that is a view -> (its base's FX node, the IR slice it took; None: the whole
        base). An in-place write to a view is written back into its base (see write_back)."""

    # -- helpers used by converters ----------------------------------------------------------

    def emit(self, op: str, inputs: list[Node], **attrs: Any) -> Node:
        """Append one IR node; its type comes from the op's rule."""
        opdef = get_op(op)
        try:
            type_ = infer_type(opdef, [i.type for i in inputs], attrs)
        except Exception as e:
            raise KilnError(f"kiln op '{op}' rejected operands from {self._where()}: {e}") from None
        node = Node(op, tuple(inputs), attrs, type_)
        self.nodes.append(node)
        return node

    def tensor(self, x: Any) -> Node:
        """An IR value for a tensor operand or a Python scalar (as a rank-0 const)."""
        if isinstance(x, Node):
            return x
        if isinstance(x, bool):
            t = "bool"
        elif isinstance(x, int):
            t = "int64"
        elif isinstance(x, float):
            t = "float32"
        else:
            raise UnsupportedOpError(f"{self._where()} with operand {x!r}", self.model_type)
        node = const_node(x, TensorType(t, ()))
        self.nodes.append(node)
        return node

    def dim(self, d: Any) -> Dim:
        """A size from the FX graph (int or SymInt or already-converted Dim)."""
        if isinstance(d, int | str):
            return d
        if isinstance(d, torch.SymInt):
            return from_expr(to_expr(str(d.node.expr)).xreplace(self.symbols))
        raise KilnError(f"unexpected size {d!r} in {self._where()}")

    def axis(self, d: int, rank: int) -> int:
        """A non-negative axis index."""
        return d + rank if d < 0 else d

    def op_name(self) -> str:
        """The aten schema name of the call being converted ("add", "softmax", "div_")."""
        return _target_name(self.fx_node.target)

    def cu_seqlens(self) -> Node:
        """The graph input giving sequence boundaries in the flattened token axis."""
        if self._cu_seqlens is None:
            self._cu_seqlens = input_node(CU_SEQLENS.name, CU_SEQLENS.type)
            self.nodes.append(self._cu_seqlens)
        return self._cu_seqlens

    def record_view(self, base: Any, sliced: Node | None) -> None:
        """Note that the call being converted returns a view of FX node ``base``: ``sliced`` is
        the IR ``slice`` node it emitted (None: a view of the whole base)."""
        if isinstance(base, torch.fx.Node):
            self.views[self.fx_node] = (base, sliced)

    def write_back(self, view: torch.fx.Node, value: Node) -> None:
        """Functionalize an in-place write: ``view`` now holds ``value``, so each base it is a
        view of (transitively) is rebound to a copy with that region replaced.

        ``base[..., a:b] = v`` becomes ``cat([base[..., :a], v, base[..., b:]])`` on the sliced
        axis (pieces that are empty left out; slices of a cat this built reuse its pieces), so
        later readers of the base see the write and no IR op mutates a tensor.
        """
        while view in self.views:
            base_fx, sliced = self.views[view]
            if sliced is not None:
                value = self._scatter_slice(self.env[base_fx], value, sliced)
            self.env[base_fx] = value
            view = base_fx

    def _scatter_slice(self, base: Node, value: Node, sliced: Node) -> Node:
        dim, start, end, step = (sliced.attrs[k] for k in ("dim", "start", "end", "step"))
        size = base.type.shape[dim]
        if step != 1:
            raise self.unsupported(hint="an in-place write to a strided slice is not supported")
        pieces = []
        if not _same(start, 0):
            pieces.append(self.slice_of(base, dim, 0, start))
        pieces.append(value)
        if not _same(end, size):
            pieces.append(self.slice_of(base, dim, end, size))
        return pieces[0] if len(pieces) == 1 else self.emit("cat", pieces, dim=dim)

    def slice_of(self, x: Node, dim: int, start: Dim, end: Dim) -> Node:
        """``x[start:end]`` along ``dim``; when ``x`` is a cat along ``dim`` whose piece
        boundaries the range meets, its pieces (no new slice)."""
        if x.op == "cat" and x.attrs["dim"] == dim:
            bounds, at = [], 0
            for piece in x.inputs:
                nxt = from_expr(to_expr(at) + to_expr(piece.type.shape[dim]))
                bounds.append((at, nxt, piece))
                at = nxt
            firsts = [i for i, (a, _, _) in enumerate(bounds) if _same(a, start)]
            lasts = [i for i, (_, b, _) in enumerate(bounds) if _same(b, end)]
            if firsts and lasts and firsts[0] <= lasts[-1]:
                chosen = [p for _, _, p in bounds[firsts[0] : lasts[-1] + 1]]
                return chosen[0] if len(chosen) == 1 else self.emit("cat", chosen, dim=dim)
        return self.emit("slice", [x], dim=dim, start=start, end=end, step=1)

    def unsupported(self, what: str | None = None, hint: str | None = None) -> UnsupportedOpError:
        return UnsupportedOpError(what or self._where(), self.model_type, hint)

    def _where(self) -> str:
        n = self.fx_node
        return _target_name(n.target) if n is not None else "the graph"

    # -- the walk ------------------------------------------------------------------------------

    def meta_type(self, val: Any) -> TensorType:
        return TensorType(dtype_name(val.dtype), tuple(self.dim(d) for d in val.shape))

    def run(self, table: dict[str, Callable[..., Any]]) -> Graph:
        sig = self.program.graph_signature
        params = {**sig.inputs_to_parameters, **sig.inputs_to_buffers, **sig.inputs_to_lifted_tensor_constants}
        env = self.env
        outputs: list[Node] = []
        fx_nodes = list(self.program.graph.nodes)
        for fx in tqdm(fx_nodes, desc="convert to IR", unit="node", leave=False, disable=None):
            self.fx_node = fx
            if fx.op == "placeholder":
                t = self.meta_type(fx.meta["val"])
                if fx.name in params:
                    node = param_node(params[fx.name].removeprefix("model."), t)
                else:
                    node = input_node(fx.name, t)
                self.nodes.append(node)
                env[fx] = node
            elif fx.op == "call_function":
                env[fx] = self._call(fx, env, table)
            elif fx.op == "output":
                outputs = [env[a] for a in fx.args[0]]
            else:
                raise self.unsupported(f"FX node kind '{fx.op}'")
        graph = Graph(self.nodes, outputs, {"model_type": self.model_type})
        return graph.with_nodes(graph.inputs, outputs)

    def _call(self, fx: torch.fx.Node, env: dict, table: dict[str, Callable[..., Any]]) -> Any:
        target = fx.target
        name = _target_name(target)
        if name in _SKIP:
            return None
        args = torch.fx.node.map_arg(fx.args, lambda n: env[n])
        kwargs = torch.fx.node.map_arg(fx.kwargs, lambda n: env[n])
        if target is operator.getitem:
            return args[0][args[1]]
        if target in _SYM_OPS:
            return from_expr(_SYM_OPS[target](_sym(args[0]), _sym(args[1])))
        if not isinstance(target, torch._ops.OpOverload):
            raise self.unsupported()
        inplace = name.endswith("_") and not name.endswith("__")
        key = name.rstrip("_") if inplace else name
        bound = _bind(target, args, kwargs)
        on_complex = any(isinstance(v, Complex) for v in bound.values())
        if on_complex:
            key = f"complex::{key}"  # an operand is a (re, im) pair (frontend/aten/complex.py)
        fn = table.get(key)
        if fn is None:
            raise self.unsupported(hint="kiln has no converter for it on complex operands" if on_complex else None)
        out = fn(self, bound, fx.meta.get("val"))
        if inplace:  # later readers of the mutated operand (and of what it views) see the result
            env[fx.args[0]] = out
            self.write_back(fx.args[0], out)
        self._check(out, fx.meta.get("val"))
        return out

    def _check(self, out: Any, val: Any) -> None:
        if isinstance(out, Node) and isinstance(val, torch.Tensor):
            want = self.meta_type(val)
            if not want.same_as(out.type):
                raise KilnError(
                    f"internal: converting {self._where()} gave {out.type}, torch says {want}"
                )


def _same(a: Dim, b: Dim) -> bool:
    """Two sizes known to be equal."""
    return sympy.simplify(to_expr(a) - to_expr(b)) == 0


def _sym(x: Any) -> sympy.Expr:
    return to_expr(x)


_SYM_OPS: dict[Any, Callable[[sympy.Expr, sympy.Expr], sympy.Expr]] = {
    operator.add: operator.add,
    operator.sub: operator.sub,
    operator.mul: operator.mul,
    operator.floordiv: lambda a, b: sympy.floor(a / b),
}


def _target_name(target: Any) -> str:
    if isinstance(target, torch._ops.OpOverload):
        return target._schema.name.split("::")[-1]
    return getattr(target, "__name__", str(target))


def _bind(target: torch._ops.OpOverload, args: tuple, kwargs: dict) -> dict[str, Any]:
    """Arguments by schema name, defaults filled in."""
    out: dict[str, Any] = {}
    schema_args = target._schema.arguments
    for i, a in enumerate(schema_args):
        if i < len(args) and not a.kwarg_only:
            out[a.name] = args[i]
        elif a.name in kwargs:
            out[a.name] = kwargs[a.name]
        elif a.has_default_value():
            out[a.name] = a.default_value
        else:
            out[a.name] = None
    return out
