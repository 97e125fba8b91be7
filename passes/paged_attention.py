"""paged-attention: attention over the paged KV cache."""

from __future__ import annotations

from dataclasses import dataclass

from kiln.ir.graph import Graph, Node, input_node
from kiln.ir.types import TensorType
from kiln.passes.base import Pass, make

# Symbols: NB cache blocks, BS tokens per block, MB blocks per block-table row, S sequences.
CACHE_SHAPE = ("NB", "BS")
CACHE_INPUTS = ("k_cache", "v_cache")


@dataclass(frozen=True)
class PagedAttention(Pass):
    """Matches: every `attention` node (q/k/v of the step's new tokens, [T, H, D]).
    Emits: `paged_attention` reading per-layer cache inputs `k_cache.{i}` / `v_cache.{i}`
    ([NB, BS, Hkv, D], the model dtype) and the step metadata inputs `slot_mapping` (int64
    [T]), `block_tables` (int32 [S, MB]) and `seq_lens` (int32 [S], lengths including the new
    tokens), so a step can mix prefill chunks and decodes of sequences with cached context."""

    name = "paged-attention"

    def apply(self, graph: Graph) -> Graph:
        layers = [n for n in graph.nodes if n.op == "attention"]
        if not layers:
            return graph
        meta = {
            "slot_mapping": input_node("slot_mapping", TensorType("int64", ("T",))),
            "block_tables": input_node("block_tables", TensorType("int32", ("S", "MB"))),
            "seq_lens": input_node("seq_lens", TensorType("int32", ("S",))),
        }
        caches: list[Node] = []
        replace: dict[Node, Node] = {}
        for i, n in enumerate(layers):
            q, k, v, cu = n.inputs[:4]
            kc = input_node(f"k_cache.{i}", TensorType(k.type.dtype, (*CACHE_SHAPE, *k.type.shape[-2:])))
            vc = input_node(f"v_cache.{i}", TensorType(v.type.dtype, (*CACHE_SHAPE, *v.type.shape[-2:])))
            caches += [kc, vc]
            replace[n] = make(
                "paged_attention",
                [q, k, v, kc, vc, meta["slot_mapping"], meta["block_tables"], meta["seq_lens"], cu, *n.inputs[4:]],
                **n.attrs,
            )
        out = graph.substitute(replace)
        new = set(caches) | set(meta.values())
        return out.with_nodes([*(i for i in out.inputs if i not in new), *meta.values(), *caches], out.outputs)
