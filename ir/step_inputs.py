"""The step inputs: what the runtime hands a compiled graph each step, in one place.

Passes create these inputs, `--verify` and the debug `forward` fabricate them, and the runtime's
model runner fills them; all read names, dtypes, shapes and padding rules from here.

Symbols: T tokens of the step (prefill chunks and decodes concatenated), S sequences, R sampled
rows, NB cache blocks, BS tokens per block, MB blocks per block-table row (fixed per engine:
enough blocks for the longest sequence the engine admits, so the table keeps one width), NL
LoRA adapter slots (graphs compiled with LoRA: `lora.<module>.a` / `.b` slot stacks, engine-owned
like the KV caches, and `lora_index`, each token's slot).

Padding (a decode step of B sequences runs as a bucketed B' >= B so its shapes repeat):

    token rows  B..B'-1: input_ids 0, position_ids 0, slot_mapping -1 (written to no slot),
                         lora_index -1 (no adapter)
    sequences   B..B'-1: seq_lens and total_lens 0, cu_seqlens repeats its last value (no query rows),
                         block_tables row all 0
    logits_indices: a padded decode step lists B' rows (padded ones 0) so one graph serves the bucket;
                   only the first B are sampled.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass

import torch

from kiln.ir.dims import Dim
from kiln.ir.types import TensorType, torch_dtype


@dataclass(frozen=True)
class StepInput:
    """One per-step graph input."""

    name: str
    dtype: str
    shape: tuple[Dim, ...]
    pad: int
    """Value of a padded row (token or sequence)."""
    doc: str

    @property
    def type(self) -> TensorType:
        return TensorType(self.dtype, self.shape)


INPUT_IDS = StepInput("input_ids", "int64", ("T",), 0, "token ids of the step, sequences concatenated")
POSITION_IDS = StepInput("position_ids", "int64", ("T",), 0, "each token's position in its sequence")
CU_SEQLENS = StepInput("cu_seqlens", "int32", ("S+1",), 0,
                       "query start offsets: sequence s owns rows cu_seqlens[s]:cu_seqlens[s+1]")
LOGITS_INDICES = StepInput("logits_indices", "int64", ("R",), 0, "rows whose logits are sampled")
SLOT_MAPPING = StepInput("slot_mapping", "int64", ("T",), -1,
                         "cache slot (block * BS + offset) each token's K/V is written to; -1: none")
BLOCK_TABLES = StepInput("block_tables", "int32", ("S", "MB"), 0, "each sequence's cache blocks, in order")
SEQ_LENS = StepInput("seq_lens", "int32", ("S",), 0, "each sequence's length including this step's tokens")
TOTAL_LENS = StepInput("total_lens", "int32", ("S",), 0,
                       "each sequence's whole length so far, tokens of later chunks included (longrope)")

LORA_INDEX = StepInput("lora_index", "int32", ("T",), -1,
                       "each token's LoRA adapter slot; -1: the base model (graphs compiled with LoRA)")

STEP_INPUTS: dict[str, StepInput] = {
    i.name: i for i in (INPUT_IDS, POSITION_IDS, CU_SEQLENS, LOGITS_INDICES, SLOT_MAPPING, BLOCK_TABLES, SEQ_LENS,
                        TOTAL_LENS, LORA_INDEX)
}
"""Every per-step input except the KV caches, by name."""

PAGED_INPUTS = (SLOT_MAPPING, BLOCK_TABLES, SEQ_LENS)
"""The metadata of attention over the paged KV cache."""

DEFAULT_BLOCK_SIZE = 16
"""Tokens per KV-cache block (BS) unless the engine is told otherwise; the cpu target compiles
its paged-attention kernel for this block size."""

CACHE_SHAPE = ("NB", "BS")
"""Leading dims of a layer's K or V cache: [NB, BS, Hkv, D]."""

HOST_INTS = ("max_seq_len", "max_query_len")
"""Integers the runtime knows on the host each step (kernels size their grids with them)."""


LORA_SLOTS = "NL"
"""The symbol of the adapter slot count: the engine's max_loras."""
LORA_PREFIX = "lora."


def lora_input_names(key: str) -> tuple[str, str]:
    """The graph inputs of a LoRA-targeted linear's slot stacks: A [NL, R, K] and B [NL, N, R]."""
    return f"{LORA_PREFIX}{key}.a", f"{LORA_PREFIX}{key}.b"


def is_lora_input(name: str) -> bool:
    """Whether a graph input is a LoRA slot stack (engine-owned, filled in place per adapter)."""
    return name.startswith(LORA_PREFIX)


