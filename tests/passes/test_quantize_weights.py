"""quantize-weights: compile-time int8 (W8A8), fp8 and int4 (+ AWQ) quantization of the linears."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from pass_harness import rewrite
from safetensors import safe_open

import kiln
from kiln.cli import compile_model_main
from kiln.codegen.fold_weights import fold_weights
from kiln.frontend import import_model
from kiln.ir.graph import Graph
from kiln.ir.interpreter import run_graph
from kiln.ir.ops.quant import unpack_int
from kiln.ir.ops.quantize import fp8_quantize, int_dequantize, int_quantize
from kiln.passes.awq import awq_scales, collect_inputs, row_plan, search_scale
from kiln.passes.quantize_weights import QuantizeWeights, int4_group_size

BEFORE = """graph {
  %input_ids = input : i64[T]
  @embed = param : f32[16,8]
  %0 = embedding(@embed, %input_ids) : f32[T,8]
  @norm = param : f32[8]
  %1 = mul(@norm, %0) : f32[T,8]
  @q = param : f32[8,8]
  %2 = linear(%1, @q) : f32[T,8]
  @k = param : f32[8,8]
  %3 = linear(%1, @k) : f32[T,8]
  %4 = add(%2, %3) : f32[T,8]
  @head = param : f32[16,8]
  %5 = linear(%4, @head) : f32[T,16]
  return %5
}"""

INT8_AFTER = """graph {
  %input_ids = input : i64[T]
  @norm = param : f32[8]
  @embed = param : f32[16,8]
  %0 = embedding(@embed, %input_ids) : f32[T,8]
  %1 = mul(@norm, %0) : f32[T,8]
  %2 = quant_act(%1) {"format": "int8"} : f32[T,8]
  @q = param : f32[8,8]
  %3 = quantize_int(@q) {"bits": 8, "group_size": 8, "part": "qweight"} : u8[8,8]
  %4 = quantize_int(@q) {"bits": 8, "group_size": 8, "part": "scales"} : f32[8,1]
  %5 = dequant_int(%3, %4) {"bits": 8, "group_size": 8, "dtype": "float32"} : f32[8,8]
  %6 = linear(%2, %5) : f32[T,8]
  @k = param : f32[8,8]
  %7 = quantize_int(@k) {"bits": 8, "group_size": 8, "part": "qweight"} : u8[8,8]
  %8 = quantize_int(@k) {"bits": 8, "group_size": 8, "part": "scales"} : f32[8,1]
  %9 = dequant_int(%7, %8) {"bits": 8, "group_size": 8, "dtype": "float32"} : f32[8,8]
  %10 = linear(%2, %9) : f32[T,8]
  %11 = add(%6, %10) : f32[T,8]
  @head = param : f32[16,8]
  %12 = linear(%11, @head) : f32[T,16]
  return %12
}"""

FP8_AFTER = """graph {
  %input_ids = input : i64[T]
  @norm = param : f32[8]
  @embed = param : f32[16,8]
  %0 = embedding(@embed, %input_ids) : f32[T,8]
  %1 = mul(@norm, %0) : f32[T,8]
  %2 = quant_act(%1) {"format": "float8_e4m3fn"} : f32[T,8]
  @q = param : f32[8,8]
  %3 = quantize_fp8(@q) {"part": "qweight"} : f8e4m3[8,8]
  %4 = quantize_fp8(@q) {"part": "scales"} : f32[8,1]
  %5 = dequant_fp8(%3, %4) {"block_n": 1, "block_k": 8, "dtype": "float32"} : f32[8,8]
  %6 = linear(%2, %5) : f32[T,8]
  @k = param : f32[8,8]
  %7 = quantize_fp8(@k) {"part": "qweight"} : f8e4m3[8,8]
  %8 = quantize_fp8(@k) {"part": "scales"} : f32[8,1]
  %9 = dequant_fp8(%7, %8) {"block_n": 1, "block_k": 8, "dtype": "float32"} : f32[8,8]
  %10 = linear(%2, %9) : f32[T,8]
  %11 = add(%6, %10) : f32[T,8]
  @head = param : f32[16,8]
  %12 = linear(%11, @head) : f32[T,16]
  return %12
}"""

# AWQ: the shared input's 1/s goes into the norm weight; each weight's columns times s
INT4_AWQ_AFTER = """graph {
  %input_ids = input : i64[T]
  @norm = param : f32[8]
  %0 = const() {"value": [1.0, 0.5, 1.0, 0.5, 1.0, 0.5, 1.0, 0.5]} : f32[8]
  %1 = mul(@norm, %0) : f32[8]
  @embed = param : f32[16,8]
  %2 = embedding(@embed, %input_ids) : f32[T,8]
  %3 = mul(%1, %2) : f32[T,8]
  @q = param : f32[8,8]
  %4 = const() {"value": [1.0, 2.0, 1.0, 2.0, 1.0, 2.0, 1.0, 2.0]} : f32[8]
  %5 = mul(@q, %4) : f32[8,8]
  %6 = quantize_int(%5) {"bits": 4, "group_size": 4, "part": "qweight"} : u8[8,4]
  %7 = quantize_int(%5) {"bits": 4, "group_size": 4, "part": "scales"} : f32[8,2]
  %8 = quantize_int(%5) {"bits": 4, "group_size": 4, "part": "zeros"} : u8[8,2]
  %9 = dequant_int(%6, %7, %8) {"bits": 4, "group_size": 4, "dtype": "float32"} : f32[8,8]
  %10 = linear(%3, %9) : f32[T,8]
  @k = param : f32[8,8]
  %11 = const() {"value": [1.0, 2.0, 1.0, 2.0, 1.0, 2.0, 1.0, 2.0]} : f32[8]
  %12 = mul(@k, %11) : f32[8,8]
  %13 = quantize_int(%12) {"bits": 4, "group_size": 4, "part": "qweight"} : u8[8,4]
  %14 = quantize_int(%12) {"bits": 4, "group_size": 4, "part": "scales"} : f32[8,2]
  %15 = quantize_int(%12) {"bits": 4, "group_size": 4, "part": "zeros"} : u8[8,2]
  %16 = dequant_int(%13, %14, %15) {"bits": 4, "group_size": 4, "dtype": "float32"} : f32[8,8]
  %17 = linear(%3, %16) : f32[T,8]
  %18 = add(%10, %17) : f32[T,8]
  @head = param : f32[16,8]
  %19 = linear(%18, @head) : f32[T,16]
  return %19
}"""

SCALE = (1.0, 2.0) * 4


@pytest.mark.parametrize("method, after", [("int8", INT8_AFTER), ("fp8", FP8_AFTER)])
def test_w8a8_before_after(method, after):
    _, result = rewrite(QuantizeWeights(method=method), BEFORE, after)
    assert result.meta["quantization"]["linears"] == 2  # the LM head stays float


def test_lm_head_only_when_asked():
    graph, _ = rewrite(QuantizeWeights(method="int8"), BEFORE, INT8_AFTER)
    result = QuantizeWeights(method="int8", lm_head=True).apply(graph)
    assert result.meta["quantization"]["linears"] == 3 and result.meta["quantization"]["lm_head"] == "quantized"
    assert not any(n.op == "linear" and n.inputs[1].op == "param" for n in result.nodes)


def test_int4_awq_folds_into_the_norm():
    _, result = rewrite(QuantizeWeights(method="int4", group_size=4, act_scales={"q": SCALE, "k": SCALE}),
                        BEFORE, INT4_AWQ_AFTER)
    assert result.meta["quantization"]["awq"] is True


SWIGLU_BEFORE = """graph {
  %input_ids = input : i64[T]
  @embed = param : f32[16,4]
  %0 = embedding(@embed, %input_ids) : f32[T,4]
  @gate = param : f32[4,4]
  %1 = linear(%0, @gate) : f32[T,4]
  @up = param : f32[4,4]
  %2 = linear(%0, @up) : f32[T,4]
  %3 = silu(%1) : f32[T,4]
  %4 = mul(%3, %2) : f32[T,4]
  @down = param : f32[4,4]
  %5 = linear(%4, @down) : f32[T,4]
  @head = param : f32[16,4]
  %6 = linear(%5, @head) : f32[T,16]
  return %6
}"""

# AWQ on the down projection: its input's 1/s goes into the up projection's rows
SWIGLU_AWQ_AFTER = """graph {
  %input_ids = input : i64[T]
  @embed = param : f32[16,4]
  %0 = embedding(@embed, %input_ids) : f32[T,4]
  @gate = param : f32[4,4]
  %1 = quantize_int(@gate) {"bits": 4, "group_size": 4, "part": "qweight"} : u8[4,2]
  %2 = quantize_int(@gate) {"bits": 4, "group_size": 4, "part": "scales"} : f32[4,1]
  %3 = quantize_int(@gate) {"bits": 4, "group_size": 4, "part": "zeros"} : u8[4,1]
  %4 = dequant_int(%1, %2, %3) {"bits": 4, "group_size": 4, "dtype": "float32"} : f32[4,4]
  %5 = linear(%0, %4) : f32[T,4]
  %6 = silu(%5) : f32[T,4]
  @up = param : f32[4,4]
  %7 = const() {"value": [[0.5], [0.25], [2.0], [1.0]]} : f32[4,1]
  %8 = mul(@up, %7) : f32[4,4]
  %9 = quantize_int(%8) {"bits": 4, "group_size": 4, "part": "qweight"} : u8[4,2]
  %10 = quantize_int(%8) {"bits": 4, "group_size": 4, "part": "scales"} : f32[4,1]
  %11 = quantize_int(%8) {"bits": 4, "group_size": 4, "part": "zeros"} : u8[4,1]
  %12 = dequant_int(%9, %10, %11) {"bits": 4, "group_size": 4, "dtype": "float32"} : f32[4,4]
  %13 = linear(%0, %12) : f32[T,4]
  %14 = mul(%6, %13) : f32[T,4]
  @down = param : f32[4,4]
  %15 = const() {"value": [2.0, 4.0, 0.5, 1.0]} : f32[4]
  %16 = mul(@down, %15) : f32[4,4]
  %17 = quantize_int(%16) {"bits": 4, "group_size": 4, "part": "qweight"} : u8[4,2]
  %18 = quantize_int(%16) {"bits": 4, "group_size": 4, "part": "scales"} : f32[4,1]
  %19 = quantize_int(%16) {"bits": 4, "group_size": 4, "part": "zeros"} : u8[4,1]
  %20 = dequant_int(%17, %18, %19) {"bits": 4, "group_size": 4, "dtype": "float32"} : f32[4,4]
  %21 = linear(%14, %20) : f32[T,4]
  @head = param : f32[16,4]
  %22 = linear(%21, @head) : f32[T,16]
  return %22
}"""


def test_int4_awq_folds_into_the_up_projection():
    rewrite(QuantizeWeights(method="int4", group_size=4, act_scales={"down": (2.0, 4.0, 0.5, 1.0)}),
            SWIGLU_BEFORE, SWIGLU_AWQ_AFTER)

# -- the quantizers: round to nearest, within half a step of the weight


@pytest.mark.parametrize("bits, group", [(8, 96), (4, 32)])
def test_int_round_to_nearest_error_bound(bits, group):
    w = torch.randn(24, 96) * torch.rand(24, 1) + 0.1 * torch.randn(24, 96).sign()
    w[3] = 0  # an all-zero row
    q, s, z = int_quantize(w, bits, group)
    assert q.min() >= 0 and q.max() < 1 << bits and (z is None) == (bits == 8)
    step = s.repeat_interleave(group, dim=1)
    assert ((w - int_dequantize(q, s, z, bits)).abs() <= step / 2 * (1 + 1e-5) + 1e-7).all()
    assert (int_dequantize(q, s, z, bits)[3] == 0).all()


def test_fp8_error_bound():
    w = torch.randn(16, 64)
    q, s = fp8_quantize(w)
    assert q.dtype == torch.float8_e4m3fn and s.shape == (16, 1)
    # e4m3 has 3 mantissa bits: relative error at most 2^-4 (normal range)
    assert ((q.float() * s - w).abs() <= w.abs() / 16 + s * 2**-9).all()


def test_int4_group_size():
    assert int4_group_size(4096) == 128 and int4_group_size(688) == 86 and int4_group_size(64) == 64
    with pytest.raises(kiln.errors.KilnError, match="even number"):
        int4_group_size(45)


def test_awq_search_never_worse_than_round_to_nearest():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(256, 64, generator=g) * torch.logspace(-1, 1, 64)  # outlier channels
    w = torch.randn(32, 64, generator=g)
    s, alpha, ratio = search_scale(x, [w], group_size=32)
    assert ratio <= 1.0 and (s is None) == (alpha == 0.0)
    assert ratio < 0.9  # activation outliers: scaling pays



def test_awq_rows_stay_within_the_budget(checkpoint):
    imported = import_model(str(checkpoint("llama")))
    graph, weights = imported.graph, imported.weights
    seqs = [[(7 * i + j) % 200 + 3 for j in range(32)] for i in range(4)]
    full = collect_inputs(graph, weights, seqs)  # 128 tokens: every row kept
    full_bytes = sum(rows.nbytes for rows, _ in full.values())
    assert all(rows.shape[0] == 128 for rows, _ in full.values())
    budget = full_bytes // 5
    keep, step = row_plan(list(full), budget)
    assert keep == step == 25
    bounded = collect_inputs(graph, weights, seqs, budget=budget)  # one sequence a step
    assert sum(rows.nbytes for rows, _ in bounded.values()) <= budget < full_bytes
    for x, (rows, mean_abs) in bounded.items():
        torch.testing.assert_close(rows, full[x][0][::6])  # 22 rows: every 6th token over all steps
        torch.testing.assert_close(mean_abs, full[x][1])  # over every token still
    scales, alphas = awq_scales(graph, weights, seqs, budget=full_bytes)  # the budget just fits
    assert (scales, alphas) == awq_scales(graph, weights, seqs)
    assert awq_scales(graph, weights, seqs, budget=budget)[1].keys() == alphas.keys()

# -- the pass over a traced model, folded: packed params within half a step of each weight


@pytest.mark.parametrize("method", ["int8", "fp8", "int4"])
def test_folded_params_are_packed_and_close(checkpoint, method):
    imported = import_model(str(checkpoint("llama")))
    graph = QuantizeWeights(method=method).apply(imported.graph)
    folded_graph, producers = fold_weights(graph, imported.weights)
    deq = [n for n in folded_graph.nodes if n.op in ("dequant_int", "dequant_fp8")]
    assert len(deq) == 2 * 7  # q k v o gate up down, 2 layers; not the LM head
    for n in deq:
        parts = [producers[p.name]() for p in n.inputs]
        name = n.inputs[0].name.rsplit(".", 1)[0]  # folded from one weight: "<weight>.quantize_int"
        w = imported.weights(name, next(p for p in graph.params if p.name == name).type).float()
        dq = run_graph(Graph([], []).with_nodes([], [n]), {}, lambda k, t: producers[k]())[0]
        if method == "fp8":
            assert parts[0].dtype == torch.float8_e4m3fn and parts[1].shape == (w.shape[0], 1)
            assert ((dq - w).abs() <= w.abs() / 16 + parts[1] * 2**-9).all()
            continue
        bits = 8 if method == "int8" else 4
        assert parts[0].dtype == torch.uint8 and parts[0].shape == (w.shape[0], w.shape[1] * bits // 8)
        group = n.attrs["group_size"]
        assert group == (w.shape[1] if bits == 8 else int4_group_size(w.shape[1]))
        assert parts[1].shape == (w.shape[0], w.shape[1] // group)
        assert unpack_int(parts[0], bits).max() < 1 << bits
        step = parts[1].repeat_interleave(group, dim=1)
        assert ((dq - w).abs() <= step / 2 * (1 + 1e-5) + 1e-7).all()


# -- end to end: reference and cpu artifacts, generation, --verify, the manifest


def _greedy(art, prompt=(5, 9, 17, 33, 2, 70), n=8):
    llm = kiln.LLM(str(art), num_kv_blocks=16)
    out = llm.generate([{"prompt_token_ids": list(prompt)}], kiln.SamplingParams(max_tokens=n, ignore_eos=True, temperature=0.0))
    return out[0].outputs[0].token_ids


def _packed_dtypes(art) -> set[str]:
    dtypes = set()
    for f in (art / "weights").glob("*.safetensors"):
        with safe_open(f, "pt") as g:
            dtypes |= {g.get_slice(k).get_dtype() for k in g.keys()}
    return dtypes


@pytest.mark.parametrize("method, packed", [("int8", "U8"), ("fp8", "F8_E4M3"), ("int4", "U8")])
def test_targets_agree(artifact, method, packed):
    arts = {t: artifact("llama", target=t, quantize=method) for t in ("reference", "cpu")}
    for art in arts.values():
        assert packed in _packed_dtypes(art)
        q = json.loads((art / "manifest.json").read_text())["quantization"]
        assert q["method"] == method and q["linears"] == 14 and q["calibration"] is None
    assert _greedy(arts["reference"]) == _greedy(arts["cpu"])


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("method", ["int8", "fp8", "int4"])
def test_cuda_target_agrees(artifact, method, dtype):
    arts = {t: artifact("llama", dtype, target=t, quantize=method) for t in ("reference", "cuda")}
    assert _greedy(arts["reference"]) == _greedy(arts["cuda"])


@pytest.mark.gpu
def test_kiln_tune_searches_the_quantized_gemv(checkpoint, tmp_path):
    from kiln.codegen.cuda.tune import tune

    art = kiln.compile(checkpoint("llama"), tmp_path / "int4", target="cuda", dtype="bfloat16", quantize="int4")
    before = _greedy(art)
    done = tune(art, budget=20)
    entries = json.loads((art / "tuning.json").read_text())["kernels"]["quantized_linear"]
    assert entries and all(e["tuned_us"] <= e["default_us"] and e["tried"] >= 1 for e in entries.values())
    assert "qlinear" in done["table"]
    assert _greedy(art) == before


def test_cli_int4_calibration_verify(checkpoint, tmp_path, capsys):
    calib = tmp_path / "calib.txt"
    calib.write_text("def add(a, b):\n    return a + b\n" * 40, encoding="utf-8")
    out = tmp_path / "art"
    rc = compile_model_main([str(checkpoint("llama")), "-o", str(out), "--quantize", "int4",
                             "--calibration", str(calib), "--verify", "--quantize-lm-head"])
    assert rc == 0, capsys.readouterr().err
    m = json.loads((out / "manifest.json").read_text())
    q = m["quantization"]
    assert q["awq"] is True and q["bits"] == 4 and q["group_size"] == 128
    assert q["linears"] == 15 and q["lm_head"] == "quantized"
    assert set(q["group_size_overrides"].values()) == {64}  # K = 64 < 128: one group a row
    assert len(q["calibration"]["sha256"]) == 64 and "quantize-weights" in m["pipeline"]
    assert m["pipeline"].index("quantize-weights") < m["pipeline"].index("merge-projections")
    assert len(_greedy(out)) == 8


def test_errors(checkpoint, tmp_path, capsys):
    ckpt = str(checkpoint("llama"))
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n", encoding="utf-8")
    cases = [
        (["--quantize", "int3"], "unknown --quantize value 'int3'; accepted: int8, fp8, int4"),
        (["--quantize", "int8", "--calibration", str(empty)], "applies to --quantize int4 only"),
        (["--calibration", str(empty)], "--calibration needs --quantize int4"),
        (["--quantize-lm-head"], "--quantize-lm-head needs --quantize"),
        (["--passes", "+quantize-weights"], "comes with --quantize"),
        (["--quantize", "int4", "--calibration", str(empty)], "is empty"),
        (["--quantize", "int4", "--calibration", str(tmp_path / "nope.txt")], "does not exist"),
    ]
    for i, (flags, message) in enumerate(cases):
        assert compile_model_main([ckpt, "-o", str(tmp_path / f"o{i}"), *flags]) == 2
        assert message in capsys.readouterr().err
    quantized = tmp_path / "quantized"
    shutil.copytree(ckpt, quantized)
    cfg = json.loads((quantized / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "awq", "bits": 4}
    (quantized / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="already quantized"):
        kiln.compile(quantized, tmp_path / "q", quantize="int4")
    from kiln.models.tiny_gguf import write_gguf

    gguf = write_gguf(ckpt, tmp_path / "tiny.gguf")  # Q8_0 / Q4_0 tensors
    with pytest.raises(ValueError, match="already quantized"):
        kiln.compile(gguf, tmp_path / "g", quantize="int8")


def test_moe_router_and_lm_head_stay_float(checkpoint):
    from kiln.passes.quantize_weights import quantized_linears, weight_name

    graph = import_model(str(checkpoint("mixtral"))).graph
    kept = {weight_name(n.inputs[1]) for n in graph.nodes if n.op == "linear"} - {
        weight_name(n.inputs[1]) for n in quantized_linears(graph)}
    assert kept == {"model.layers.0.mlp.gate.weight", "model.layers.1.mlp.gate.weight", "lm_head.weight"}
    assert "lm_head.weight" in {weight_name(n.inputs[1]) for n in quantized_linears(graph, lm_head=True)}
