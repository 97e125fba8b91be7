"""The cpu target end to end: tiny models compiled with `--target cpu` (float32) generate
greedily what the reference target generates; the artifact's TVM library is loaded, not
compiled, at start; a library built for another processor is refused; `kiln inspect` lists
the ops that fell back to torch."""

from __future__ import annotations

import json
import os
import shutil
import sys

import pytest

tvm = pytest.importorskip("tvm")

import kiln  # noqa: E402
from kiln import LLM, SamplingParams  # noqa: E402
from kiln.errors import ArtifactError  # noqa: E402
from kiln.models.tiny_configs import TINY_CONFIGS  # noqa: E402
from kiln.runtime.model import CompiledModel  # noqa: E402
from kiln.runtime.tvm_library import BUILD_INFO, LIBRARY  # noqa: E402

PROMPTS = [[5, 9, 33, 2, 71], list(range(3, 30)), [100] * 9]
ARCHS = sorted(TINY_CONFIGS)
# Ops that may still run their torch reference on cpu: MoE routing (top-k, softmax, the weighted
# sum of expert outputs, gathers and scatters) and expert_linear, which has no TVM kernel yet; and
# DeepSeek's MLA rotary embedding, which no pass turns into a rope op (its cos/sin tables are
# computed per step: cast, mul, cos, sin, cat). Every other architecture runs all in TVM.
ROUTING = {"add", "cast", "cat", "cos", "expert_linear", "full_like", "gather", "index", "logical_not", "mul",
           "repeat_interleave", "reshape", "scatter", "sin", "softmax", "sum", "topk", "where"}
MOE = ("deepseek_v2", "deepseek_v3", "gpt_oss", "mixtral", "qwen2_moe")


@pytest.fixture(scope="module")
def cpu_artifact(checkpoint, tmp_path_factory):
    cache = {}

    def get(arch: str):
        if arch not in cache:
            out = tmp_path_factory.mktemp(f"cpu-{arch}") / "artifact"
            cache[arch] = kiln.compile(checkpoint(arch), out, target="cpu", dtype="float32")
        return cache[arch]

    return get


def _greedy(artifact, n: int = 8) -> list[list[int]]:
    llm = LLM(artifact, max_num_seqs=2, num_kv_blocks=16)
    params = SamplingParams(temperature=0, max_tokens=n, ignore_eos=True)
    return [o.outputs[0].token_ids for o in llm.generate([{"prompt_token_ids": p} for p in PROMPTS], params)]


@pytest.mark.parametrize("arch", ARCHS)
def test_greedy_on_cpu_matches_the_reference_target(arch, cpu_artifact, artifact):
    cpu = cpu_artifact(arch)
    manifest = json.loads((cpu / "manifest.json").read_text())
    assert any(k.startswith("tvm:linear_") for k in manifest["ops"])
    assert any(k.startswith("tvm:paged_attention_") for k in manifest["ops"])
    assert set(manifest["fallbacks"]) <= (ROUTING if arch in MOE else set())
    assert _greedy(cpu) == _greedy(artifact(arch, "float32"))


def test_the_kernel_set_of_llama_runs_in_tvm(cpu_artifact):
    manifest = json.loads((cpu_artifact("llama") / "manifest.json").read_text())
    ops = {k.split(":", 1)[1].split("_f32")[0] if k.startswith("tvm:") else k for k in manifest["ops"]}
    for kind in ("embedding", "rms_norm", "fused_add_rms_norm", "rope", "kv_cache_write", "silu_and_mul",
                 "gather_rows", "paged_attention"):
        assert any(o.startswith(kind) for o in ops), f"{kind} is not a TVM kernel: {sorted(ops)}"
    assert not any(k.startswith("torch:") for k in manifest["ops"]) and not manifest["fallbacks"]
    built = json.loads((cpu_artifact("llama") / BUILD_INFO).read_text())
    assert built["tvm"] == tvm.__version__ and built["mcpu"] and built["kernels"]
    assert (cpu_artifact("llama") / LIBRARY).stat().st_size > 0