def base_lora_inputs(names: Collection[str], types: Mapping[str, TensorType], tokens: int) -> dict[str, torch.Tensor]:
    """The LoRA inputs among `names` for a step of the base model alone (the debug forward and
    --verify): every token at slot -1, one zero slot per stack."""
    out = {n: torch.zeros([1, *(int(d) for d in t.shape[1:])], dtype=torch_dtype(t.dtype))
           for n, t in types.items() if is_lora_input(n) and n in names}
    if LORA_INDEX.name in names:
        out[LORA_INDEX.name] = torch.full((tokens,), LORA_INDEX.pad, dtype=torch_dtype(LORA_INDEX.dtype))
    return out


def k_cache_name(layer: int) -> str:
    return f"k_cache.{layer}"


def v_cache_name(layer: int) -> str:
    return f"v_cache.{layer}"


def is_cache_input(name: str) -> bool:
    """Whether a graph input is a layer's K or V cache (engine-owned, updated in place)."""
    return name.startswith(("k_cache.", "v_cache."))


def cache_type(dtype: str, heads: Dim, head_dim: Dim) -> TensorType:
    """The type of one layer's K or V cache."""
    return TensorType(dtype, (*CACHE_SHAPE, heads, head_dim))


# Token-count buckets: a step of n tokens runs padded to the next bucket (CUDA graphs are
# captured per bucket). 1, 2, 4, 8, then steps of 16.
def bucket_tokens(n: int, limit: int) -> int:
    """The padded token count of a step of n tokens (never above limit, never below n)."""
    if n < 1:
        raise ValueError(f"a step has at least one token, got {n}")
    b = 1
    while b < min(n, 8):
        b *= 2
    if n > 8:
        b = -(-n // 16) * 16
    return max(n, min(b, limit))


def token_buckets(limit: int) -> list[int]:
    """Every bucket up to limit, ascending."""
    out = [b for b in (1, 2, 4, 8) if b <= limit]
    out += list(range(16, limit + 1, 16))
    if not out or out[-1] != limit:
        out.append(limit)
    return out


def contiguous_paged_inputs(
    lengths: Sequence[int], block_size: int, cache_types: Mapping[str, TensorType], *, shuffle_seed: int | None = None
) -> dict[str, torch.Tensor]:
    """Paged-attention metadata and empty caches for whole sequences computed in one step
    (the debug forward and --verify). Blocks are handed out in order, or in a seeded random
    order with shuffle_seed, so block tables are exercised."""
    per_seq = [(n + block_size - 1) // block_size for n in lengths]
    total = sum(per_seq)
    order = list(range(total))
    if shuffle_seed is not None:
        order = torch.randperm(total, generator=torch.Generator().manual_seed(shuffle_seed)).tolist()
    tables = torch.zeros(len(lengths), max(per_seq, default=1), dtype=torch_dtype(BLOCK_TABLES.dtype))
    slots: list[int] = []
    used = 0
    for s, (n, nblocks) in enumerate(zip(lengths, per_seq, strict=True)):
        blocks = order[used : used + nblocks]
        used += nblocks
        tables[s, :nblocks] = torch.tensor(blocks, dtype=tables.dtype)
        slots.extend(blocks[j // block_size] * block_size + j % block_size for j in range(n))
    out = {
        SLOT_MAPPING.name: torch.tensor(slots, dtype=torch_dtype(SLOT_MAPPING.dtype)),
        BLOCK_TABLES.name: tables,
        SEQ_LENS.name: torch.tensor(list(lengths), dtype=torch_dtype(SEQ_LENS.dtype)),
    }
    for name, t in cache_types.items():
        _, _, hkv, d = t.shape
        out[name] = torch.zeros(total, block_size, int(hkv), int(d), dtype=torch_dtype(t.dtype))
    return out


def whole_sequence_inputs(lengths: Sequence[int], names: Collection[str], cache_types: Mapping[str, TensorType],
                          block_size: int, *, shuffle_seed: int | None = None) -> dict[str, torch.Tensor]:
    """The per-step metadata of whole sequences run in one step (the debug forward and
    --verify): cu_seqlens, and those of total_lens and the paged-attention inputs (with empty
    caches, see contiguous_paged_inputs) that `names`, the graph's inputs, include."""
    cu = torch.zeros(len(lengths) + 1, dtype=torch_dtype(CU_SEQLENS.dtype))
    cu[1:] = torch.tensor(list(lengths)).cumsum(0)
    out = {CU_SEQLENS.name: cu}
    if TOTAL_LENS.name in names:  # each sequence is all there is of it
        out[TOTAL_LENS.name] = torch.tensor(list(lengths), dtype=torch_dtype(TOTAL_LENS.dtype))
    if SLOT_MAPPING.name in names:
        out.update(contiguous_paged_inputs(lengths, block_size, cache_types, shuffle_seed=shuffle_seed))
    return out
