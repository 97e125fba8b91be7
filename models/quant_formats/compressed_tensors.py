"""compressed-tensors checkpoints (llm-compressor's output, quant_method "compressed-tensors")
in its "int-quantized" and "float-quantized" formats.

quantization_config.config_groups maps names to schemes {targets, weights, input_activations};
`ignore` lists modules left dense; a target or ignore entry is a module name, "re:<regex>" on
the module path, or a class name ("Linear": every linear). Per linear of weight [N, K]:

    int-quantized    weight int8 [N, K] (symmetric), weight_scale [N, 1] (channel), [1] (tensor)
                     or [N, K / group_size] (group)
                     w[n, k] = weight[n, k] * weight_scale[n, g(k)]
                     -> dequant_int bits 8 of weight + 128 (zero 128, the symmetric default)
    float-quantized  weight float8_e4m3fn [N, K], weight_scale float [1] / [N, 1] / block
                     [ceil(N / bn), ceil(K / bk)]  -> dequant_fp8

Dynamic per-token activations (input_activations strategy "token", dynamic) become a quant_act
of the linear's input (int8 or float8_e4m3fn).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import torch

from kiln.errors import CheckpointError
from kiln.ir.types import TensorType
from kiln.models.quant_formats.common import Options, QuantizedLinear, Store, unsupported

FORMATS = ("int-quantized", "float-quantized")
"""The compressed-tensors formats kiln reads."""
FLOAT_SCALES = ("float32", "float16", "bfloat16")


@dataclass(frozen=True)
class Scheme:
    """One config group's weights and activations, read."""

    targets: tuple[str, ...]
    kind: str
    """"int" (int8 weights) or "float" (float8_e4m3fn weights)."""
    strategy: str
    """"tensor", "channel", "group" or "block"."""
    group_size: int | None
    block: tuple[int, int] | None
    act: str | None
    """quant_act format of the input, or None (weights only)."""


