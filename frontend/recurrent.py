"""Refuse hybrid and recurrent models (Mamba / SSM / linear attention / short convolutions).

Such layers carry a per-sequence state from one step to the next (an SSM state, a convolution's
last few inputs, a linear-attention accumulator). kiln's engine keeps a paged KV cache and no
other state, so a model with them would trace (or, given a ``conv1d`` converter, even compile)
and then decode wrongly. They are refused up front, before tracing, with a message that says so.

Two checks: the config (per-layer type lists such as ``layer_types``/``layers_block_type``, and,
where there is no such list, fields only these families have: ``mamba_*``, ``ssm_*``,
``conv_L_cache``, ``linear_conv_kernel_dim``) and the module tree of the meta-device model
(module classes named after those layers, ``torch.nn.Conv1d``).
"""

from __future__ import annotations

import re

import torch
from transformers import PretrainedConfig

from kiln.errors import UnsupportedOpError

# Per-layer kind lists and the words that mark a stateful kind in them ("linear_attention",
# "mamba", "hybrid" (falcon_h1: attention and Mamba side by side), "recurrent", "conv", ...).
_LAYER_LISTS = ("layer_types", "layers_block_type", "block_types", "hybrid_override_pattern")
_STATEFUL_KIND = re.compile(r"mamba|ssm|linear|conv|recurr|rwkv|hybrid|lstm|delta|retention", re.I)
# Config fields that only stateful families have (used when the config lists no layer kinds).
_STATEFUL_FIELD = re.compile(r"^(mamba_|ssm_|conv_L_cache$|linear_conv_kernel_dim$|linear_attn)")
# Module classes that hold a recurrent state.
_STATEFUL_MODULE = re.compile(
    r"Mamba|SSM|Ssm|ShortConv|GatedDeltaNet|DeltaNet|LinearAttention|Recurrent|Rglru|Rwkv|RWKV|LSTM|Lstm"
)

HINT = (
    "kiln's engine keeps no recurrent state (only a paged KV cache of attention keys and values), "
    "so recurrent, state-space (Mamba/SSM), linear-attention and short-convolution layers are "
    "not supported yet; only models whose every sequence-mixing layer is attention compile"
)


def _refuse(found: str, model_type: str) -> UnsupportedOpError:
    return UnsupportedOpError(f"recurrent / state-space layers ({found})", model_type, hint=HINT)


def check_config(config: PretrainedConfig) -> None:
    """Raise UnsupportedOpError when ``config`` describes stateful sequence-mixing layers."""
    model_type = getattr(config, "model_type", None)
    listed = False
    for key in _LAYER_LISTS:
        kinds = getattr(config, key, None)
        if isinstance(kinds, str):  # e.g. nemotron_h's "M-M*-" pattern: M = Mamba
            kinds = ["mamba"] if "M" in kinds else []
        if not isinstance(kinds, list | tuple):
            continue
        listed = True
        bad = sorted({str(k) for k in kinds if _STATEFUL_KIND.search(str(k))})
        if bad:
            raise _refuse(f"config {key} lists {', '.join(map(repr, bad))}", model_type)
    if listed:
        return
    fields = sorted(k for k in config.to_dict() if _STATEFUL_FIELD.match(k))
    if fields:
        shown = ", ".join(fields[:3]) + (", ..." if len(fields) > 3 else "")
        raise _refuse(f"config fields {shown}", model_type)


def check_modules(model: torch.nn.Module, model_type: str | None) -> None:
    """Raise UnsupportedOpError when ``model`` holds a Mamba/SSM/recurrent/conv-state module."""
    for name, module in model.named_modules():
        cls = type(module).__name__
        if isinstance(module, torch.nn.Conv1d) or _STATEFUL_MODULE.search(cls):
            raise _refuse(f"module {name} of class {cls}", model_type)
