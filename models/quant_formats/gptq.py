"""GPTQ checkpoints as AutoGPTQ, GPTQModel and transformers write them.

Per linear of weight [N, K], with B = bits and G groups (K / group_size, or 1 for group_size -1):

    qweight  int32 [K * B / 32, N]   B-bit q packed along K, low bits first
    qzeros   int32 [G, N * B / 32]   B-bit zeros packed along N; v1 ("gptq") stores zero - 1
    scales   fp16  [G, N]
    g_idx    int32 [K]               group of each input channel (act-order when desc_act)
    bias     [N]                     optional, dense

    w[n, k] = (q[k, n] - zero[g, n]) * scales[g, n],  g = g_idx[k] (desc_act) else k // group_size
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from kiln.errors import CheckpointError
from kiln.ir.ops.quant import pack_int
from kiln.ir.types import TensorType
from kiln.models.quant_formats.common import Options, QuantizedLinear, Store, unpack_words

ZERO_OFFSET = {"gptq": 1, "gptq_v2": 0}
"""checkpoint_format -> what the dequant adds to a stored zero (v1 stores zero - 1). A v1 field
of 2^bits - 1 (a zero of 0 that wrapped when packed) reads as 2^bits, as the exllama / vLLM
kernels read it (AutoGPTQ's torch path masks it back to 0); 8-bit's 256 is refused."""


@dataclass(frozen=True)
class GPTQ:
    """A GPTQ quantization_config, read."""

    bits: int
    group_size: int
    """Input channels per group; -1: one group per output channel."""
    desc_act: bool
    """Act-order: each linear's g_idx permutes its groups (it must be stored)."""
    zero_offset: int
    skip: tuple[str, ...]
    """modules_to_not_convert: names (or name suffixes) left dense."""
    method: str = "gptq"

    @classmethod
    def read(cls, opts: Options) -> GPTQ:
        bits = opts.one_of("bits", (4, 8))
        group = opts.get("group_size", 128)
        if group != -1 and (not isinstance(group, int) or group <= 0):
            raise CheckpointError(f"{opts.where}: group_size {group!r} must be a positive integer or -1")
        fmt = opts.one_of("checkpoint_format", tuple(ZERO_OFFSET), default="gptq")
        opts.get("sym")  # either way: the zeros are stored (symmetric ones equal 2^(bits-1))
        return cls(bits, group, bool(opts.get("desc_act", False)), ZERO_OFFSET[fmt],
                   tuple(opts.get("modules_to_not_convert", ()) or ()))

    def plan(self, module: str, weight: TensorType, store: Store) -> QuantizedLinear | None:
        if not store.has(f"{module}.qweight") or _listed(module, self.skip):
            return None
        n, k = weight.shape
        b, per = self.bits, 32 // self.bits
        group = k if self.group_size == -1 else self.group_size
        if k % group or k % per or n % per:
            raise CheckpointError(f"{store.ckpt.path}: {module} [{n}, {k}] does not split into GPTQ's {b}-bit "
                                  f"packing with group_size {self.group_size}")
        g = k // group
        store.expect(f"{module}.qweight", (k // per, n), ("int32",))
        store.expect(f"{module}.qzeros", (g, n // per), ("int32",))
        scale_dtype = store.expect(f"{module}.scales", (g, n), ("float16", "bfloat16", "float32"))
        params = {"qweight": TensorType("uint8", (n, k * b // 8)), "scales": TensorType(scale_dtype, (n, g)),
                  "zeros": TensorType("uint8", (n, g))}
        # g_idx is kept only where it is not k // group_size (act-order); it is read here, as
        # the graph's types depend on it (K integers per linear).
        act_order = False
        if store.has(f"{module}.g_idx"):
            store.expect(f"{module}.g_idx", (k,), ("int32", "int64"))
            g_idx = store.read(f"{module}.g_idx").to(torch.int32)
            if g_idx.min() < 0 or g_idx.max() >= g:
                raise CheckpointError(f"{store.ckpt.path}: {module}.g_idx names groups outside [0, {g})")
            act_order = not torch.equal(g_idx, torch.arange(k, dtype=torch.int32) // group)
        elif self.desc_act:
            raise CheckpointError(f"{store.ckpt.path}: desc_act is set but {module} has no g_idx")
        if act_order:
            params["g_idx"] = TensorType("int32", (k,))

        def repack() -> dict[str, Any]:
            q = unpack_words(store.read(f"{module}.qweight"), b, dim=0)  # [K, N]
            zeros = unpack_words(store.read(f"{module}.qzeros"), b, dim=1) + self.zero_offset  # [G, N]
            if zeros.max() > 255:
                raise CheckpointError(f"{store.ckpt.path}: {module}.qzeros holds a zero of {int(zeros.max())} "
                                      "(a v1 zero-point overflow), which kiln's uint8 zeros cannot hold")
            out = {"qweight": pack_int(q.T.contiguous(), b), "scales": store.read(f"{module}.scales").T.contiguous(),
                   "zeros": zeros.T.contiguous().to(torch.uint8)}
            if act_order:
                out["g_idx"] = store.read(f"{module}.g_idx").to(torch.int32)
            return out

        return QuantizedLinear("dequant_int", {"bits": b, "group_size": group}, params, repack)


def _listed(module: str, names: tuple[str, ...]) -> bool:
    """Whether `module` is one of `names` (full paths or trailing path components)."""
    return any(module == s or module.endswith("." + s) for s in names)
