"""Hugging Face checkpoint -> kiln IR: load, trace on the meta device, convert."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kiln.frontend import attention as _attention  # noqa: F401  (registers kiln::attention)
from kiln.frontend.checkpoint import Checkpoint, load_checkpoint
from kiln.frontend.weights import SourceWeights
from kiln.ir.graph import Graph
from kiln.ir.ops.kernels import LONG_ROPE_META


@dataclass
class Imported:
    """A traced model: its IR, where its weights come from, and the checkpoint it came from."""

    graph: Graph
    weights: SourceWeights
    checkpoint: Checkpoint


def import_model(model_dir: str | Checkpoint, dtype: torch.dtype = torch.float32) -> Imported:
    """Trace the checkpoint's transformers model into kiln IR (no weight is read). `model_dir` is
    a checkpoint directory or an opened Checkpoint (a GGUF file's, say)."""
    from kiln.frontend.aten import TABLE
    from kiln.frontend.convert import Converter
    from kiln.frontend.trace import own_attention_error, trace

    ckpt = model_dir if isinstance(model_dir, Checkpoint) else load_checkpoint(model_dir)
    traced = trace(ckpt, dtype)
    graph = Converter(traced.program, traced.token_symbol, ckpt.model_type).run(TABLE)
    if not any(n.op == "attention" for n in graph.nodes):
        # Attention the model computes itself would mix the sequences of a flattened batch.
        raise own_attention_error(ckpt.model_type)
    config = ckpt.config
    graph.meta.update(
        model_type=ckpt.model_type,
        architectures=list(getattr(config, "architectures", None) or []),
        vocab_size=int(graph.outputs[0].type.shape[-1]),
        max_position_embeddings=getattr(config, "max_position_embeddings", None)
        or getattr(config, "n_positions", None),
    )
    if traced.long_rope:
        graph.meta[LONG_ROPE_META] = traced.long_rope
    base = getattr(config, "base_model_prefix", "") or ""
    weights = SourceWeights(ckpt, traced.buffers, traced.aliases, base, dtype)
    return Imported(graph, weights, ckpt)
