"""Pre-quantized Hugging Face checkpoints: config.json's quantization_config read into kiln's
canonical quantized weights (kiln.ir.ops.quant), so every stage still runs in the reference
interpreter and `--verify` applies.

`load_quantized(imported)` returns an import whose graph reads each quantized linear weight as a
`dequant_int` / `dequant_fp8` of new params (and, for formats that quantize activations, a
`quant_act` of the linear's input), with a weight source that repacks the checkpoint's tensors
into the canonical layouts. A GGUF file's Q8_0 / Q4_0 / Q4_1 linear weights are read the same way
(`dequant_int`, or `dequant_int_offset` for Q4_1; quant_formats/gguf_blocks.py). A checkpoint
without quantization_config comes back unchanged; a quant_method or option kiln does not read is
a CheckpointError naming it.

    before   @m.weight = param : f16[N,K]
             %y = linear(%x, @m.weight)
    after    @m.qweight = param : u8[N,K/2]   @m.scales = param : f16[N,G]   @m.zeros = param : u8[N,G]
             %w = dequant_int(@m.qweight, @m.scales, @m.zeros) {bits=4, group_size=K/G} : f16[N,K]
             %a = quant_act(%x) {format="int8"}            (W8A8 formats only)
             %y = linear(%a, %w)

The formats themselves (GPTQ, AWQ, FP8 blocks, compressed-tensors) live in
kiln.models.quant_formats, one file each.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from kiln.errors import CheckpointError
from kiln.frontend import Imported
from kiln.frontend.weights import SourceWeights
from kiln.ir.graph import Node, param_node
from kiln.ir.types import TensorType, torch_dtype
from kiln.models.quant_formats import READERS, QuantizedLinear, Store, read_format
from kiln.models.quant_formats.gguf_blocks import GGUFBlocks, linear_weights

log = logging.getLogger(__name__)

SUPPORTED: tuple[str, ...] = tuple(READERS)
"""The quant_method values kiln reads."""

MARKERS = ("qweight", "weight_scale_inv", "weight_scale")
"""Checkpoint key suffixes that only a quantized linear has: one no linear consumed means a
quantized tensor kiln would otherwise silently skip."""


def quantization_config(config: Any) -> dict[str, Any] | None:
    """The checkpoint config's quantization_config as a dict, or None."""
    qc = getattr(config, "quantization_config", None)
    if qc is None:
        return None
    return qc if isinstance(qc, dict) else qc.to_dict()


class QuantizedWeights:
    """The import's weight source with the quantized linears' canonical params added: those are
    repacked from the checkpoint one module at a time (the last module's tensors are kept, as
    its params are read together); every other name goes to the original SourceWeights."""

    def __init__(self, base: SourceWeights, plans: dict[str, QuantizedLinear]):
        self.base = base
        self.plans = plans
        self.owner = {f"{m}.{s}": (m, s) for m, plan in plans.items() for s in plan.params}
        self._module: str | None = None
        self._tensors: dict[str, torch.Tensor] = {}

    def __call__(self, name: str, type_: TensorType) -> torch.Tensor:
        if name not in self.owner:
            return self.base(name, type_)
        module, suffix = self.owner[name]
        if module != self._module:
            self._tensors, self._module = self.plans[module].repack(), module
        t = self._tensors[suffix]
        want = self.plans[module].params[suffix]
        if tuple(t.shape) != tuple(want.shape) or t.dtype != torch_dtype(want.dtype):
            raise CheckpointError(f"repacked '{name}' is {t.dtype} {list(t.shape)}, expected {want}")
        if tuple(type_.shape) != tuple(want.shape) or type_.dtype != want.dtype:
            raise CheckpointError(f"quantized param '{name}' was asked for as {type_}; it is {want}")
        return t

    def __getattr__(self, attr: str) -> Any:  # the rest of SourceWeights' surface (ckpt, source_key, ...)
        return getattr(self.base, attr)


def load_quantized(imported: Imported) -> Imported:
    """The import with its quantized weights as canonical quantized IR (module docstring)."""
    gguf = getattr(imported.checkpoint, "gguf", None)
    qc = quantization_config(imported.checkpoint.config)
    if gguf is not None:
        fmt = GGUFBlocks(gguf, linear_weights(imported.graph))
    elif qc is None:
        return imported
    else:
        fmt = read_format(qc, str(imported.checkpoint.path))
    store = Store(imported.weights)
    graph = imported.graph
    users = graph.users()
    plans: dict[str, QuantizedLinear] = {}
    replace: dict[Node, Node] = {}
    quantized_inputs: dict[tuple[Node, str], Node] = {}  # one quant_act per input and format
    for p in graph.params:
        if not p.name.endswith(".weight") or p.type.rank != 2:
            continue
        module = p.name.removesuffix(".weight")
        plan = fmt.plan(module, p.type, store)
        if plan is None:
            continue
        plans[module] = plan
        params = tuple(param_node(f"{module}.{s}", t) for s, t in plan.params.items())
        replace[p] = Node(plan.op, params, {**plan.attrs, "dtype": p.type.dtype}, p.type)
        if plan.act is None:
            continue
        for u in users[p]:
            if u.op != "linear" or u.inputs[1] is not p:
                raise CheckpointError(f"{imported.checkpoint.path}: {module}'s weight is read by '{u.op}', not as a "
                                      "linear's weight; kiln quantizes activations only at a linear's input")
            x = u.inputs[0]
            key = (x, plan.act)
            if key not in quantized_inputs:
                quantized_inputs[key] = Node("quant_act", (x,), {"format": plan.act}, x.type)
            replace[u] = u.replace(inputs=(quantized_inputs[key], *u.inputs[1:]))
    _check_all_consumed(store, plans)
    log.info("%s: %d quantized linears (%s)", imported.checkpoint.path, len(plans), fmt.method)
    graph = graph.substitute(replace) if replace else graph
    return Imported(graph, QuantizedWeights(imported.weights, plans), imported.checkpoint)


def _check_all_consumed(store: Store, plans: dict[str, QuantizedLinear]) -> None:
    """A quantized tensor that no traced linear weight took (a fused MoE expert tensor, say)
    would leave its dense weight unreadable: refuse it here, naming it."""
    consumed = {store.key(f"{m}.{s}") for m in plans for s in MARKERS}
    for key in store.ckpt.key_to_file:
        if key.rsplit(".", 1)[-1] in MARKERS and key not in consumed:
            raise CheckpointError(
                f"{store.ckpt.path}: quantized tensor '{key}' belongs to no linear weight kiln can dequantize "
                "(it reads quantized 2-D linear weights only, not fused expert tensors)"
            )
