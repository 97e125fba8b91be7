"""lora: a multi-LoRA update beside each targeted linear layer, its adapters chosen per token."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from kiln.ir.graph import Graph, Node, input_node
from kiln.ir.ops.lora import INDEX_DTYPE
from kiln.ir.step_inputs import LORA_INDEX, LORA_SLOTS, lora_input_names
from kiln.ir.types import TensorType
from kiln.passes.base import Pass, make, weight_only

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
"""The modules LoRA adapters target by default (PEFT's names for Llama-like decoders)."""

META = "lora"
"""graph.meta key of the layout the runtime fills adapters into (see Lora)."""


def _param(w: Node) -> Node | None:
    """The first param a weight-only value reads (the weight itself, or a packed weight's
    qweight), depth first."""
    stack = [w]
    while stack:
        n = stack.pop()
        if n.op == "param":
            return n
        stack.extend(reversed(n.inputs))
    return None


def _module(w: Node, targets: tuple[str, ...]) -> str | None:
    """The module a weight belongs to, its name cut after its last component among `targets`
    (model.layers.0.self_attn.q_proj for ...q_proj.weight or ...q_proj.weight.qweight), or
    None when it is no target's."""
    p = _param(w)
    if p is None:
        return None
    parts = p.name.split(".")
    last = max((i for i, c in enumerate(parts) if c in targets), default=None)
    return None if last is None else ".".join(parts[: last + 1])


def _key(modules: list[str]) -> str:
    """One name for a linear's modules: the module, or their common dotted prefix followed by
    the rest of each joined with '-' (model.layers.0.self_attn.q_proj-k_proj-v_proj)."""
    split = [m.split(".") for m in modules]
    common = 0
    while all(len(s) > common + 1 and s[common] == split[0][common] for s in split):
        common += 1
    rest = "-".join(".".join(s[common:]) for s in split)
    return ".".join([*split[0][:common], rest])


@dataclass(frozen=True)
class Lora(Pass):
    """Matches: `linear(x [T, K], W)` whose weight depends on params only and belongs to a
    module named in `targets` (W a param, a dequantized packed weight, or merge-projections'
    row `cat` of them, each member one module). Emits: lora(x, A, B, lora_index, linear(x, W))
    (the update added to the linear's result by the lora kernel) with graph inputs `lora.<module>.a` [NL, R, K] and `.b` [NL, N, R] (engine-owned
    slot stacks, NL symbolic) and the per-token step input `lora_index` [T]. A merged linear gets
    one lora op: R = max_rank x its targeted members, A's rank rows stacked member by member, B
    block-diagonal (member i's output rows read only its rank columns; untargeted members' rows
    stay zero). graph.meta["lora"] records the layout: max_rank, targets, and per linear (keyed
    by its input names' stem) in_features, out_features, rank and each module's `out` and `rank`
    [start, end) ranges."""

    name = "lora"
    max_rank: int = 16
    targets: tuple[str, ...] = field(default=TARGETS)

    def apply(self, graph: Graph) -> Graph:
        index = input_node(LORA_INDEX.name, TensorType(INDEX_DTYPE, LORA_INDEX.shape))
        replace: dict[Node, Node] = {}
        linears: dict[str, dict] = {}
        for n in graph.nodes:
            found = self._match(n)
            if found is None:
                continue
            key, layout = found
            x, w = n.inputs[0], n.inputs[1]
            a_name, b_name = lora_input_names(key)
            rank = layout["rank"]
            a = input_node(a_name, TensorType(w.type.dtype, (LORA_SLOTS, rank, x.type.shape[1])))
            b = input_node(b_name, TensorType(w.type.dtype, (LORA_SLOTS, n.type.shape[1], rank)))
            replace[n] = make("lora", [x, a, b, index, n])
            linears[key] = layout
        if not replace:
            raise ValueError(f"no linear layer of modules {', '.join(self.targets)} to add LoRA to; the model's "
                             "linears belong to other modules (choose --lora-targets among them)")
        out = graph.substitute(replace)
        out.meta[META] = {"max_rank": self.max_rank, "targets": list(self.targets), "linears": linears}
        return out

    def _match(self, n: Node) -> tuple[str, dict] | None:
        """(key, layout) of a targeted linear, else None."""
        if n.op != "linear" or n.attrs.get("weight_layout", "out_in") != "out_in" or len(n.inputs) < 2:
            return None
        x, w = n.inputs[0], n.inputs[1]
        if x.type.rank != 2 or w.type.rank != 2 or not weight_only(w):
            return None
        members = list(w.inputs) if w.op == "cat" and w.attrs.get("dim") in (0, -2) else [w]
        names = [_module(m, self.targets) for m in members]
        if not any(names):
            return None
        modules, out_start, rank = [], 0, 0
        for m, name in zip(members, names, strict=True):
            rows = m.type.shape[0]
            if name is not None:
                modules.append({"name": name, "out": [out_start, out_start + rows],
                                "rank": [rank, rank + self.max_rank]})
                rank += self.max_rank
            out_start += rows
        layout = {"in_features": x.type.shape[1], "out_features": n.type.shape[1], "rank": rank,
                  "modules": modules}
        return _key([m["name"] for m in modules]), layout


def lora_pass(max_rank: int | None, targets: Sequence[str] | None) -> Lora | None:
    """The lora pass of compile's max_lora_rank / lora_targets, or None without a rank."""
    if max_rank is None:
        if targets is not None:
            raise ValueError("lora_targets (--lora-targets) needs max_lora_rank (--max-lora-rank)")
        return None
    if isinstance(max_rank, bool) or not isinstance(max_rank, int) or max_rank < 1:
        raise ValueError(f"max_lora_rank must be a positive integer, got {max_rank!r}")
    if isinstance(targets, str):
        targets = targets.split(",")
    chosen = tuple(dict.fromkeys(t.strip() for t in (targets or TARGETS) if t.strip()))
    unknown = sorted(set(chosen) - set(TARGETS))
    if unknown or not chosen:
        raise ValueError(f"LoRA targets {unknown or 'none'}: choose among {', '.join(TARGETS)}")
    return Lora(max_rank=max_rank, targets=chosen)


def with_lora_pass(names: list[str]) -> list[str]:
    """The pipeline with the lora pass after merge-projections (so merged linears get one lora
    op), else before the first fusion; always before quantized-linear and the fusions that read
    linears (gated-linear, weight-panels), which keep the lora reading the linear they rewrite."""
    if Lora.name in names:
        return names
    if "merge-projections" in names:
        at = names.index("merge-projections") + 1
    else:
        before = ("canonicalize", "cse", "dce", "quantize-weights")
        at = next((i for i, n in enumerate(names) if n not in before), len(names))
    return [*names[:at], Lora.name, *names[at:]]
