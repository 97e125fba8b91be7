"""Every pass by name, imported lazily; pipelines per target."""

from __future__ import annotations

import importlib

from kiln.passes.base import Pass

PASSES: dict[str, str] = {
    "canonicalize": "kiln.passes.canonicalize:Canonicalize",
    "dce": "kiln.passes.dce:DeadCodeElimination",
    "cse": "kiln.passes.cse:CommonSubexpressionElimination",
    "merge-projections": "kiln.passes.merge_projections:MergeProjections",
    "last-token-logits": "kiln.passes.last_token_logits:LastTokenLogits",
    "paged-attention": "kiln.passes.paged_attention:PagedAttention",
    "weight-layout": "kiln.passes.weight_layout:WeightLayout",
    "rope": "kiln.passes.rope:Rope",
    "rms-norm": "kiln.passes.rms_norm:RmsNorm",
    "layer-norm": "kiln.passes.layer_norm:LayerNorm",
    "fused-add-rms-norm": "kiln.passes.fused_add_rms_norm:FusedAddRmsNorm",
    "gated-activation": "kiln.passes.gated_activation:GatedActivation",
    "softcap": "kiln.passes.softcap:Softcap",
    "expert-linear": "kiln.passes.expert_linear:ExpertLinear",
    "rope-kv-write": "kiln.passes.rope_kv_write:RopeKvWrite",
    "gated-linear": "kiln.passes.gated_linear:GatedLinear",
    "fuse-elementwise": "kiln.passes.fuse_elementwise:FuseElementwise",
    "weight-panels": "kiln.passes.weight_panels:WeightPanels",
    "quantize-weights": "kiln.passes.quantize_weights:QuantizeWeights",
    "quantized-linear": "kiln.passes.quantized_linear:QuantizedLinear",
    "lora": "kiln.passes.lora:Lora",
}

# The kernel op set (kiln.ir.ops.kernels): each pass turns one traced pattern into kernel-set ops.
KERNEL_SET: list[str] = [
    "rope",
    "rms-norm",
    "layer-norm",
    "fused-add-rms-norm",
    "gated-activation",
    "softcap",
    "expert-linear",
]

_SERVING = [
    # -- normalize what tracing produced
    "canonicalize",
    "cse",
    "dce",
    # -- fusions that hold on every target
    "merge-projections",
    # -- the kernel op set
    *KERNEL_SET,
    # -- serving shape: logits only for sampled rows, attention over the paged KV cache
    "last-token-logits",
    "paged-attention",
    # -- linears over dequantized weights read the packed weights (after merge-projections,
    # whose cats of dequants it folds into one packed weight, and after last-token-logits,
    # which finds the LM head by its `linear`)
    "quantized-linear",
    "dce",
]

PIPELINES: dict[str, list[str]] = {
    "reference": _SERVING,
    # The compiled targets run the same passes; their kernels come from codegen per target.
    "cuda": [
        *_SERVING[:-1],
        # -- cuda fusions over the serving shape: rotary embedding + KV-cache write, one kernel;
        # the down projection reads the gated activation's input (a decode step's GEMV fuses it)
        "rope-kv-write",
        "gated-linear",
        "dce",
    ],
    "cpu": [
        *_SERVING[:-1],
        # -- what no pattern matched: groups of generic elementwise ops, one TVM kernel each
        "fuse-elementwise",
        # -- linear weights stored as the TVM kernels stream them
        "weight-panels",
        "dce",
    ],
}


def get_pass(name: str) -> Pass:
    """An instance of the pass registered as `name`."""
    if name not in PASSES:
        raise ValueError(f"unknown pass '{name}'; registered passes: {', '.join(PASSES)}")
    module, cls = PASSES[name].split(":")
    return getattr(importlib.import_module(module), cls)()


def pipeline(target: str) -> list[str]:
    """The pass names a target runs by default."""
    if target not in PIPELINES:
        raise ValueError(f"no pass pipeline for target '{target}'; known: {', '.join(PIPELINES)}")
    return list(PIPELINES[target])


def resolve_pipeline(target: str, spec: str | None) -> list[str]:
    """A pipeline from a --passes spec: a full comma list ("canonicalize,dce"), or edits of the
    target's default ("+name" appends, "-name" removes every occurrence)."""
    names = pipeline(target)
    if not spec:
        return names
    items = [s.strip() for s in spec.split(",") if s.strip()]
    if all(s[0] in "+-" for s in items):
        for s in items:
            get_pass(s[1:])
            if s[0] == "+":
                names.append(s[1:])
            else:
                names = [n for n in names if n != s[1:]]
    else:
        names = items
    for n in names:
        get_pass(n)
    return names
