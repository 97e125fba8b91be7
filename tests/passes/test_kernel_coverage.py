"""Kernel-set coverage after the compiled targets' pipelines: for every supported architecture at
~1B-model widths (traced on meta from its config alone), at least 99% of a step's FLOPs and of
its weight bytes run in kernel-set ops (kiln.ir.cost; the table: benchmarks/kernel_coverage.py)."""

from __future__ import annotations

import pytest
import torch

from kiln.codegen.fold_weights import fold_weights
from kiln.frontend import import_model
from kiln.ir.cost import kernel_coverage
from kiln.models.checkpoint import write_weightless_checkpoint
from kiln.models.tiny_configs import TINY_CONFIGS, realistic_config
from kiln.passes import PassManager, get_pass
from kiln.passes.registry import pipeline

# cuda and cpu share passes today; a distinct list gets its own run.
TARGETS = {tuple(pipeline(t)): t for t in ("cuda", "cpu")}


@pytest.fixture(scope="module")
def traced(tmp_path_factory: pytest.TempPathFactory):
    cache = {}

    def get(arch: str):
        if arch not in cache:
            d = write_weightless_checkpoint(realistic_config(arch), tmp_path_factory.mktemp(f"meta-{arch}"))
            cache[arch] = import_model(str(d), torch.bfloat16)
        return cache[arch]

    return get


@pytest.mark.parametrize("target", sorted(TARGETS.values()))
@pytest.mark.parametrize("arch", sorted(TINY_CONFIGS))
def test_kernel_set_covers_99_percent(traced, arch, target):
    imported = traced(arch)
    graph = PassManager([get_pass(n) for n in pipeline(target)]).run(imported.graph)
    graph, _ = fold_weights(graph, imported.weights)
    cov = kernel_coverage(graph)
    left = ", ".join(f"{op} {f / 1e6:.1f} MFLOP" for op, f in cov.other_flops.most_common(4) if f)
    assert cov.flop_share >= 0.99, f"{arch}: {cov.flop_share:.2%} of FLOPs in kernel-set ops; outside: {left}"
    assert cov.weight_share >= 0.99, f"{arch}: {cov.weight_share:.2%} of weight bytes read by kernel-set ops"
