"""Pre-quantized checkpoints (GPTQ, AWQ, FP8 blocks, compressed-tensors INT8 W8A8 and FP8):
tiny llama checkpoints packed here from the formats' published layouts (written independently
of kiln's loader), with integer weights, zeros and scales drawn at random, so the dense weights
are known exactly: w = ((q - z) * s) in float32.

Checks: kiln's dequantized weights equal the known ones exactly (float32, no tolerance); greedy
tokens on the `reference` target equal transformers' on a dense checkpoint of the known weights
(W8A8: on that checkpoint with every quantized linear's input rounded per token through int8 by
a forward pre-hook, the activation quantization compressed-tensors' dynamic per-token scheme
means); logits within max |error| / max |logit| < 1e-4 (float32; different matmul accumulation
orders only); the `cpu` target's greedy tokens equal `reference`'s (GPTQ 4-bit, INT8 W8A8);
every unsupported option is a CheckpointError naming it.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from quant_packers import (
    MODULES,
    SHAPE,
    awq_checkpoint,
    compressed_tensors_checkpoint,
    fp8_checkpoint,
    gptq_checkpoint,
)
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

import kiln
from kiln.errors import CheckpointError
from kiln.frontend import import_model
from kiln.ir.graph import Graph
from kiln.ir.interpreter import run_graph
from kiln.models.checkpoint import build_checkpoint
from kiln.models.quantized import load_quantized
from kiln.runtime.llm import LLM
from kiln.runtime.sampling_params import SamplingParams

PROMPTS = [[5, 17, 42, 99], [8, 9, 10, 11, 12, 13]]
NEW_TOKENS = 12


# ---- references -------------------------------------------------------------------------

def per_token(x: torch.Tensor, qmax: float, dtype) -> torch.Tensor:
    """x rounded through a dynamic per-token quantization (compressed-tensors' 'token' strategy):
    s = max|x| / qmax per row, x / s rounded to int8 (or cast to fp8), times s."""
    x32 = x.float()
    s = x32.abs().amax(-1, keepdim=True) / qmax
    s = torch.where(s == 0, torch.ones_like(s), s)
    y = (x32 / s).round().clamp(-128, 127) if dtype is torch.int8 else (x32 / s).to(dtype).float()
    return (y * s).to(x.dtype)


def reference_model(dense: Path, act: torch.dtype | None):
    model = AutoModelForCausalLM.from_pretrained(dense, dtype=torch.float32, attn_implementation="eager").eval()
    if act is not None:
        qmax = 127.0 if act is torch.int8 else 448.0
        for name, mod in model.named_modules():
            if name in MODULES:
                mod.register_forward_pre_hook(lambda _m, args: (per_token(args[0], qmax, act), *args[1:]))
    return model


def kiln_greedy(art: Path) -> list[list[int]]:
    llm = LLM(art, num_kv_blocks=64)
    outs = llm.generate([{"prompt_token_ids": p} for p in PROMPTS],
                        SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, ignore_eos=True), use_tqdm=False)
    return [o.outputs[0].token_ids for o in outs]


def reference_greedy(model) -> list[list[int]]:
    with torch.no_grad():
        return [model.generate(torch.tensor([p]), max_new_tokens=NEW_TOKENS, do_sample=False,
                               eos_token_id=None, pad_token_id=0)[0, len(p):].tolist() for p in PROMPTS]


def check_logits(art: Path, model) -> None:
    got = kiln.load_artifact(art).forward(torch.tensor(PROMPTS[1]), torch.arange(len(PROMPTS[1])),
                                          [len(PROMPTS[1])])
    with torch.no_grad():
        want = model(torch.tensor([PROMPTS[1]])).logits[0]
    err = (got - want).abs().max() / want.abs().max()
    assert err < 1e-4, f"max |error| / max |logit| = {err:.2e}"


def dequantized_weights(qdir: Path) -> dict[str, torch.Tensor]:
    """Every dequant node of kiln's import, evaluated by the reference interpreter, keyed by the
    module whose weight it is."""
    imported = load_quantized(import_model(qdir))
    out = {}
    for n in imported.graph.nodes:
        if n.op in ("dequant_int", "dequant_fp8"):
            module = n.inputs[0].name.removesuffix(".qweight")
            out[module] = run_graph(Graph([], []).with_nodes([], [n]), {}, imported.weights)[0]
    return out


def assert_stores_packed_weights(art: Path) -> None:
    """The artifact stores the packed weights: no layer holds a dense 2-D float tensor (a
    dequant folded at compile time would store one)."""
    packed = 0
    for f in (art / "weights").glob("*.safetensors"):
        with safe_open(f, framework="pt") as h:
            for key in h.keys():
                sl = h.get_slice(key)
                if key.startswith("model.layers."):
                    dense = sl.get_dtype() in ("F32", "F16", "BF16") and len(sl.get_shape()) == 2 \
                        and not key.endswith(".scales")
                    assert not dense, f"{art}: dense weight '{key}' {sl.get_shape()} stored"
                    packed += key.endswith(".qweight")
    assert packed, f"{art} stores no packed weight"


# ---- fixtures ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    return build_checkpoint("llama", tmp_path_factory.mktemp("qbase"), config_overrides=SHAPE)


CASES = {
    "gptq-4bit-g128-sym": (gptq_checkpoint, {}, None),
    "gptq-4bit-g32-asym-act-order": (gptq_checkpoint, {"group_size": 32, "sym": False, "desc_act": True}, None),
    "gptq-8bit-g64-act-order": (gptq_checkpoint, {"bits": 8, "group_size": 64, "sym": False, "desc_act": True}, None),
    "gptq-4bit-per-channel": (gptq_checkpoint, {"group_size": -1}, None),
    "awq-4bit-g64": (awq_checkpoint, {}, None),
    "fp8-block": (fp8_checkpoint, {}, None),
    "int8-w8a8": (compressed_tensors_checkpoint, {}, torch.int8),
    "fp8-w8a8-channel": (compressed_tensors_checkpoint, {"kind": "float"}, torch.float8_e4m3fn),
}
WEIGHT_CASES = {  # more layouts, checked for their weights only
    "gptq-v2-4bit-g64-asym": (gptq_checkpoint, {"group_size": 64, "sym": False, "v2": True}, None),
    "gptq-8bit-per-channel-sym": (gptq_checkpoint, {"bits": 8, "group_size": -1}, None),
    "awq-4bit-g128": (awq_checkpoint, {"group_size": 128}, None),
    "fp8-block-e8m0-scales": (fp8_checkpoint, {"e8m0": True}, None),
    "int8-group-weight-only": (compressed_tensors_checkpoint,
                               {"weights": {"strategy": "group", "group_size": 32}, "weight_only": True}, None),
    "int8-per-tensor": (compressed_tensors_checkpoint, {"weights": {"strategy": "tensor"}}, torch.int8),
    "fp8-per-tensor": (compressed_tensors_checkpoint, {"kind": "float", "weights": {"strategy": "tensor"}},
                       torch.float8_e4m3fn),
    "fp8-block-compressed-tensors": (compressed_tensors_checkpoint, {"kind": "float", "weights": {
        "strategy": "block", "block_structure": [128, 128]}}, torch.float8_e4m3fn),
}
CPU_CASES = ("gptq-4bit-g128-sym", "int8-w8a8")


@pytest.fixture(scope="module")
def pair(base, tmp_path_factory):
    cache: dict[str, tuple[Path, Path]] = {}

    def get(case: str) -> tuple[Path, Path]:
        if case not in cache:
            make, kw, _ = {**CASES, **WEIGHT_CASES}[case]
            cache[case] = make(base, tmp_path_factory.mktemp(case), **kw)
        return cache[case]

    return get


@pytest.fixture(scope="module")
def compiled(pair, tmp_path_factory):
    cache: dict[tuple[str, str], Path] = {}

    def get(case: str, target: str = "reference") -> Path:
        if (case, target) not in cache:
            cache[case, target] = kiln.compile(pair(case)[0], tmp_path_factory.mktemp(case) / target, target=target)
        return cache[case, target]

    return get


# ---- tests ------------------------------------------------------------------------------

@pytest.mark.parametrize("case", [*CASES, *WEIGHT_CASES])
def test_dequantized_weights_equal_known_weights(case, pair):
    qdir, ddir = pair(case)
    known = load_file(ddir / "model.safetensors")
    got = dequantized_weights(qdir)
    assert sorted(got) == sorted(MODULES)
    for m, w in got.items():
        torch.testing.assert_close(w, known[f"{m}.weight"], rtol=0, atol=0, msg=m)


@pytest.mark.parametrize("case", CASES)
def test_greedy_tokens_equal_transformers(case, pair, compiled):
    _, ddir = pair(case)
    art = compiled(case)
    assert_stores_packed_weights(art)
    model = reference_model(ddir, CASES[case][2])
    check_logits(art, model)
    assert kiln_greedy(art) == reference_greedy(model)


@pytest.mark.parametrize("case", CPU_CASES)
def test_cpu_target_generates_as_reference(case, compiled):
    assert kiln_greedy(compiled(case, "cpu")) == kiln_greedy(compiled(case))


@pytest.mark.gpu
@pytest.mark.parametrize("case", CASES)
def test_cuda_target_generates_as_reference(case, compiled):
    assert kiln_greedy(compiled(case, "cuda")) == kiln_greedy(compiled(case))


def test_dense_modules_stay_dense(pair):
    """lm_head, embeddings and norms are read as they are; only the listed linears dequantize."""
    imported = load_quantized(import_model(pair("gptq-4bit-g128-sym")[0]))
    params = {p.name: p.type for p in imported.graph.params}
    assert params["lm_head.weight"].dtype == "float32" and "model.embed_tokens.weight" in params
    assert not any(n.removesuffix(".weight") in MODULES for n in params if n.endswith(".weight"))
    assert params["model.layers.0.mlp.down_proj.qweight"].dtype == "uint8"
    assert params["model.layers.0.mlp.down_proj.qweight"].shape == (128, 128)  # [N, K/2]
    assert params["model.layers.0.mlp.down_proj.scales"].shape == (128, 2)  # [N, G]


def test_fp8_packing_agrees_with_transformers(pair):
    """The test's FP8 packer against an independent reader: transformers dequantizes
    FineGrainedFP8 checkpoints at load without a GPU, to the same known weights."""
    qdir, ddir = pair("fp8-block")
    state = AutoModelForCausalLM.from_pretrained(qdir, dtype=torch.float32).state_dict()
    known = load_file(ddir / "model.safetensors")
    for m in MODULES:
        torch.testing.assert_close(state[f"{m}.weight"], known[f"{m}.weight"], rtol=0, atol=0, msg=m)


def test_gptq_with_dense_biases(tmp_path):
    """qwen2's q/k/v biases stay dense params beside the GPTQ weights."""
    base = build_checkpoint("qwen2", tmp_path / "base", config_overrides={"hidden_size": 128, "intermediate_size": 256})
    qdir, ddir = gptq_checkpoint(base, tmp_path / "q", group_size=32, sym=False)
    art = kiln.compile(qdir, tmp_path / "art")
    model = reference_model(ddir, None)
    check_logits(art, model)
    assert kiln_greedy(art) == reference_greedy(model)


def test_g_idx_kept_only_for_act_order(pair):
    """A stored g_idx equal to k // group_size is dropped; an act-order one is a dequant input."""
    for case, kept in [("gptq-4bit-g128-sym", False), ("gptq-4bit-g32-asym-act-order", True)]:
        names = {p.name for p in load_quantized(import_model(pair(case)[0])).graph.params}
        assert ("model.layers.0.self_attn.q_proj.g_idx" in names) == kept, case


def test_unconsumed_quantized_tensor_is_refused(pair, tmp_path):
    """A quantized tensor that no traced linear weight reads is named, not silently skipped."""
    qdir = pair("gptq-4bit-g128-sym")[0]
    bad = tmp_path / "bad"
    shutil.copytree(qdir, bad)
    state = load_file(bad / "model.safetensors")
    state["model.layers.0.mlp.experts.qweight"] = state["model.layers.0.mlp.up_proj.qweight"].clone()
    save_file(state, bad / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"'model\.layers\.0\.mlp\.experts\.qweight' belongs to no linear"):
        load_quantized(import_model(bad))


def test_act_order_without_g_idx_is_refused(pair, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(pair("gptq-4bit-g32-asym-act-order")[0], bad)
    state = load_file(bad / "model.safetensors")
    del state["model.layers.0.self_attn.q_proj.g_idx"]
    save_file(state, bad / "model.safetensors")
    with pytest.raises(CheckpointError, match="desc_act is set but model.layers.0.self_attn.q_proj has no g_idx"):
        load_quantized(import_model(bad))


def test_modules_to_not_convert_left_dense(base, tmp_path):
    """A module the config leaves dense is read from its dense weight."""
    qdir, _ = gptq_checkpoint(base, tmp_path, modules_to_not_convert=["model.layers.1.mlp.down_proj"])
    state = load_file(qdir / "model.safetensors")
    m = "model.layers.1.mlp.down_proj"
    for suffix in ("qweight", "qzeros", "scales", "g_idx"):
        del state[f"{m}.{suffix}"]
    state[f"{m}.weight"] = torch.randn(128, 256)
    save_file(state, qdir / "model.safetensors")
    imported = load_quantized(import_model(qdir))
    assert f"{m}.weight" in {p.name for p in imported.graph.params}
    assert f"{m}.qweight" not in {p.name for p in imported.graph.params}


def _group(key: str, **changes):
    """An edit of compressed-tensors' group_0 `key` (weights / input_activations)."""
    return lambda qc: qc["config_groups"]["group_0"][key].update(changes)


UNSUPPORTED = [  # (checkpoint writer, edit of its quantization_config, what the error names)
    (gptq_checkpoint, lambda qc: qc.update(bits=3), "bits 3"),
    (gptq_checkpoint, lambda qc: qc.update(checkpoint_format="marlin"), "checkpoint_format 'marlin'"),
    (awq_checkpoint, lambda qc: qc.update(version="gemv"), "version 'gemv'"),
    (awq_checkpoint, lambda qc: qc.update(zero_point=False), "zero_point False"),
    (fp8_checkpoint, lambda qc: qc.update(activation_scheme="static"), "activation_scheme 'static'"),
    (compressed_tensors_checkpoint, _group("weights", symmetric=False), "symmetric False"),
    (compressed_tensors_checkpoint, _group("input_activations", dynamic=False), "dynamic False"),
    (compressed_tensors_checkpoint, _group("input_activations", strategy="tensor"), "strategy 'tensor'"),
    (compressed_tensors_checkpoint, lambda qc: (qc.update(format="pack-quantized"),
                                                qc["config_groups"]["group_0"].update(format="pack-quantized")),
     "format 'pack-quantized'"),
    (compressed_tensors_checkpoint, lambda qc: qc.update(kv_cache_scheme={"num_bits": 8}), "kv_cache_scheme"),
    (gptq_checkpoint, lambda qc: qc.update(quant_method="hqq"), "quant_method 'hqq'.*'gptq', 'awq'"),
]


@pytest.mark.parametrize("make, edit, named", UNSUPPORTED, ids=[u[2].split(".")[0] for u in UNSUPPORTED])
def test_unsupported_option_is_refused(make, edit, named, base, tmp_path):
    qdir, _ = make(base, tmp_path)
    cfg = json.loads((qdir / "config.json").read_text())
    edit(cfg["quantization_config"])
    (qdir / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=named):
        kiln.compile(qdir, tmp_path / "out")
