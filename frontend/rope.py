"""Rotary embeddings whose frequencies depend on the sequence length (transformers' "longrope"
and "dynamic" rope types), prepared for tracing.

transformers picks such frequencies at run time from max(position_ids) + 1 and copies them into
the module's `inv_freq` buffer: a data-dependent, in-place update that does not export, and over
a flattened batch it would mix the lengths of unrelated sequences.

- longrope chooses between two fixed sets (short factors up to
  `original_max_position_embeddings`, long factors past it): tracing keeps the short set and the
  graph's meta records the long one; the `rope` pass builds a second pair of tables from it and
  the `rope` op picks, per token, the set its own sequence's length calls for.
- dynamic NTK scaling keeps the original frequencies up to `max_position_embeddings` and
  rescales them from the running length past it. kiln's engine never runs a sequence past
  `max_position_embeddings` (the position tables end there), so tracing keeps the original
  frequencies and every sequence kiln runs matches transformers exactly.
"""

from __future__ import annotations

import torch
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from kiln.errors import UnsupportedOpError


def freeze_length_dependent_rope(model: torch.nn.Module, model_type: str) -> list[dict]:
    """Freeze every length-dependent rotary module of `model` for tracing (see the module
    docstring) and return what the rope pass needs to build longrope's long tables
    (graph.meta[LONG_ROPE_META]; parameter names are the module paths the traced graph uses for
    `inv_freq`). UnsupportedOpError for per-layer-type length-dependent RoPE."""
    found: list[dict] = []
    for name, module in model.named_modules():
        rope_type = getattr(module, "rope_type", None)
        if rope_type is None or not hasattr(module, "inv_freq"):
            continue
        kinds = set(rope_type.values()) if isinstance(rope_type, dict) else {rope_type}
        if not kinds & {"dynamic", "longrope"}:
            continue
        if not isinstance(rope_type, str):
            raise UnsupportedOpError(
                f"{'/'.join(sorted(kinds & {'dynamic', 'longrope'}))} RoPE with per-layer-type parameters", model_type,
                hint="kiln handles length-dependent RoPE when one rotary module serves every layer",
            )
        if rope_type == "dynamic":  # original frequencies: exact up to max_position_embeddings
            module.rope_type = "default"
            continue
        long_after = int(module.config.rope_parameters["original_max_position_embeddings"])
        long_inv_freq, _ = ROPE_INIT_FUNCTIONS["longrope"](module.config, "cpu", seq_len=long_after + 1)
        module.rope_type = "default"  # transformers' wrapper then leaves inv_freq (short) alone
        found.append({"param": f"{name}.inv_freq", "long_inv_freq": long_inv_freq.float().tolist(),
                      "long_after": long_after})
    return found
