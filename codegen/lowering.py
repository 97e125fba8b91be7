"""What every target's lowering shares: turning a graph and its memory plan into an execution
plan (runtime/plan.py: buffers, arena slots, destination-passing steps, symbol binding rules),
and the `LoweredModule` a target returns (the plan plus the files it built)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import sympy

from kiln.codegen.memory_plan import MemoryPlan, Storage, plan_memory
from kiln.errors import KilnError
from kiln.ir.dims import Dim, symbols, to_expr
from kiln.ir.graph import Graph, Node
from kiln.ir.ops import get_op
from kiln.ir.types import TensorType
from kiln.runtime.plan import BindingRule, Buffer, ExecutionPlan, Form, Step


@dataclass
class LoweredModule:
    """A target's output: the plan and the files the artifact stores beside it."""

    plan: ExecutionPlan
    files: dict[str, bytes] = field(default_factory=dict)
    """Artifact-relative path -> contents: compiled kernels under kernels/, tuning.json."""
    fallbacks: list[str] = field(default_factory=list)
    """Ops a compiled target had to run through the torch provider (empty on reference)."""


def to_form(e: sympy.Expr, what: str, degree: int = 1) -> Form:
    """A polynomial as a form: an int, or {"const": c, "T": a, "S*MB": b}; KilnError when it
    is not a polynomial of at most `degree` in the symbols. Fractional coefficients round up
    (byte counts of packed dtypes)."""
    e = sympy.expand(e)
    if e.is_number:
        return int(sympy.ceiling(e))
    poly = sympy.Poly(e, *sorted(e.free_symbols, key=lambda s: s.name))
    if poly.total_degree() > degree:
        raise KilnError(f"{what} = {e} is not affine in the symbols; kiln plans need affine dims")
    form: dict[str, int] = {}
    for monom, coeff in zip(poly.monoms(), poly.coeffs(), strict=True):
        key = "*".join(s.name for s, k in zip(poly.gens, monom, strict=True) for _ in range(k)) or "const"
        form[key] = int(sympy.ceiling(coeff))
    return form


def dim_form(d: Dim, what: str) -> Form:
    """An IR dim as an affine form."""
    return d if isinstance(d, int) else to_form(to_expr(d), what)


def byte_form(t: TensorType) -> Form:
    """Storage bytes of a value of type t, as a polynomial form."""
    size = sympy.Rational(t.itemsize)
    for d in t.shape:
        size = size * to_expr(d)
    return to_form(size, f"bytes of {t}", degree=len(t.shape))


def split_attrs(node: Node) -> tuple[dict, dict]:
    """(constant attrs, attrs holding symbolic dims as forms) of a node."""
    static = dict(node.attrs)
    dims: dict = {}
    for key in get_op(node.op).dim_attrs:
        v = static.get(key)
        items = v if isinstance(v, list | tuple) else [v]
        if any(isinstance(x, str) for x in items):
            what = f"attribute '{key}' of {node.op}"
            dims[key] = [dim_form(x, what) for x in v] if isinstance(v, list | tuple) else dim_form(v, what)
            del static[key]
    return static, dims


def binding_rules(inputs: list[Node]) -> list[BindingRule]:
    """How each symbol is read off the input shapes: a dim with one unbound symbol binds it
    (S+1 binds S), repeated until every symbol is bound; KilnError otherwise."""
    rules: list[BindingRule] = []
    bound: set[str] = set()
    pending = [(n.name, axis, d) for n in inputs for axis, d in enumerate(n.type.shape) if symbols(d)]
    progress = True
    while progress:
        progress = False
        for name, axis, d in sorted(pending, key=lambda p: len(symbols(p[2]))):
            free = symbols(d) - bound
            if len(free) != 1:
                continue
            (sym,) = free
            e = sympy.expand(to_expr(d))
            s = sympy.Symbol(sym)
            coeff = e.coeff(s)
            if not coeff.is_Integer or coeff == 0:
                continue
            rules.append(BindingRule(sym, name, axis, int(coeff), to_form(e - coeff * s, f"offset of {d}")))
            bound.add(sym)
            progress = True
    missing = sorted(set().union(*(symbols(d) for _, _, d in pending)) - bound) if pending else []
    if missing:
        raise KilnError(f"symbols {', '.join(missing)} cannot be read off any input shape")
    return rules


def build_plan(graph: Graph, target: str, kernel: Callable[[Node], str]) -> ExecutionPlan:
    """The execution plan of a (pass-processed, weight-folded) graph; `kernel(node)` names the
    kernel ("provider:name") that computes an op node."""
    mem: MemoryPlan = plan_memory(graph)
    ids = {id(s): i for i, s in enumerate(mem.buffers)}
    buffers = [_buffer(s, ids) for s in mem.buffers]
    steps: list[Step] = []
    for n in graph.ops():
        if n.op == "get_result" or (mem.values[n][0].kind == "view" and mem.values[n][0].node is n):
            continue
        op = get_op(n.op)
        static, dims = split_attrs(n)
        scalars = [i for i, x in enumerate(n.inputs) if op.scalar_inputs and x.is_scalar_const]
        steps.append(Step(
            kernel=kernel(n),
            inputs=[ids[id(mem.values[x][0])] for x in n.inputs],
            outputs=[ids[id(s)] for s in mem.values[n]],
            attrs=static,
            dim_attrs=dims,
            scalars=scalars,
        ))
    slots = []
    for held in mem.slots:
        forms: list[Form] = []
        for s in held:
            f = byte_form(s.type)
            if f not in forms:
                forms.append(f)
        slots.append(forms)
    used = {sym for b in mem.buffers for d in b.type.shape for sym in symbols(d)}
    return ExecutionPlan(
        target=target,
        symbols=sorted(used),
        bindings=binding_rules(graph.inputs),
        buffers=buffers,
        slots=slots,
        steps=steps,
        outputs=[ids[id(mem.values[o][0])] for o in graph.outputs],
    )


def _buffer(s: Storage, ids: dict[int, int]) -> Buffer:
    shape = [dim_form(d, f"a dim of {s.type}") for d in s.type.shape]
    b = Buffer(kind=s.kind, dtype=s.type.dtype, shape=shape)
    if s.kind in ("input", "param"):
        b.name = s.node.name
    elif s.kind == "const":
        b.value = s.node.attrs["value"]
    elif s.kind == "arena":
        b.slot = s.slot
    else:
        b.base, b.op = ids[id(s.base)], s.node.op
        b.attrs, b.dim_attrs = split_attrs(s.node)
    return b
