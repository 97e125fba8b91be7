"""LoRA adapters in PEFT's format, checked against an artifact's LoRA layout and read into slots.

An artifact compiled with `--max-lora-rank R` (kiln.passes.lora) records in its manifest, under
"lora", per LoRA-targeted linear (the key of its `lora.<key>.a` / `.b` inputs) the modules it
covers, each with its output rows and rank columns in the slot stacks:

    linear q_proj-k_proj-v_proj, slot s:       A [R3, K]            B [N, R3]
        q_proj  out [0, Nq)      rank [0, R)   rows 0..R-1 = A_q    rows [0, Nq),  cols [0, R)   = B_q * scale
        k_proj  out [Nq, Nq+Nk)  rank [R, 2R)  rows R..2R-1 = A_k   rows [Nq, ..), cols [R, 2R)  = B_k * scale
        v_proj  ...              rank [2R, 3R)                     (B block-diagonal; the rest zero)

An adapter of rank r < R fills the first r rows / columns of each module's range; its scaling
(lora_alpha / r, or lora_alpha / sqrt(r) with use_rslora) is folded into B.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

CONFIG = "adapter_config.json"
WEIGHTS = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."
A_SUFFIX, B_SUFFIX = ".lora_A.weight", ".lora_B.weight"
UNSUPPORTED = {"use_dora": False, "fan_in_fan_out": False, "bias": "none", "rank_pattern": {}, "alpha_pattern": {},
               "modules_to_save": None}
"""adapter_config.json settings kiln serves only at these values (PEFT's defaults)."""


@dataclass(frozen=True)
class LoRARequest:
    """An adapter to generate with (vLLM's names): lora_int_id identifies it (>= 1; the slot
    cache and the prefix cache key on it), lora_path is its PEFT directory."""

    lora_name: str
    lora_int_id: int
    lora_path: str | Path

    def __post_init__(self) -> None:
        if isinstance(self.lora_int_id, bool) or not isinstance(self.lora_int_id, int) or self.lora_int_id < 1:
            raise ValueError(f"lora_int_id must be an integer >= 1, got {self.lora_int_id!r}")


@dataclass(frozen=True)
class Module:
    """Where one module's A and B go in its linear's slot stacks."""

    key: str
    """The linear's key (its inputs are lora.<key>.a / .b)."""
    out: tuple[int, int]
    rank_start: int
    in_features: int


@dataclass(frozen=True)
class Adapter:
    """A checked PEFT adapter: per module, its tensor names in the safetensors file."""

    request: LoRARequest
    rank: int
    scaling: float
    tensors: dict[str, tuple[str, str]]
    """Module name -> (lora_A key, lora_B key)."""

    def load(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """Module name -> (A [r, K], B * scaling [N, r]) in float32, read from disk."""
        out = {}
        with safe_open(Path(self.request.lora_path) / WEIGHTS, framework="pt") as f:
            for module, (a, b) in self.tensors.items():
                out[module] = f.get_tensor(a).float(), f.get_tensor(b).float() * self.scaling
        return out


def modules_of(layout: dict[str, Any]) -> dict[str, Module]:
    """The manifest's LoRA layout by module name."""
    return {m["name"]: Module(key, tuple(m["out"]), m["rank"][0], lin["in_features"])
            for key, lin in layout["linears"].items() for m in lin["modules"]}


def read_adapter(request: LoRARequest, layout: dict[str, Any], max_rank: int) -> Adapter:
    """Check a PEFT adapter directory against the artifact's LoRA layout (its config, tensor
    names and shapes; no tensor data is read): ValueError saying what does not fit."""
    path = Path(request.lora_path)
    name = f"LoRA adapter '{request.lora_name}' ({path})"
    if not (path / CONFIG).is_file() or not (path / WEIGHTS).is_file():
        raise ValueError(f"{name} is not a PEFT adapter directory: it needs {CONFIG} and {WEIGHTS}")
    cfg = json.loads((path / CONFIG).read_text())
    if cfg.get("peft_type", "LORA") != "LORA":
        raise ValueError(f"{name} is a {cfg['peft_type']} adapter; kiln serves LORA adapters")
    for key, default in UNSUPPORTED.items():
        if cfg.get(key) and cfg[key] != default:
            raise ValueError(f"{name} sets {key}={cfg[key]!r}; kiln serves adapters with {key}={default!r}")
    rank = int(cfg["r"])
    if rank > max_rank:
        raise ValueError(f"{name} has rank {rank}, above max_lora_rank={max_rank}; raise max_lora_rank (the artifact "
                         f"serves ranks up to {layout['max_rank']}) or use an adapter of lower rank")
    alpha = float(cfg.get("lora_alpha", rank))
    scaling = alpha / math.sqrt(rank) if cfg.get("use_rslora") else alpha / rank
    modules = modules_of(layout)
    tensors: dict[str, tuple[str, str]] = {}
    with safe_open(path / WEIGHTS, framework="pt") as f:
        keys = set(f.keys())
        for a_key in sorted(k for k in keys if k.endswith(A_SUFFIX)):
            module = a_key[: -len(A_SUFFIX)].removeprefix(PEFT_PREFIX)
            b_key = a_key[: -len(A_SUFFIX)] + B_SUFFIX
            if b_key not in keys:
                raise ValueError(f"{name} has {a_key} without {b_key}")
            short = module.rsplit(".", 1)[-1]
            if short not in layout["targets"]:
                raise ValueError(f"{name} targets {short}, which the artifact was not compiled with LoRA for (its "
                                 f"targets: {', '.join(layout['targets'])}); recompile with --lora-targets naming it")
            if module not in modules:
                raise ValueError(f"{name} adapts module {module}, which the artifact's model does not have: the "
                                 "adapter was trained for another base model")
            m = modules[module]
            a_shape, b_shape = f.get_slice(a_key).get_shape(), f.get_slice(b_key).get_shape()
            if a_shape != [rank, m.in_features] or b_shape != [m.out[1] - m.out[0], rank]:
                raise ValueError(f"{name}: {module} has A {a_shape} and B {b_shape}; the artifact's model needs "
                                 f"A [{rank}, {m.in_features}] and B [{m.out[1] - m.out[0]}, {rank}]: the adapter "
                                 "was trained for a base model of another hidden size")
            tensors[module] = (a_key, b_key)
        other = sorted(k for k in keys if not k.endswith((A_SUFFIX, B_SUFFIX)))
    if other:
        raise ValueError(f"{name} holds tensors other than LoRA A/B ({', '.join(other[:3])}); kiln serves plain "
                         "LoRA adapters")
    if not tensors:
        raise ValueError(f"{name} holds no lora_A / lora_B weights")
    return Adapter(request, rank, scaling, tensors)
