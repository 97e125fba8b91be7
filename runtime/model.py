"""A loaded artifact as a model: one flattened batch in, logits out."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from kiln.ir.step_inputs import (
    DEFAULT_BLOCK_SIZE,
    INPUT_IDS,
    LOGITS_INDICES,
    POSITION_IDS,
    base_lora_inputs,
    is_cache_input,
    whole_sequence_inputs,
)
from kiln.ir.types import TensorType
from kiln.runtime.artifact import GRAPH, TOKENIZER_DIR, TUNING, Artifact
from kiln.runtime.executor import PlanExecutor
from kiln.runtime.kernel_binaries import install as install_kernels
from kiln.runtime.plan import load_plan
from kiln.runtime.weights import load_weights

CUDA_TARGET = "cuda"
CPU_TARGET = "cpu"


class CompiledModel:
    """An artifact loaded for execution (the runtime's view: no compiler code involved)."""

    def __init__(self, path: str | Path, device: str | torch.device = "cpu", target: str | None = None,
                 limits: Mapping[str, int] | None = None, verify: bool = True):
        """Load and validate the artifact at `path` onto `device`; `target` (when given) must be
        the one it was compiled for; `limits` are the largest symbol values a call will have
        (T tokens, S sequences, ...: see PlanExecutor), sizing the arena at load. Every file the
        manifest lists (the tokenizer's aside: runtime/tokenizer.py reads those) has its content
        hash checked as it is read; `verify=False` skips the hashing."""
        self.path = Path(path)
        artifact = Artifact(self.path, target, verify=verify)
        self.manifest = artifact.manifest
        self.plan = load_plan(artifact)
        self.fixed_symbols: dict[str, int] = {}
        """Symbols the compiled kernels serve at one value only ({"BS": 16} on the cpu target)."""
        self.tuning: dict[str, Any] | None = None
        """The artifact's tuning.json (cuda: read by the kernels that take configs)."""
        if self.manifest.get("target") == CUDA_TARGET:
            install_kernels(artifact, torch.device(device))
            self.tuning = artifact.read_json(TUNING) if artifact.has(TUNING) else None
        elif self.manifest.get("target") == CPU_TARGET:
            from kiln.runtime.tvm_library import install as install_library

            self.fixed_symbols = install_library(artifact)
        weights = load_weights(artifact, set(self.plan.params), device)
        self.executor = PlanExecutor(self.plan, weights, device, limits, tuning=self.tuning)
        self.config: dict[str, Any] = artifact.read_json("config.json")
        artifact.verify_rest(skip_prefix=(TOKENIZER_DIR + "/",))
        self.vocab_size: int = self.manifest["model"]["vocab_size"]

    @property
    def cache_types(self) -> dict[str, TensorType]:
        """The per-layer KV-cache inputs of the plan ([NB, BS, Hkv, D] each)."""
        return {k: t for k, t in self.executor.input_types.items() if is_cache_input(k)}

    @property
    def block_size(self) -> int | None:
        """The KV block size the kernels were compiled for, or None when any block size runs."""
        return self.fixed_symbols.get("BS")

    def check_block_size(self, block_size: int) -> None:
        """ValueError unless the artifact's kernels run caches of `block_size`-token blocks."""
        if self.block_size is not None and block_size != self.block_size:
            raise ValueError(
                f"'{self.path}' runs paged attention with blocks of {self.block_size} tokens (its "
                f"{self.manifest.get('target')} kernels are compiled for that size); got block_size={block_size}: "
                f"leave block_size at {self.block_size}, or use a reference-target artifact")

    @property
    def tokenizer_dir(self) -> Path:
        return self.path / TOKENIZER_DIR

    @property
    def graph_path(self) -> Path:
        return self.path / GRAPH

    @torch.no_grad()
    def forward(
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor,
        seq_lens: Sequence[int] | torch.Tensor,
        logits_indices: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Logits [T, V] (or [len(logits_indices), V]) for one flattened batch: input_ids and
        position_ids are 1-D LongTensors of T tokens, the sequences concatenated; seq_lens their
        lengths. Each sequence attends only to itself, causally (and runs the base model where
        the artifact serves LoRA adapters). The logits are a copy (the
        executor's outputs live in its arena)."""
        input_ids, position_ids = _tokens("input_ids", input_ids), _tokens("position_ids", position_ids)
        lens = torch.as_tensor(seq_lens, dtype=torch.int64).reshape(-1)
        total = input_ids.shape[0]
        if position_ids.shape[0] != total:
            raise ValueError(f"position_ids has {position_ids.shape[0]} tokens, input_ids {total}")
        if (lens <= 0).any() or int(lens.sum()) != total:
            raise ValueError(f"seq_lens {lens.tolist()} must be positive and sum to the {total} tokens")
        if (input_ids < 0).any() or (input_ids >= self.vocab_size).any():
            raise ValueError(f"input_ids must lie in [0, {self.vocab_size})")
        # Whole sequences; a throwaway paged cache holding just this batch.
        inputs = {INPUT_IDS.name: input_ids, POSITION_IDS.name: position_ids,
                  **whole_sequence_inputs(lens.tolist(), self.plan.inputs, self.cache_types,
                                          self.block_size or DEFAULT_BLOCK_SIZE),
                  **base_lora_inputs(self.plan.inputs, self.executor.input_types, total)}
        if LOGITS_INDICES.name in self.plan.inputs:
            inputs[LOGITS_INDICES.name] = (
                torch.arange(total) if logits_indices is None else logits_indices.to(torch.int64)
            )
        device = self.executor.device  # the throwaway caches are written in place: they live on the device
        inputs = {k: v.to(device) if is_cache_input(k) else v for k, v in inputs.items()}
        return self.executor.run(inputs)[0].clone()

    __call__ = forward


def _tokens(name: str, t: torch.Tensor) -> torch.Tensor:
    t = torch.as_tensor(t)
    if t.dim() != 1 or t.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"{name} must be a 1-D LongTensor (got {tuple(t.shape)} {t.dtype})")
    return t.to(torch.int64)