def test_paged_attention_is_built_for_the_default_block_size_only(cpu_artifact):
    from kiln.ir.step_inputs import DEFAULT_BLOCK_SIZE

    built = json.loads((cpu_artifact("llama") / BUILD_INFO).read_text())
    fixed = [r["fixed"] for name, r in built["kernels"].items() if name.startswith("paged_attention_")]
    assert fixed == [{"BS": DEFAULT_BLOCK_SIZE}]
    assert LLM(cpu_artifact("llama"), num_kv_blocks=8).engine.model.block_size == DEFAULT_BLOCK_SIZE
    with pytest.raises(ValueError, match=f"blocks of {DEFAULT_BLOCK_SIZE} tokens.*block_size=32"):
        LLM(cpu_artifact("llama"), block_size=32, num_kv_blocks=8)


def test_loading_and_running_compile_nothing(cpu_artifact, monkeypatch):
    import torch

    def refuse(*args, **kwargs):
        raise AssertionError("TVM compiled at load")

    for module, name in ((tvm, "compile"), (tvm.tirx, "build")):
        monkeypatch.setattr(module, name, refuse)
    model = CompiledModel(cpu_artifact("llama"))
    logits = model(torch.tensor([5, 9, 33]), torch.arange(3), [3])
    assert logits.shape[0] == 3 and torch.isfinite(logits).all()


def test_bound_kernel_calls_follow_each_calls_inputs(cpu_artifact):
    """The executor binds each TVM call's arguments once and rebinds the inputs that change: other
    tokens, a strided view (which the launcher copies) and the first tokens again each give what
    a model that never ran gives."""
    import torch

    model = CompiledModel(cpu_artifact("llama"))
    first, other = torch.tensor([5, 9, 33]), torch.tensor([7, 1, 2])
    strided = torch.tensor([7, 0, 1, 0, 2, 0])[::2]
    want = {id(t): CompiledModel(cpu_artifact("llama"))(t, torch.arange(3), [3]) for t in (first, other)}
    for ids, like in ((first, first), (other, other), (strided, other), (first, first)):
        torch.testing.assert_close(model(ids, torch.arange(3), [3]), want[id(like)], rtol=0, atol=0)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/maps")
def test_weights_are_views_of_the_mapped_weight_files(cpu_artifact):
    """No copy at load: every weight the plan reads lies in a mapping of a weight file."""
    root = os.path.realpath(cpu_artifact("llama"))
    model = CompiledModel(root)
    spans = []
    with open("/proc/self/maps") as f:
        for line in f:
            parts = line.split()
            if len(parts) >= 6 and parts[5].startswith(root) and parts[5].endswith(".safetensors"):
                lo, hi = (int(x, 16) for x in parts[0].split("-"))
                spans.append((lo, hi))
    params = [model.executor._resident[i] for i in model.plan.params.values()]
    assert spans and params
    assert all(any(lo <= p.data_ptr() < hi for lo, hi in spans) for p in params)


def test_a_library_for_another_processor_is_refused(cpu_artifact, tmp_path):
    from kiln.codegen.artifact_writer import replace_files

    art = shutil.copytree(cpu_artifact("llama"), tmp_path / "copy")
    built = json.loads((art / BUILD_INFO).read_text()) | {"mcpu": "cortex-a76", "triple": "aarch64-linux-gnu"}
    replace_files(art, {BUILD_INFO: json.dumps(built).encode()}, (BUILD_INFO,))
    with pytest.raises(ArtifactError, match="built for processor cortex-a76.*kiln tune"):
        CompiledModel(art)


def test_inspect_lists_the_fallbacks(cpu_artifact, capsys):
    from kiln.cli import main

    art = cpu_artifact("mixtral")
    fallbacks = json.loads((art / "manifest.json").read_text())["fallbacks"]
    assert "expert_linear" in fallbacks and "topk" in fallbacks  # MoE routing stays with torch
    assert main(["inspect", str(art)]) == 0
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("fallbacks"))
    assert all(op in line for op in fallbacks)
