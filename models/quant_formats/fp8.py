"""FP8 checkpoints with block scales, as transformers' FineGrainedFP8 and DeepSeek-V3 write them
(quant_method "fp8").

Per linear of weight [N, K], with blocks [bn, bk] = weight_block_size (128 x 128):

    weight            float8_e4m3fn [N, K]
    weight_scale_inv  float32 [ceil(N / bn), ceil(K / bk)]

    w[n, k] = weight[n, k] * weight_scale_inv[n // bn, k // bk]

(the "inverse" is of the quantization's scale: the stored value multiplies; float32, or the
power-of-two float8_e8m0fnu of newer checkpoints, read as float32 exactly.) Activations are
left in the model's dtype: kiln runs these checkpoints as weight-only FP8.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from kiln.errors import CheckpointError
from kiln.ir.types import TensorType
from kiln.models.quant_formats.common import Options, QuantizedLinear, Store
from kiln.models.quant_formats.gptq import _listed


@dataclass(frozen=True)
class FP8:
    """A FineGrainedFP8 quantization_config, read."""

    block: tuple[int, int]
    skip: tuple[str, ...]
    """modules_to_not_convert: names (or name suffixes) left dense."""
    method: str = "fp8"

    @classmethod
    def read(cls, opts: Options) -> FP8:
        opts.one_of("activation_scheme", ("dynamic",), default="dynamic")
        opts.one_of("fmt", ("e4m3",), default="e4m3")  # DeepSeek-V3's spelling of the weights' format
        block = opts.get("weight_block_size", (128, 128))
        if not (isinstance(block, list | tuple) and len(block) == 2 and all(isinstance(b, int) and b > 0 for b in block)):
            raise CheckpointError(f"{opts.where}: quantization_config's weight_block_size {block!r} is not supported; "
                                  "kiln reads two positive block sizes [block_n, block_k]")
        return cls((block[0], block[1]), tuple(opts.get("modules_to_not_convert", ()) or ()))

    def plan(self, module: str, weight: TensorType, store: Store) -> QuantizedLinear | None:
        if not store.has(f"{module}.weight_scale_inv") or _listed(module, self.skip):
            return None
        n, k = weight.shape
        bn, bk = self.block
        store.expect(f"{module}.weight", (n, k), ("float8_e4m3fn",))
        store.expect(f"{module}.weight_scale_inv", (-(-n // bn), -(-k // bk)), ("float32", "bfloat16", "float16", "float8_e8m0fnu"))
        params = {"qweight": TensorType("float8_e4m3fn", (n, k)),
                  "scales": TensorType("float32", (-(-n // bn), -(-k // bk)))}

        def repack() -> dict[str, Any]:
            return {"qweight": store.read(f"{module}.weight"),
                    "scales": store.read(f"{module}.weight_scale_inv").to(torch.float32)}

        return QuantizedLinear("dequant_fp8", {"block_n": bn, "block_k": bk}, params, repack)
