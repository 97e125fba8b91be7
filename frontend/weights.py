"""Where each traced parameter's values come from at compile time."""

from __future__ import annotations

import logging

import torch

from kiln.errors import CheckpointError
from kiln.frontend.checkpoint import Checkpoint
from kiln.ir.types import TensorType, torch_dtype

log = logging.getLogger(__name__)


class SourceWeights:
    """Resolves IR param names (module paths) to tensors, read lazily and cast to the param's
    dtype: a checkpoint key of the same name (or with the base-model prefix added or removed),
    a tied alias, a buffer computed at construction, or, when the checkpoint stores a layout
    transformers converts at load (fused MoE experts in transformers 5), the tensor that
    transformers' own loader produces."""

    def __init__(self, ckpt: Checkpoint, buffers: dict[str, torch.Tensor], aliases: dict[str, list[str]],
                 base_prefix: str, dtype: torch.dtype):
        self.ckpt = ckpt
        self.buffers = buffers
        self.aliases = aliases
        self.base_prefix = base_prefix
        self.dtype = dtype
        self._converted: dict[str, torch.Tensor] | None = None

    def _candidates(self, name: str) -> list[str]:
        names = [name, *self.aliases.get(name, [])]
        out = []
        for n in names:
            out.append(n)
            p = self.base_prefix + "."
            out.append(n[len(p):] if n.startswith(p) else p + n)
        return out

    def source_key(self, name: str) -> str | None:
        """The checkpoint key that stores `name` as is, or None."""
        return next((k for k in self._candidates(name) if k in self.ckpt.key_to_file), None)

    def _via_transformers(self) -> dict[str, torch.Tensor]:
        if self._converted is None:
            from transformers import AutoModelForCausalLM

            log.warning("checkpoint layout differs from the module's; loading it through transformers")
            kw = {"dtype": self.dtype, "output_loading_info": True}
            try:
                model, info = AutoModelForCausalLM.from_pretrained(
                    self.ckpt.path, experts_implementation="batched_mm", **kw
                )
            except (TypeError, ValueError):
                model, info = AutoModelForCausalLM.from_pretrained(self.ckpt.path, **kw)
            # transformers initializes what the checkpoint lacks: never let that into an artifact.
            missing = set(info.get("missing_keys", ()))
            self._converted = {
                k: v.detach() for k, v in model.state_dict(keep_vars=False).items() if k not in missing
            }
        return self._converted

    def __call__(self, name: str, type_: TensorType) -> torch.Tensor:
        key = self.source_key(name)
        if key is not None:
            t = self.ckpt.read(key)
        elif name in self.buffers:
            t = self.buffers[name]
        else:
            converted = self._via_transformers()
            found = next((k for k in self._candidates(name) if k in converted), None)
            if found is None:
                raise CheckpointError(f"checkpoint {self.ckpt.path} has no tensor for parameter '{name}'")
            t = converted[found]
        want = tuple(type_.shape)
        if tuple(t.shape) != want:
            raise CheckpointError(
                f"tensor '{name}' in {self.ckpt.path} has shape {tuple(t.shape)}, the model expects {want}"
            )
        return t.to(torch_dtype(type_.dtype))
