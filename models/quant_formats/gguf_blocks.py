"""GGUF's Q8_0, Q4_0 and Q4_1 linear weights kept packed, in kiln's canonical layouts.

A row of K weights is K / 32 blocks of 32; each block starts with its float16 scale d (Q4_1:
then its float16 offset m). ggml's 4-bit blocks hold element j in the low nibble of byte j and
element j + 16 in its high nibble; kiln's canonical packing (kiln.ir.ops.quant) puts even
channels in low nibbles, so the nibbles are reordered at import:

    Q8_0  d, int8 q[32]          w = d * q          dequant_int {bits 8, group 32}: q + 128, scales d
    Q4_0  d, nibbles q[32]       w = d * (q - 8)    dequant_int {bits 4, group 32}: q, scales d
    Q4_1  d, m, nibbles q[32]    w = d * q + m      dequant_int_offset {bits 4, group 32}: q, d, offsets m

Each equals gguf.quants.dequantize bit for bit in float32 (the scales stay float16). A weight is
kept packed when every reader of its param is a linear taking it as weight (an LM head tied to
the embedding table is read as floats: the embedding gathers float rows) and the architecture's
tensor processor only reorders its rows; anything else (other GGML types, embeddings, norms) is
dequantized at load by GGUFModel.read.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from kiln.errors import CheckpointError
from kiln.ir.graph import Graph
from kiln.ir.ops.quant import pack_int
from kiln.ir.types import TensorType
from kiln.models.gguf import GGUFModel
from kiln.models.quant_formats.common import QuantizedLinear, Store

BLOCK = 32
"""Weights per block in every packed type."""

BLOCK_BYTES = {"Q8_0": 34, "Q4_0": 18, "Q4_1": 20}
"""GGML type -> bytes per block (the types kept packed)."""


def repack_blocks(rows: np.ndarray, qtype: str) -> dict[str, torch.Tensor]:
    """The canonical tensors (qweight, scales[, offsets]) of GGML rows uint8 [N, K / 32 * block
    bytes] of `qtype` (one of BLOCK_BYTES)."""
    n = rows.shape[0]
    b = rows.reshape(n, -1, BLOCK_BYTES[qtype])  # [N, G, bytes]
    halves = 2 if qtype == "Q4_1" else 1  # float16 fields before the weights: d (and m)
    fields = np.ascontiguousarray(b[..., : 2 * halves]).view(np.float16)  # [N, G, halves]
    data = b[..., 2 * halves:]
    scales = torch.from_numpy(np.ascontiguousarray(fields[..., 0]))
    if qtype == "Q8_0":
        return {"qweight": torch.from_numpy((data ^ np.uint8(0x80)).reshape(n, -1)), "scales": scales}  # q + 128
    q = np.concatenate([data & np.uint8(0x0F), data >> np.uint8(4)], axis=-1).reshape(n, -1)  # [N, K]
    out = {"qweight": pack_int(torch.from_numpy(q), 4), "scales": scales}
    if qtype == "Q4_1":
        out["offsets"] = torch.from_numpy(np.ascontiguousarray(fields[..., 1]))
    return out


def linear_weights(graph: Graph) -> frozenset[str]:
    """Names of the params that only linear layers read, each as its weight."""
    users = graph.users()
    return frozenset(p.name for p in graph.params
                     if users[p] and all(u.op == "linear" and u.inputs[1] is p and p not in u.inputs[2:]
                                         for u in users[p]))


@dataclass(frozen=True)
class GGUFBlocks:
    """The GGUF file's packed linear weights, as a QuantFormat for load_quantized."""

    model: GGUFModel
    linear_weights: frozenset[str]
    """Params read only as a linear's weight (linear_weights(graph))."""
    method: str = "gguf"

    def plan(self, module: str, weight: TensorType, store: Store) -> QuantizedLinear | None:
        name = f"{module}.weight"
        key = store.key(name)
        if name not in self.linear_weights or key is None:
            return None
        qtype = self.model.quant_type(key)
        if qtype not in BLOCK_BYTES:
            return None
        order = self.model.row_order(key)
        if order is None:
            return None
        n, k = weight.shape
        if k % BLOCK or len(order) != n:
            raise CheckpointError(f"GGUF file '{self.model.path}': {qtype} tensor for '{name}' does not hold the "
                                  f"traced weight [{n}, {k}] as rows of {BLOCK}-weight blocks")
        g = k // BLOCK
        bits = 8 if qtype == "Q8_0" else 4
        params = {"qweight": TensorType("uint8", (n, k * bits // 8)), "scales": TensorType("float16", (n, g))}
        if qtype == "Q4_1":
            params["offsets"] = TensorType("float16", (n, g))

        def repack() -> dict[str, torch.Tensor]:
            return repack_blocks(self.model.raw_rows(key, order), qtype)

        op = "dequant_int_offset" if qtype == "Q4_1" else "dequant_int"
        return QuantizedLinear(op, {"bits": bits, "group_size": BLOCK}, params, repack)
