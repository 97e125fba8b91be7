"""Rotary embeddings whose frequencies depend on the sequence length (transformers' "longrope"
and "dynamic" rope types), prepared for tracing.

transformers picks such frequencies at run time from max(position_ids) + 1 and copies them into
the module's `inv_freq` buffer: a data-dependent, in-place update that does not export, and over
a flattened batch it would mix the lengths of unrelated sequences. For longrope, the choice is
between two fixed sets (short factors up to `original_max_position_embeddings`, long factors
past it), so tracing keeps the short set and the graph's meta records the long one; the `rope`
pass builds a second pair of tables from it and the `rope` op picks, per token, the set its own
sequence's length calls for. Dynamic NTK scaling recomputes the frequencies from every new
length (and transformers keeps state across calls), so no table reproduces it: refused.
"""

from __future__ import annotations

import torch
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from kiln.errors import UnsupportedOpError


def freeze_length_dependent_rope(model: torch.nn.Module, model_type: str) -> list[dict]:
    """Switch every longrope rotary module of `model` to its short frequencies for tracing and
    return what the rope pass needs to build the long tables (graph.meta[LONG_ROPE_META]); UnsupportedOpError for dynamic
    scaling. (Parameter names are the module paths the traced graph uses for `inv_freq`.)"""
    found: list[dict] = []
    for name, module in model.named_modules():
        rope_type = getattr(module, "rope_type", None)
        if rope_type is None or not hasattr(module, "inv_freq"):
            continue
        kinds = set(rope_type.values()) if isinstance(rope_type, dict) else {rope_type}
        if any("dynamic" in k for k in kinds):
            raise UnsupportedOpError(
                "dynamic NTK RoPE scaling (rope_type 'dynamic')", model_type,
                hint="it recomputes the rotary frequencies from the running sequence length at every "
                "call, which no fixed table reproduces; static scalings (linear, yarn, llama3, longrope) "
                "are supported",
            )
        if "longrope" not in kinds:
            continue
        if not isinstance(rope_type, str):
            raise UnsupportedOpError(
                "longrope with per-layer-type RoPE parameters", model_type,
                hint="kiln handles longrope when one rotary module serves every layer",
            )
        long_after = int(module.config.rope_parameters["original_max_position_embeddings"])
        long_inv_freq, _ = ROPE_INIT_FUNCTIONS["longrope"](module.config, "cpu", seq_len=long_after + 1)
        module.rope_type = "default"  # transformers' wrapper then leaves inv_freq (short) alone
        found.append({"param": f"{name}.inv_freq", "long_inv_freq": long_inv_freq.float().tolist(),
                      "long_after": long_after})
    return found
