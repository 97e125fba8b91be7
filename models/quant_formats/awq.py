"""AWQ checkpoints (AutoAWQ's GEMM layout, as transformers reads them).

Per linear of weight [N, K], 4-bit, with G = K / group_size groups:

    qweight  int32 [K, N / 8]   q packed along N, field i (bits 4i..4i+3) of word c holding
                                column 8c + ORDER[i]
    qzeros   int32 [G, N / 8]   zeros, packed the same way (stored as is)
    scales   fp16  [G, N]
    bias     [N]                optional, dense

    w[n, k] = (q[k, n] - zero[k // group_size, n]) * scales[k // group_size, n]
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from kiln.errors import CheckpointError
from kiln.ir.ops.quant import pack_int
from kiln.ir.types import TensorType
from kiln.models.quant_formats.common import Options, QuantizedLinear, Store, unpack_words
from kiln.models.quant_formats.gptq import _listed

ORDER = (0, 2, 4, 6, 1, 3, 5, 7)
"""AWQ's GEMM packing: the column each 4-bit field of a word holds, low field first."""


@dataclass(frozen=True)
class AWQ:
    """An AWQ quantization_config, read (4-bit, zero point, GEMM layout)."""

    group_size: int
    skip: tuple[str, ...]
    """modules_to_not_convert: names (or name suffixes) left dense."""
    method: str = "awq"

    @classmethod
    def read(cls, opts: Options) -> AWQ:
        opts.one_of("bits", (4,), default=opts.entries.get("w_bit", 4))
        opts.one_of("version", ("gemm",), default="gemm")
        opts.one_of("zero_point", (True,), default=True)
        group = opts.get("group_size", opts.entries.get("q_group_size", 128))
        if group != -1 and (not isinstance(group, int) or group <= 0):
            raise CheckpointError(f"{opts.where}: group_size {group!r} must be a positive integer or -1")
        return cls(group, tuple(opts.get("modules_to_not_convert", ()) or ()))

    def plan(self, module: str, weight: TensorType, store: Store) -> QuantizedLinear | None:
        if not store.has(f"{module}.qweight") or _listed(module, self.skip):
            return None
        n, k = weight.shape
        group = k if self.group_size == -1 else self.group_size
        if k % group or n % 8 or k % 2:
            raise CheckpointError(f"{store.ckpt.path}: {module} [{n}, {k}] does not split into AWQ's 4-bit "
                                  f"packing with group_size {self.group_size}")
        g = k // group
        store.expect(f"{module}.qweight", (k, n // 8), ("int32",))
        store.expect(f"{module}.qzeros", (g, n // 8), ("int32",))
        scale_dtype = store.expect(f"{module}.scales", (g, n), ("float16", "bfloat16", "float32"))
        params = {"qweight": TensorType("uint8", (n, k // 2)), "scales": TensorType(scale_dtype, (n, g)),
                  "zeros": TensorType("uint8", (n, g))}

        def repack() -> dict[str, Any]:
            q = unpack_words(store.read(f"{module}.qweight"), 4, dim=1, order=ORDER)  # [K, N]
            zeros = unpack_words(store.read(f"{module}.qzeros"), 4, dim=1, order=ORDER)  # [G, N]
            return {"qweight": pack_int(q.T.contiguous(), 4), "scales": store.read(f"{module}.scales").T.contiguous(),
                    "zeros": zeros.T.contiguous().to(torch.uint8)}

        return QuantizedLinear("dequant_int", {"bits": 4, "group_size": group}, params, repack)
