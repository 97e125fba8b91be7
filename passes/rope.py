"""rope: the traced rotary embedding of q and k becomes one `rope` op over cos/sin tables.

The cos/sin operands are not recognised by their formula. Whatever the graph computes from
`position_ids` alone (inv_freq of any scaling scheme, attention scaling, casts) is cloned with
the positions replaced by `arange(0, P)`: a weight-only table whose row p holds exactly the
values the traced graph computes at position p, which codegen folds into a stored weight.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

from kiln.ir.graph import Graph, Node
from kiln.ir.step_inputs import POSITION_IDS
from kiln.passes.base import Pass, make
from kiln.passes.rope_tables import (
    Variant,
    check_no_short_only_rope,
    long_variant,
    position_only,
    table,
    token_axis,
)

DEFAULT_MAX_POSITIONS = 4096
"""Table length when neither the pass option nor graph.meta["max_position_embeddings"] gives one."""



@dataclass(frozen=True)
class Rotation:
    """A matched rotary application: x * cos + rotate(x) * sin on the first rotary_dim features."""

    x: Node
    """The rotated value, rank 3 in its traced layout (one token axis, features last)."""
    cos: Node
    """The position-only value multiplying x (broadcast against it)."""
    sin: Node
    """The position-only value multiplying rotate(x)."""
    style: str
    """"neox" (halves) or "interleaved" (pairs)."""
    rotary_dim: int
    """How many leading features rotate; the rest pass through."""
    halves: bool = False
    """cos/sin hold rotary_dim / 2 features, shared by both rotated halves (gpt_oss)."""


Pattern = Callable[[Node, set[Node], dict[Node, Rotation]], Rotation | None]


def _last_dim(n: Node) -> int | None:
    d = n.type.shape[-1] if n.type.rank else None
    return d if isinstance(d, int) else None


def _on_last(n: Node) -> bool:
    return n.attrs["dim"] % n.type.rank == n.type.rank - 1


def _slice_of(n: Node, start: int, end: int, step: int) -> Node | None:
    """The value n slices along its last axis as [start:end:step] (an end past the axis counts)."""
    if n.op != "slice" or not _on_last(n) or (n.attrs["start"], n.attrs["step"]) != (start, step):
        return None
    x = n.inputs[0]
    width = _last_dim(x)
    stop = n.attrs["end"]
    if width is None or not isinstance(stop, int) or min(stop, width) != end:
        return None
    return x


def _scaled(m: Node, tables: set[Node]) -> tuple[Node, Node] | None:
    """(value, table) of mul(value, table) in either order."""
    if m.op != "mul":
        return None
    a, b = m.inputs
    if b in tables and a not in tables:
        return a, b
    if a in tables and b not in tables:
        return b, a
    return None


def _terms(n: Node, tables: set[Node]) -> Iterator[tuple[Node, Node, Node, Node, int]]:
    """(x, cos, rotated, sin, width) for each reading of n = x * cos + rotated * sin whose x has
    an even static last dim."""
    if n.op != "add":
        return
    for a, b in (n.inputs, n.inputs[::-1]):
        direct, rotated = _scaled(a, tables), _scaled(b, tables)
        if direct is None or rotated is None:
            continue
        (x, cos), (rot, sin) = direct, rotated
        r = _last_dim(x)
        if r is not None and r % 2 == 0:
            yield x, cos, rot, sin, r


def match_neox(n: Node, tables: set[Node], found: dict[Node, Rotation]) -> Rotation | None:
    """x * cos + cat(-x[..., h:], x[..., :h]) * sin (transformers' rotate_half)."""
    for x, cos, rot, sin, r in _terms(n, tables):
        if rot.op != "cat" or len(rot.inputs) != 2 or not _on_last(rot):
            continue
        neg, low = rot.inputs
        if neg.op == "neg" and _slice_of(neg.inputs[0], r // 2, r, 1) is x and _slice_of(low, 0, r // 2, 1) is x:
            return Rotation(x, cos, sin, "neox", r)
    return None


def match_interleaved(n: Node, tables: set[Node], found: dict[Node, Rotation]) -> Rotation | None:
    """x * cos + stack(-x[..., 1::2], x[..., ::2], -1).flatten(-2) * sin (pairs: cohere, gptj)."""
    for x, cos, rot, sin, r in _terms(n, tables):
        if rot.op != "reshape" or not rot.type.same_as(x.type):
            continue
        pairs = rot.inputs[0]
        if pairs.op != "cat" or len(pairs.inputs) != 2 or not _on_last(pairs) or pairs.type.rank != x.type.rank + 1:
            continue
        odd, even = pairs.inputs
        if odd.op != "reshape" or even.op != "reshape" or odd.type.shape[-1] != 1 or even.type.shape[-1] != 1:
            continue
        neg = odd.inputs[0]
        if neg.op == "neg" and _slice_of(neg.inputs[0], 1, r, 2) is x and _slice_of(even.inputs[0], 0, r, 2) is x:
            return Rotation(x, cos, sin, "interleaved", r)
    return None


def match_halves(n: Node, tables: set[Node], found: dict[Node, Rotation]) -> Rotation | None:
    """cat(x1 * cos - x2 * sin, x2 * cos + x1 * sin) for x = [x1 | x2] (gpt_oss): neox with
    cos/sin of half the width."""
    if n.op != "cat" or len(n.inputs) != 2 or not _on_last(n):
        return None
    first, second = n.inputs
    if first.op != "sub" or second.op != "add":
        return None
    direct, rotated = (_scaled(m, tables) for m in first.inputs)
    if direct is None or rotated is None:
        return None
    (x1, cos), (x2, sin) = direct, rotated
    h = _last_dim(x1)
    x = _slice_of(x1, 0, h, 1) if h else None
    if x is None or _last_dim(x) != 2 * h or _slice_of(x2, h, 2 * h, 1) is not x:
        return None
    terms = {_scaled(m, tables) for m in second.inputs}
    if terms != {(x2, cos), (x1, sin)}:
        return None
    return Rotation(x, cos, sin, "neox", 2 * h, halves=True)


def match_partial(n: Node, tables: set[Node], found: dict[Node, Rotation]) -> Rotation | None:
    """cat(rotation of x[..., :R], x[..., R:]) (partial rotary: phi, stablelm, gpt_neox)."""
    if n.op != "cat" or len(n.inputs) != 2 or not _on_last(n):
        return None
    rotated, rest = n.inputs
    inner = found.get(rotated)
    if inner is None or inner.rotary_dim != _last_dim(inner.x):
        return None
    r = inner.rotary_dim
    x = _slice_of(inner.x, 0, r, 1)
    if x is None:
        x = inner.x  # rotary_dim == D (phi3): canonicalize dropped the full slice; rest is empty
    width = _last_dim(x)
    if width is None or _slice_of(rest, r, width, 1) is not x:
        return None
    return Rotation(x, inner.cos, inner.sin, inner.style, r, inner.halves)


PATTERNS: tuple[Pattern, ...] = (match_neox, match_interleaved, match_halves, match_partial)


def _permuted(x: Node, dims: list[int]) -> Node:
    """x permuted by dims, cancelled against a permute below it (through casts and slices)."""
    if dims == list(range(len(dims))):
        return x
    below = x
    while below.op in ("cast", "slice"):
        below = below.inputs[0]
    if x.op == "permute":
        return _permuted(x.inputs[0], [x.attrs["dims"][d] for d in dims])
    if below.op != "permute":
        return make("permute", [x], dims=dims)
    if x.op == "cast":
        return make("cast", [_permuted(x.inputs[0], dims)], dtype=x.attrs["dtype"])
    attrs = {**x.attrs, "dim": dims.index(x.attrs["dim"] % x.type.rank)}
    return make("slice", [_permuted(x.inputs[0], dims)], **attrs)


def _cancel_permutes(n: Node) -> Node | None:
    """A permute of a permute (through casts and slices, which canonicalize does not look
    through) folded into one, or into nothing when they cancel."""
    if n.op != "permute":
        return None
    below = n.inputs[0]
    while below.op in ("cast", "slice"):
        below = below.inputs[0]
    if below.op != "permute":
        return None
    return _permuted(n.inputs[0], n.attrs["dims"])


@dataclass(frozen=True)
class Rope(Pass):
    """Matches: the rotary embedding transformers applies to q and k, on op kinds alone —
    x * cos + rotate_half(x) * sin (neox), its pairwise form (interleaved: cohere, gptj), the
    split-halves form (gpt_oss), each optionally on the first R features concatenated with the
    rest (partial rotary), in any dtype promotion; cos and sin must be computed row by row from
    `position_ids` and weights alone. Emits: one `rope(x [T, H, D], position_ids, cos [P, R],
    sin [P, R])` per match, where each table is the graph's own cos/sin subgraph cloned over
    `arange(0, P)` (P: max_positions, else graph.meta["max_position_embeddings"], else
    DEFAULT_MAX_POSITIONS) and reshaped to [P, R], a weight-only value codegen folds. Permutes
    put x in [T, H, D]; then every permute of a permute, also through casts and slices, is
    folded, so the traced transposes around q and k cancel. Longrope models (graph.meta[
    LONG_ROPE_META]) get a second pair of tables built with the long frequencies, and the op
    reads `total_lens` and `cu_seqlens` to pick a pair per token."""

    name = "rope"
    max_positions: int | None = None

    def apply(self, graph: Graph) -> Graph:
        positions = next((n for n in graph.inputs if n.name == POSITION_IDS.name), None)
        if positions is None:
            return graph
        p = self.max_positions or graph.meta.get("max_position_embeddings") or DEFAULT_MAX_POSITIONS
        tables = position_only(graph, positions)
        tables.discard(positions)
        found: dict[Node, Rotation] = {}
        for n in graph.nodes:
            for pattern in PATTERNS:
                if (m := pattern(n, tables, found)) is not None:
                    found[n] = m
                    break
        arange = make("arange", [], start=0, end=int(p), step=1, dtype=positions.type.dtype)
        variants = [Variant({positions: arange})]
        long = long_variant(graph, arange, positions)
        if long is not None:
            variants.append(long)
        replace: dict[Node, Node] = {}
        for root, rot in found.items():
            if (new := self._emit(root, rot, positions, variants, int(p))) is not None:
                replace[root] = new
        if not replace and long is None:
            return graph
        out = graph.substitute(replace).rewrite(_cancel_permutes) if replace else graph
        if long is not None:
            check_no_short_only_rope(out, long)
            out = out.with_inputs([*(i for i in out.inputs if i is not long.total_lens), long.total_lens])
        return out

    def _emit(self, root: Node, rot: Rotation, positions: Node, variants: list[Variant], p: int) -> Node | None:
        x = rot.x
        t = token_axis(x.type.shape)
        if x.type.rank != 3 or t is None or t == 2:
            return None
        width = rot.rotary_dim // 2 if rot.halves else rot.rotary_dim
        tables = []
        for v in variants:
            for value in (rot.cos, rot.sin):
                key = (value, rot.halves, t)
                if key not in v.memo:
                    v.memo[key] = table(value, t, width, v.clones, p, rot.halves)
                tables.append(v.memo[key])
        if None in tables:
            return None
        perm = [t, 1 - t, 2]  # x's layout -> [T, H, D]; its own inverse
        attrs = {"style": rot.style, "rotary_dim": rot.rotary_dim}
        operands = [_permuted(x, perm), positions, *tables]
        if len(variants) == 2:
            long = variants[1]
            operands += [long.total_lens, long.cu_seqlens]
            attrs["long_after"] = long.long_after
        out = _permuted(make("rope", operands, **attrs), perm)
        return out if out.type.same_as(root.type) else None
