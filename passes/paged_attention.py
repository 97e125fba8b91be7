"""paged-attention: attention over the paged KV cache, with the cache write as its own op."""

from __future__ import annotations

from dataclasses import dataclass

from kiln.ir.graph import Graph, Node, input_node
from kiln.ir.step_inputs import (
    BLOCK_TABLES,
    PAGED_INPUTS,
    SEQ_LENS,
    SLOT_MAPPING,
    cache_type,
    k_cache_name,
    v_cache_name,
)
from kiln.passes.base import Pass, make


@dataclass(frozen=True)
class PagedAttention(Pass):
    """Matches: every `attention` node (q/k/v of the step's new tokens, [T, H, D]).
    Emits: per layer i, `kv_cache_write(k, v, k_cache.{i}, v_cache.{i}, slot_mapping)`, which
    writes the caches in place and returns them, then `paged_attention` reading the written
    caches with `block_tables` and `seq_lens`; the caches ([NB, BS, Hkv, D], the model dtype)
    and the paged metadata are graph inputs from the step-input schema (kiln.ir.step_inputs)."""

    name = "paged-attention"

    def apply(self, graph: Graph) -> Graph:
        layers = [n for n in graph.nodes if n.op == "attention"]
        if not layers:
            return graph
        meta = {i.name: input_node(i.name, i.type) for i in PAGED_INPUTS}
        caches: list[Node] = []
        replace: dict[Node, Node] = {}
        for i, n in enumerate(layers):
            q, k, v, cu = n.inputs[:4]
            kc = input_node(k_cache_name(i), cache_type(k.type.dtype, *k.type.shape[-2:]))
            vc = input_node(v_cache_name(i), cache_type(v.type.dtype, *v.type.shape[-2:]))
            caches += [kc, vc]
            written = make("kv_cache_write", [k, v, kc, vc, meta[SLOT_MAPPING.name]])
            kw, vw = (make("get_result", [written], index=j) for j in (0, 1))
            replace[n] = make(
                "paged_attention",
                [q, kw, vw, meta[BLOCK_TABLES.name], meta[SEQ_LENS.name], cu, *n.inputs[4:]],
                **n.attrs,
            )
        out = graph.substitute(replace)
        new = set(caches) | set(meta.values())
        return out.with_inputs([*(i for i in out.inputs if i not in new), *meta.values(), *caches])
