"""Every target's pipeline with --verify on every tiny architecture: each pass keeps what the
model computes, and the kernel-set passes leave no hand-written norm or gate/up activation.
(Targets whose pipelines are the same list run once.)"""

from __future__ import annotations

from collections import Counter

import pytest
import torch

from kiln.frontend import import_model
from kiln.ir.graph import Graph
from kiln.models.tiny_configs import TINY_CONFIGS
from kiln.passes import PassManager, get_pass, resolve_pipeline
from kiln.passes.registry import PIPELINES

PIPELINE_TARGETS = sorted({tuple(names): target for target, names in PIPELINES.items()}.values())

KERNEL_OPS = ("rms_norm", "fused_add_rms_norm", "layer_norm", "silu_and_mul", "gelu_and_mul", "softcap",
              "expert_linear", "gather_rows")

# Kernel-set ops after the reference pipeline on the tiny configs (2 layers each).
EXPECTED: dict[str, dict[str, int]] = {
    "cohere": {"layer_norm": 3, "silu_and_mul": 2, "gather_rows": 1},
    "deepseek_v2": {"rms_norm": 3, "fused_add_rms_norm": 4, "silu_and_mul": 3, "expert_linear": 2, "gather_rows": 1},
    "deepseek_v3": {"rms_norm": 5, "fused_add_rms_norm": 4, "silu_and_mul": 3, "expert_linear": 2, "gather_rows": 1},
    "gemma": {"rms_norm": 1, "fused_add_rms_norm": 4, "gelu_and_mul": 2, "gather_rows": 1},
    "gemma2": {"rms_norm": 5, "fused_add_rms_norm": 4, "gelu_and_mul": 2, "softcap": 1, "gather_rows": 1},
    "gemma3_text": {"rms_norm": 9, "fused_add_rms_norm": 4, "gelu_and_mul": 2, "gather_rows": 1},
    "gpt2": {"layer_norm": 5, "gather_rows": 1},
    "gpt_neox": {"layer_norm": 5, "gather_rows": 1},
    "gpt_oss": {"rms_norm": 1, "fused_add_rms_norm": 4, "expert_linear": 4, "gather_rows": 1},
    "granite": {"rms_norm": 1, "fused_add_rms_norm": 4, "silu_and_mul": 2, "gather_rows": 1},
    "llama": {"rms_norm": 1, "fused_add_rms_norm": 4, "silu_and_mul": 2, "gather_rows": 1},
    "mistral": {"rms_norm": 1, "fused_add_rms_norm": 4, "silu_and_mul": 2, "gather_rows": 1},
    "mixtral": {"rms_norm": 1, "fused_add_rms_norm": 4, "silu_and_mul": 2, "expert_linear": 4, "gather_rows": 1},
    "olmo2": {"rms_norm": 8, "fused_add_rms_norm": 1, "silu_and_mul": 2, "gather_rows": 1},
    "opt": {"layer_norm": 5, "gather_rows": 1},
    "phi": {"layer_norm": 3, "gather_rows": 1},
    "phi3": {"rms_norm": 1, "fused_add_rms_norm": 4, "silu_and_mul": 2, "gather_rows": 1},
    "qwen2": {"rms_norm": 1, "fused_add_rms_norm": 4, "silu_and_mul": 2, "gather_rows": 1},
    "qwen2_moe": {"rms_norm": 1, "fused_add_rms_norm": 4, "silu_and_mul": 4, "expert_linear": 4, "gather_rows": 1},
    "qwen3": {"rms_norm": 5, "fused_add_rms_norm": 4, "silu_and_mul": 2, "gather_rows": 1},
    "stablelm": {"layer_norm": 5, "silu_and_mul": 2, "gather_rows": 1},
    "starcoder2": {"layer_norm": 5, "gather_rows": 1},
}


def _hand_written_gates(graph: Graph) -> list[str]:
    """mul nodes reading silu/gelu of a slice: a gate/up activation left generic."""
    return [
        str(n.type) for n in graph.nodes
        if n.op == "mul" and any(i.op in ("silu", "gelu") and i.inputs[0].op == "slice" for i in n.inputs)
    ]


def test_every_architecture_has_an_expectation():
    assert sorted(EXPECTED) == sorted(TINY_CONFIGS)


@pytest.mark.parametrize("target", PIPELINE_TARGETS)
@pytest.mark.parametrize("arch", sorted(TINY_CONFIGS))
def test_pipeline_verifies_and_reaches_the_kernel_set(checkpoint, arch, target):
    imported = import_model(str(checkpoint(arch)), torch.float32)
    names = resolve_pipeline(target, None)
    manager = PassManager([get_pass(n) for n in names], check_numerics=True, weights=imported.weights)
    graph = manager.run(imported.graph)
    assert all(e["max_rel_error"] <= 1e-4 for e in manager.report)
    ops = Counter(n.op for n in graph.ops())
    # cuda: a down projection took its activation in (gated_linear), counted as the activation
    ops.update(n.attrs["gate"] for n in graph.ops() if n.op == "gated_linear")
    if "gated-linear" in names:
        assert get_pass("gated-linear").apply(graph) is graph  # no activation left to fuse
    assert "rsqrt" not in ops  # every RMSNorm / LayerNorm written out became one op
    assert _hand_written_gates(graph) == []
    assert {op: ops[op] for op in KERNEL_OPS if ops[op]} == EXPECTED[arch]
