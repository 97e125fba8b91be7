"""torch.export of a transformers causal LM on the meta device, attention routed to kiln."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from accelerate import init_empty_weights
from transformers import AutoModelForCausalLM
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

from kiln.errors import KilnError, UnsupportedOpError
from kiln.frontend.attention import ATTN_IMPLEMENTATION
from kiln.frontend.checkpoint import Checkpoint
from kiln.frontend.recurrent import check_config, check_modules
from kiln.frontend.rope import freeze_length_dependent_rope

log = logging.getLogger(__name__)

# Placeholder token count for tracing; the token dim is dynamic, so any value > 1 works.
_TRACE_TOKENS = 8


@dataclass
class Traced:
    """What tracing produced: the exported program and what the checkpoint cannot tell."""

    program: torch.export.ExportedProgram
    buffers: dict[str, torch.Tensor]
    """Buffer values computed at construction (rotary inv_freq, ...), real tensors on CPU."""
    aliases: dict[str, list[str]]
    """Parameter name -> other names of the same tensor (tied weights)."""
    token_symbol: str
    """The export's symbol for the token dimension."""
    long_rope: list[dict]
    """Longrope modules traced with their short frequencies (kiln.frontend.rope)."""


def _tied_embedding_aliases(model: torch.nn.Module, aliases: dict[str, list[str]]) -> None:
    """With tied embeddings the checkpoint stores only the input embedding; transformers ties
    the LM head to it at load time, which a meta-device build never reaches."""
    if not getattr(model.config, "tie_word_embeddings", False):
        return
    inp, out = model.get_input_embeddings(), model.get_output_embeddings()
    if inp is None or out is None:
        return
    where = {id(m): name for name, m in model.named_modules()}
    if id(inp) in where and id(out) in where:
        head, embed = f"{where[id(out)]}.weight", f"{where[id(inp)]}.weight"
        aliases.setdefault(head, []).append(embed)


class _LogitsOnly(torch.nn.Module):
    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids, position_ids=position_ids, use_cache=False).logits


def build_meta_model(ckpt: Checkpoint, dtype: torch.dtype) -> torch.nn.Module:
    """The transformers model with parameters on the meta device and buffers computed on CPU."""
    config = ckpt.config
    check_config(config)  # before building: a stateful layer is refused with the reason
    if config.model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        raise UnsupportedOpError(
            f"model type '{config.model_type}'",
            config.model_type,
            hint="transformers has no causal-LM class for it; kiln compiles decoder-only models "
            "that AutoModelForCausalLM can build",
        )
    kwargs = {"attn_implementation": ATTN_IMPLEMENTATION, "dtype": dtype}
    # MoE experts: the batched-matmul path exports with plain ops (the default emits a custom op).
    attempts = [{**kwargs, "experts_implementation": "batched_mm"}, kwargs]
    last: Exception | None = None
    for kw in attempts:
        try:
            with init_empty_weights(include_buffers=False):
                model = AutoModelForCausalLM.from_config(config, **kw)
            check_modules(model, config.model_type)
            return model.eval()
        except (TypeError, ValueError) as e:
            last = e
        except KeyError as e:
            if ATTN_IMPLEMENTATION in str(e):
                raise own_attention_error(config.model_type) from None
            raise
    raise KilnError(f"transformers cannot build '{config.model_type}' from {ckpt.path}: {last}")


def own_attention_error(model_type: str) -> UnsupportedOpError:
    return UnsupportedOpError(
        "attention computed outside transformers' AttentionInterface",
        model_type,
        hint="this architecture implements attention (and its masks or ALiBi biases) in its own "
        "modeling code, so kiln cannot route it to its paged attention op; it is not supported yet",
    )


def trace(ckpt: Checkpoint, dtype: torch.dtype) -> Traced:
    """Export the model with a dynamic token dim; no weight is ever materialized."""
    model = build_meta_model(ckpt, dtype)
    buffers = {name: b.detach().clone() for name, b in model.named_buffers() if b.device.type != "meta"}
    aliases: dict[str, list[str]] = {}
    by_id: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        by_id.setdefault(id(p), []).append(name)
    for names in by_id.values():
        for n in names:
            aliases[n] = [m for m in names if m != n]
    _tied_embedding_aliases(model, aliases)
    long_rope = freeze_length_dependent_rope(model, ckpt.model_type)
    model.to("meta")
    ids = torch.zeros(1, _TRACE_TOKENS, dtype=torch.long, device="meta")
    pos = torch.zeros(1, _TRACE_TOKENS, dtype=torch.long, device="meta")
    tokens = torch.export.Dim("T", min=1, max=1 << 20)
    try:
        with torch.no_grad():
            program = torch.export.export(
                _LogitsOnly(model),
                (ids, pos),
                dynamic_shapes={"input_ids": {1: tokens}, "position_ids": {1: tokens}},
                strict=False,
            )
    except KilnError:
        raise
    except Exception as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UnsupportedOpError(
            "torch.export of the model",
            ckpt.model_type,
            hint=f"tracing failed: {type(e).__name__}: {first}. kiln needs the model's forward to "
            "export with a dynamic token dimension (no data-dependent Python control flow)",
        ) from None
    val = next(n for n in program.graph.nodes if n.op == "placeholder" and n.name == "input_ids").meta["val"]
    return Traced(program, buffers, aliases, str(val.shape[1]), long_rope)
