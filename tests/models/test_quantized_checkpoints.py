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

import numpy as np
import pytest
import torch
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

# head_dim 32 so that every linear has K a multiple of 128 or 64 (o_proj: K = 4 * 32).
SHAPE = {"hidden_size": 128, "intermediate_size": 256, "head_dim": 32}
LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
           "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
MODULES = [f"model.layers.{i}.{m}" for i in range(2) for m in LINEARS]
PROMPTS = [[5, 17, 42, 99], [8, 9, 10, 11, 12, 13]]
NEW_TOKENS = 12
AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)


# ---- packers: the formats' published layouts, from integer tensors -------------------------

def pack_rows(q: np.ndarray, bits: int) -> np.ndarray:
    """int32 words of unsigned `bits`-bit q [R, C] packed along R (GPTQ's qweight): word r
    holds rows r * 32/bits + j at bits j*bits.., low first."""
    per = 32 // bits
    q = q.astype(np.uint32).reshape(q.shape[0] // per, per, q.shape[1])
    words = np.zeros((q.shape[0], q.shape[2]), dtype=np.uint32)
    for j in range(per):
        words |= q[:, j, :] << np.uint32(bits * j)
    return words.view(np.int32)


def pack_cols(q: np.ndarray, bits: int, order: tuple[int, ...] | None = None) -> np.ndarray:
    """int32 words of q [R, C] packed along C: field i of word c holds column c*per + order[i]
    (GPTQ's qzeros with the identity order, AWQ's qweight / qzeros with AWQ_ORDER)."""
    per = 32 // bits
    order = order or tuple(range(per))
    q = q.astype(np.uint32).reshape(q.shape[0], q.shape[1] // per, per)
    words = np.zeros(q.shape[:2], dtype=np.uint32)
    for i, col in enumerate(order):
        words |= q[:, :, col] << np.uint32(bits * i)
    return words.view(np.int32)


def draw_int(gen: torch.Generator, n: int, k: int, bits: int, groups: int, sym: bool, desc_act: bool):
    """Random q [K, N], zeros [G, N], fp16 scales [G, N] and the group of each input channel."""
    q = torch.randint(0, 1 << bits, (k, n), generator=gen)
    half = 1 << (bits - 1)
    z = torch.full((groups, n), half) if sym else torch.randint(1, (1 << bits) - 1, (groups, n), generator=gen)
    s = (torch.rand(groups, n, generator=gen) + 0.5) * (0.25 / half)
    g = torch.arange(k) // (k // groups)
    if desc_act:
        g = g[torch.randperm(k, generator=gen)]
    return q, z, s.half(), g


def dense_int(q, z, s, g) -> torch.Tensor:
    """w [N, K] = (q - z) * s of channel k's group, in float32."""
    return ((q - z[g]).float() * s.float()[g]).T.contiguous()


def write_pair(base: Path, out: Path, tensors: dict[str, torch.Tensor], dense: dict[str, torch.Tensor],
               qc: dict) -> tuple[Path, Path]:
    """The quantized checkpoint (`tensors` over the base's others, config with `qc`) and the
    dense one of the known weights."""
    state = load_file(base / "model.safetensors")
    config = json.loads((base / "config.json").read_text())
    qdir, ddir = out / "quantized", out / "dense"
    for d, weights, cfg in [(qdir, tensors, {**config, "quantization_config": qc}), (ddir, dense, config)]:
        d.mkdir(parents=True)
        for f in base.iterdir():
            if f.name not in ("model.safetensors", "config.json"):
                shutil.copy(f, d / f.name)
        kept = {k: v for k, v in state.items() if k.removesuffix(".weight") not in MODULES}
        save_file({**kept, **{k: v.contiguous() for k, v in weights.items()}}, d / "model.safetensors")
        (d / "config.json").write_text(json.dumps(cfg, indent=2))
    return qdir, ddir


def gptq_checkpoint(base: Path, out: Path, bits=4, group_size=128, sym=True, desc_act=False, seed=0, v2=False,
                    **extra):
    """GPTQ's v1 layout ("gptq": qzeros store zero - 1), or GPTQModel's "gptq_v2" (zero as is)."""
    gen = torch.Generator().manual_seed(seed)
    tensors, dense = {}, {}
    shapes = {k.removesuffix(".weight"): v.shape for k, v in load_file(base / "model.safetensors").items()}
    for m in MODULES:
        n, k = shapes[m]
        groups = 1 if group_size == -1 else k // group_size
        q, z, s, g = draw_int(gen, n, k, bits, groups, sym, desc_act)
        tensors[f"{m}.qweight"] = torch.from_numpy(pack_rows(q.numpy(), bits))
        tensors[f"{m}.qzeros"] = torch.from_numpy(pack_cols((z if v2 else z - 1).numpy(), bits))
        tensors[f"{m}.scales"] = s
        tensors[f"{m}.g_idx"] = g.to(torch.int32)
        dense[f"{m}.weight"] = dense_int(q, z, s, g)
    qc = {"quant_method": "gptq", "bits": bits, "group_size": group_size, "sym": sym, "desc_act": desc_act,
          "damp_percent": 0.01, "true_sequential": True, "static_groups": False, "checkpoint_format": "gptq_v2" if v2 else "gptq",
          "model_name_or_path": None, "model_file_base_name": None, **extra}
    return write_pair(base, out, tensors, dense, qc)


def awq_checkpoint(base: Path, out: Path, group_size=64, seed=1, **extra):
    gen = torch.Generator().manual_seed(seed)
    tensors, dense = {}, {}
    shapes = {k.removesuffix(".weight"): v.shape for k, v in load_file(base / "model.safetensors").items()}
    for m in MODULES:
        n, k = shapes[m]
        q, z, s, g = draw_int(gen, n, k, 4, k // group_size, False, False)
        tensors[f"{m}.qweight"] = torch.from_numpy(pack_cols(q.numpy(), 4, AWQ_ORDER))
        tensors[f"{m}.qzeros"] = torch.from_numpy(pack_cols(z.numpy(), 4, AWQ_ORDER))
        tensors[f"{m}.scales"] = s
        dense[f"{m}.weight"] = dense_int(q, z, s, g)
    qc = {"quant_method": "awq", "bits": 4, "group_size": group_size, "zero_point": True, "version": "gemm",
          "modules_to_not_convert": None, **extra}
    return write_pair(base, out, tensors, dense, qc)


def fp8_checkpoint(base: Path, out: Path, seed=2, e8m0=False, **extra):
    """FineGrainedFP8: 128 x 128 blocks (k_proj / v_proj's 64 rows: a partial block); float32
    scales, or power-of-two float8_e8m0fnu ones."""
    gen = torch.Generator().manual_seed(seed)
    tensors, dense = {}, {}
    shapes = {k.removesuffix(".weight"): v.shape for k, v in load_file(base / "model.safetensors").items()}
    for m in MODULES:
        n, k = shapes[m]
        w8 = (torch.randn(n, k, generator=gen) * 100).to(torch.float8_e4m3fn)
        s = (torch.rand(-(-n // 128), -(-k // 128), generator=gen) + 0.5) * 1e-3
        if e8m0:
            s = torch.exp2(torch.randint(-12, -8, s.shape, generator=gen).float())
        tensors[f"{m}.weight"] = w8
        tensors[f"{m}.weight_scale_inv"] = s.to(torch.float8_e8m0fnu) if e8m0 else s
        dense[f"{m}.weight"] = w8.float() * s.repeat_interleave(128, 0)[:n].repeat_interleave(128, 1)[:, :k]
    qc = {"quant_method": "fp8", "activation_scheme": "dynamic", "weight_block_size": [128, 128],
          "modules_to_not_convert": None, **extra}
    return write_pair(base, out, tensors, dense, qc)


def compressed_tensors_checkpoint(base: Path, out: Path, kind="int", seed=3, weights=None, acts=None,
                                  weight_only=False, **extra):
    """llm-compressor's W8A8: int8 (or float8) weights with per-channel scales [N, 1] (or per
    tensor [1], per group [N, K / group_size], per block [ceil(N / bn), ceil(K / bk)]), dynamic
    per-token activations (none when `weight_only`)."""
    gen = torch.Generator().manual_seed(seed)
    tensors, dense = {}, {}
    shapes = {k.removesuffix(".weight"): v.shape for k, v in load_file(base / "model.safetensors").items()}
    strategy = (weights or {}).get("strategy", "channel")
    for m in MODULES:
        n, k = shapes[m]
        bn, bk = {"tensor": (n, k), "channel": (1, k)}.get(strategy) or \
            ((1, (weights or {}).get("group_size")) if strategy == "group" else tuple(weights["block_structure"]))
        scale_shape = (1,) if strategy == "tensor" else (-(-n // bn), -(-k // bk))
        if kind == "int":
            q = torch.randint(-127, 128, (n, k), generator=gen, dtype=torch.int8)
            s = ((torch.rand(scale_shape, generator=gen) + 0.5) * 2e-3).half()
        else:
            q = (torch.randn(n, k, generator=gen) * 100).to(torch.float8_e4m3fn)
            s = (torch.rand(scale_shape, generator=gen) + 0.5) * 1e-3
        tensors[f"{m}.weight"], tensors[f"{m}.weight_scale"] = q, s
        s2 = s.float().reshape(-(-n // bn), -(-k // bk))
        dense[f"{m}.weight"] = q.float() * s2.repeat_interleave(bn, 0)[:n].repeat_interleave(bk, 1)[:, :k]
    scheme = {"num_bits": 8, "type": kind, "symmetric": True, "dynamic": False, "strategy": "channel",
              "group_size": None, "block_structure": None, "actorder": None, "observer": "minmax",
              "observer_kwargs": {}, **(weights or {})}
    act = {"num_bits": 8, "type": kind, "symmetric": True, "dynamic": True, "strategy": "token",
           "group_size": None, "block_structure": None, "actorder": None, "observer": None,
           "observer_kwargs": {}, **(acts or {})}
    fmt = "int-quantized" if kind == "int" else "float-quantized"
    qc = {"quant_method": "compressed-tensors", "format": fmt, "quantization_status": "compressed",
          "config_groups": {"group_0": {"targets": ["Linear"], "weights": scheme,
                                        "input_activations": None if weight_only else act,
                                        "output_activations": None, "format": fmt}},
          "ignore": ["lm_head"], "kv_cache_scheme": None, "sparsity_config": {}, "global_compression_ratio": None,
          **extra}
    return write_pair(base, out, tensors, dense, qc)


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