@dataclass(frozen=True)
class CompressedTensors:
    """A compressed-tensors quantization_config, read."""

    schemes: tuple[Scheme, ...]
    ignore: tuple[str, ...]
    method: str = "compressed-tensors"

    @classmethod
    def read(cls, opts: Options) -> CompressedTensors:
        where = opts.where
        status = opts.get("quantization_status", "compressed")
        if status != "compressed":
            raise unsupported(where, f"quantization_status {status!r}", "'compressed'")
        top_format = opts.get("format")
        for key in ("kv_cache_scheme", "sparsity_config", "transform_config"):
            if opts.get(key):
                raise unsupported(where, f"{key}", f"checkpoints without one ({key} null)")
        groups = opts.get("config_groups", {})
        if not isinstance(groups, dict) or not groups:
            raise CheckpointError(f"{where}: quantization_config has no config_groups")
        schemes = tuple(_scheme(f"{where} config_groups.{name}", g, top_format) for name, g in groups.items())
        return cls(schemes, tuple(opts.get("ignore", ()) or ()))

    def plan(self, module: str, weight: TensorType, store: Store) -> QuantizedLinear | None:
        if not store.has(f"{module}.weight_scale") or any(_matches(module, t) for t in self.ignore):
            return None
        scheme = next((s for s in self.schemes if any(_matches(module, t) for t in s.targets)), None)
        if scheme is None:
            return None
        if store.has(f"{module}.weight_zero_point"):
            raise CheckpointError(f"{store.ckpt.path}: {module} has a weight_zero_point (asymmetric weights), "
                                  "which kiln does not read")
        n, k = weight.shape
        path = store.ckpt.path
        scale_shape = {"tensor": None, "channel": (n, 1)}.get(scheme.strategy)
        if scheme.strategy == "group":
            if k % scheme.group_size:
                raise CheckpointError(f"{path}: {module}'s {k} input channels are not a multiple of group_size "
                                      f"{scheme.group_size}")
            scale_shape = (n, k // scheme.group_size)
        elif scheme.strategy == "block":
            bn, bk = scheme.block
            scale_shape = (-(-n // bn), -(-k // bk))
        if scale_shape is None:  # per tensor: stored as [1] or as a scalar
            shape, _ = store.meta(f"{module}.weight_scale")
            scale_dtype = store.expect(f"{module}.weight_scale", shape if shape in ((), (1,), (1, 1)) else (1,),
                                       FLOAT_SCALES)
        else:
            scale_dtype = store.expect(f"{module}.weight_scale", scale_shape, FLOAT_SCALES)

        if scheme.kind == "int":
            store.expect(f"{module}.weight", (n, k), ("int8",))
            g = 1 if scale_shape is None else scale_shape[1]
            params = {"qweight": TensorType("uint8", (n, k)), "scales": TensorType(scale_dtype, (n, g))}

            def repack() -> dict[str, Any]:
                q = store.read(f"{module}.weight").to(torch.int16) + 128
                s = store.read(f"{module}.weight_scale").reshape(-1, g).expand(n, g).contiguous()
                return {"qweight": q.to(torch.uint8), "scales": s}

            return QuantizedLinear("dequant_int", {"bits": 8, "group_size": k // g}, params, repack, scheme.act)

        store.expect(f"{module}.weight", (n, k), ("float8_e4m3fn",))
        bn, bk = {"tensor": (n, k), "channel": (1, k)}.get(scheme.strategy) or scheme.block
        shape = (-(-n // bn), -(-k // bk))
        params = {"qweight": TensorType("float8_e4m3fn", (n, k)), "scales": TensorType("float32", shape)}

        def repack_fp8() -> dict[str, Any]:
            s = store.read(f"{module}.weight_scale").to(torch.float32).reshape(shape)
            return {"qweight": store.read(f"{module}.weight"), "scales": s}

        return QuantizedLinear("dequant_fp8", {"block_n": bn, "block_k": bk}, params, repack_fp8, scheme.act)


def _scheme(where: str, group: dict[str, Any], top_format: str | None) -> Scheme:
    opts = Options(where, group)
    fmt = opts.get("format", top_format)
    if fmt not in FORMATS:
        raise unsupported(where, f"format {fmt!r}", ", ".join(map(repr, FORMATS)))
    targets = tuple(opts.get("targets", ()) or ())
    if opts.get("output_activations"):
        raise unsupported(where, "output_activations", "none (output_activations null)")
    w = Options(f"{where}.weights", opts.get("weights") or {})
    kind = w.one_of("type", ("int", "float"))
    if (kind == "int") != (fmt == "int-quantized"):
        raise unsupported(where, f"{kind} weights in format {fmt!r}", "int weights as 'int-quantized', float "
                          "weights as 'float-quantized'")
    w.one_of("num_bits", (8,))
    w.one_of("symmetric", (True,))
    w.one_of("dynamic", (False,), default=False)
    if w.get("actorder"):
        raise unsupported(w.where, f"actorder {w.get('actorder')!r}", "none")
    strategy = w.one_of("strategy", ("tensor", "channel", "group") if kind == "int" else ("tensor", "channel", "block"))
    group_size = w.get("group_size") if strategy == "group" else None
    if strategy == "group" and not (isinstance(group_size, int) and group_size > 0):
        raise unsupported(w.where, f"group_size {group_size!r}", "a positive integer")
    block = w.get("block_structure") if strategy == "block" else None
    if strategy == "block":
        if not (isinstance(block, list | tuple) and len(block) == 2 and all(isinstance(b, int) and b > 0 for b in block)):
            raise unsupported(w.where, f"block_structure {block!r}", "two positive block sizes")
        block = (block[0], block[1])
    return Scheme(targets, kind, strategy, group_size, block, _activations(where, opts.get("input_activations")))


def _activations(where: str, scheme: dict[str, Any] | None) -> str | None:
    if not scheme:
        return None
    a = Options(f"{where}.input_activations", scheme)
    kind = a.one_of("type", ("int", "float"))
    a.one_of("num_bits", (8,))
    a.one_of("symmetric", (True,))
    a.one_of("dynamic", (True,))
    a.one_of("strategy", ("token",))
    return "int8" if kind == "int" else "float8_e4m3fn"


def _matches(module: str, target: str) -> bool:
    """Whether a compressed-tensors target / ignore entry names `module`."""
    if target.startswith("re:"):
        return re.match(target[3:], module) is not None
    if "." not in target and target[:1].isupper():  # a class name: every linear the checkpoint quantizes
        return target.endswith("Linear")
    return module == target or module.endswith("." + target)
