"""GGUF import: tiny llama GGUF files written here (Q8_0 / Q4_0 / Q4_1 / F16 / F32 tensors), compiled
by kiln and loaded by transformers (`gguf_file=`) as the reference.

Tolerances (float32): weights equal transformers' exactly (same dequantization, same q/k
unpermutation); Q8_0 / Q4_0 / Q4_1 linear weights stay packed and their dequant ops equal
gguf's dequantize bit for bit; logits max |error| / max |logit| < 1e-4; greedy tokens identical.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q
from gguf.quants import dequantize, quantize
from transformers import AutoModelForCausalLM, AutoTokenizer

import kiln
from kiln.cli import compile_model_main
from kiln.errors import CheckpointError, VerifyError
from kiln.ir.ops import OPS, infer_type
from kiln.ir.ops.quant import dequant_int, dequant_int_offset
from kiln.ir.serialize import loads
from kiln.ir.types import TensorType
from kiln.models.gguf import GGUFModel, is_gguf
from kiln.models.quant_formats.gguf_blocks import BLOCK_BYTES, repack_blocks
from kiln.models.tiny_gguf import DEFAULT_QUANT, write_gguf
from kiln.runtime.artifact import read_manifest
from kiln.runtime.inspect import describe
from kiln.runtime.llm import LLM
from kiln.runtime.sampling_params import SamplingParams
from kiln.runtime.server.chat_template import ChatTemplate
from kiln.runtime.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def gguf_file(checkpoint, tmp_path_factory):
    return write_gguf(checkpoint("llama"), tmp_path_factory.mktemp("gguf") / "tiny.gguf")


@pytest.fixture(scope="module")
def reference(gguf_file):
    return load_reference(gguf_file)


def load_reference(path):
    return AutoModelForCausalLM.from_pretrained(
        path.parent, gguf_file=path.name, dtype=torch.float32, attn_implementation="eager"
    ).eval()


def assert_greedy_equal(artifact, reference):
    llm = LLM(artifact, num_kv_blocks=64)
    prompts = [[5, 17, 42, 99], [8, 9, 10, 11, 12, 13]]
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts],
                        SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True), use_tqdm=False)
    for p, out in zip(prompts, outs, strict=True):
        with torch.no_grad():
            want = reference.generate(torch.tensor([p]), max_new_tokens=16, min_new_tokens=16, do_sample=False)
        assert out.outputs[0].token_ids == want[0, len(p):].tolist()


@pytest.fixture(scope="module")
def gguf_artifact(gguf_file, tmp_path_factory):
    out = tmp_path_factory.mktemp("gguf-art") / "artifact"
    assert compile_model_main([str(gguf_file), "-o", str(out)]) == 0  # through the CLI, as users do
    return out


def test_file_holds_every_type(gguf_file):
    model = GGUFModel(gguf_file)
    types = {t.tensor_type for t in model.reader.tensors}
    assert {Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.F16, Q.F32} <= types
    assert is_gguf(gguf_file) and not is_gguf(gguf_file.parent)


def test_weights_equal_transformers_and_written_values(gguf_file, reference, checkpoint):
    model = GGUFModel(gguf_file)
    ref = reference.state_dict()
    original = AutoModelForCausalLM.from_pretrained(checkpoint("llama"), dtype=torch.float32).state_dict()
    assert sorted(model.tensor_names) == sorted(k for k in ref if k in original)
    for name in model.tensor_names:
        got = model.read(name)
        assert got.dtype == torch.float32
        torch.testing.assert_close(got, ref[name], rtol=0, atol=0, msg=name)
    # The values written: F32 exact, F16 to half precision, block types as their blocks decode.
    for hf, gguf_type in [("model.norm.weight", Q.F32), ("model.layers.0.self_attn.v_proj.weight", Q.F16),
                          ("model.layers.0.mlp.up_proj.weight", Q.Q4_1), ("model.layers.1.mlp.down_proj.weight", Q.Q4_0),
                          ("model.layers.1.self_attn.o_proj.weight", Q.Q8_0)]:
        w = original[hf].numpy()
        want = {Q.F32: w, Q.F16: w.astype(np.float16).astype(np.float32)}.get(gguf_type)
        if want is None:
            want = dequantize(quantize(w, gguf_type), gguf_type)
        np.testing.assert_array_equal(model.read(hf).numpy(), want, err_msg=hf)


def test_logits_equal_transformers(gguf_artifact, reference):
    art = kiln.load_artifact(gguf_artifact)
    seqs = [[5, 17, 42, 99, 3, 7, 250], [8, 9, 10], [100, 1, 200, 33, 64]]
    ids = torch.tensor([t for s in seqs for t in s])
    pos = torch.tensor([p for s in seqs for p in range(len(s))])
    got = art.forward(ids, pos, [len(s) for s in seqs])
    with torch.no_grad():
        want = torch.cat([reference(torch.tensor([s])).logits[0] for s in seqs])
    err = (got - want).abs().max() / want.abs().max()
    assert err < 1e-4, f"max |error| / max |logit| = {err:.2e}"


def test_greedy_tokens_equal_transformers(gguf_artifact, reference):
    assert_greedy_equal(gguf_artifact, reference)


def test_tokenizer_and_chat_template_round_trip(gguf_artifact, checkpoint):
    original = AutoTokenizer.from_pretrained(checkpoint("llama"))
    tok = Tokenizer(gguf_artifact)
    for text in ["def f(x):\n    return x + 1", "héllo wörld ✓", "<s>a</s>"]:
        assert tok.encode(text, add_special_tokens=False) == original.encode(text, add_special_tokens=False)
        assert tok.decode(tok.encode(text, add_special_tokens=False), skip_special_tokens=False) == text
    assert tok.chat_template == original.chat_template
    assert tok.eos_token_ids == [original.eos_token_id]
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"},
                {"role": "user", "content": "again"}]
    rendered = ChatTemplate(tok.chat_template, tok.config).render(messages, add_generation_prompt=True)
    assert rendered == original.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def test_unknown_architecture_is_refused(checkpoint, tmp_path, capsys):
    path = write_gguf(checkpoint("llama"), tmp_path / "odd.gguf", arch="frobnicator")
    with pytest.raises(CheckpointError, match="architecture 'frobnicator'"):
        kiln.compile(path, tmp_path / "out")
    assert compile_model_main([str(path), "-o", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "frobnicator" in err and "llama" in err


def test_unreadable_quant_type_is_refused(checkpoint, tmp_path):
    path = write_gguf(checkpoint("llama"), tmp_path / "q81.gguf", quant={**DEFAULT_QUANT, "attn_q.": Q.Q8_1})
    with pytest.raises(CheckpointError, match=r"tensor 'blk\.0\.attn_q\.weight' has quantization type Q8_1"):
        kiln.compile(path, tmp_path / "out")


def test_not_a_gguf_file(tmp_path):
    bad = tmp_path / "x.gguf"
    bad.write_bytes(b"not a gguf file")
    with pytest.raises(CheckpointError, match="not a GGUF file"):
        kiln.compile(bad, tmp_path / "out")


PACKED = [Q.Q8_0, Q.Q4_0, Q.Q4_1]
INSPECT_FORMAT = {Q.Q8_0: "int8 group 32 symmetric", Q.Q4_0: "int4 group 32 symmetric",
                  Q.Q4_1: "int4 group 32 offsets"}


def random_blocks(qtype: Q, n: int, k: int, rng: np.random.Generator) -> np.ndarray:
    """GGML rows [N, K / 32 * block bytes] with every weight bit pattern and finite float16 d (and m)."""
    g, fields = k // 32, 2 if qtype == Q.Q4_1 else 1
    rows = rng.integers(0, 256, (n, g, BLOCK_BYTES[qtype.name]), dtype=np.uint8)
    rows[..., : 2 * fields] = rng.normal(size=(n, g, fields)).astype(np.float16).view(np.uint8)
    return rows.reshape(n, -1)


@pytest.mark.parametrize("qtype", PACKED, ids=lambda q: q.name)
def test_packed_dequant_equals_gguf_dequantize(qtype):
    rng = np.random.default_rng(0)
    op, bits = (dequant_int_offset, 4) if qtype == Q.Q4_1 else (dequant_int, 8 if qtype == Q.Q8_0 else 4)
    for rows in (random_blocks(qtype, 8, 96, rng), quantize(rng.normal(size=(8, 96)).astype(np.float32), qtype)):
        parts = repack_blocks(rows, qtype.name)
        assert parts["qweight"].dtype == torch.uint8 and parts["qweight"].shape == (8, 96 * bits // 8)
        got = op(*parts.values(), bits=bits, group_size=32, dtype="float32")
        np.testing.assert_array_equal(got.numpy(), dequantize(rows, qtype))


@pytest.mark.parametrize("target", ["reference", "cpu"])
@pytest.mark.parametrize("qtype", PACKED, ids=lambda q: q.name)
def test_packed_types_generate_like_transformers(qtype, target, checkpoint, tmp_path):
    path = write_gguf(checkpoint("llama"), tmp_path / "m.gguf", quant={"token_embd.": Q.F32, "": qtype})
    reference = load_reference(path)
    art = kiln.compile(path, tmp_path / "art", target=target)
    graph = loads((art / "graph.json").read_text())
    names = {p.name for p in graph.params}
    assert not any(n.endswith(("proj.weight", "lm_head.weight")) for n in names)
    # every packed linear is fused (Q4_1's float offsets too) and no dequant op is left
    qls = [n for n in graph.nodes if n.op == "quantized_linear"]
    assert qls and all(n.attrs.get("has_offsets", False) == (qtype == Q.Q4_1) for n in qls)
    assert not any(n.op.startswith("dequant_") for n in graph.nodes)
    steps = json.loads((art / "plan.json").read_text())["steps"]
    kernel = "tvm:" if target == "cpu" else "torch:"
    assert sum(s["kernel"].startswith(kernel) and "quantized_linear" in s["kernel"] for s in steps) == len(qls)
    # Packed, the linear weights keep at most 34/128 (Q8_0) of their float32 bytes: at least half is saved.
    float_bytes = 4 * sum(p.numel() for p in reference.parameters())
    linear_bytes = 4 * sum(m.weight.numel() for m in reference.modules() if isinstance(m, torch.nn.Linear))
    assert read_manifest(art)["parameters"]["bytes"] < float_bytes - linear_bytes / 2
    assert INSPECT_FORMAT[qtype] in describe(art)[0]  # kiln inspect lists the packed matmuls
    assert_greedy_equal(art, reference)


def test_tied_lm_head_reads_the_embedding_as_floats(checkpoint, tmp_path):
    ckpt = checkpoint("llama", config_overrides={"tie_word_embeddings": True})
    path = write_gguf(ckpt, tmp_path / "tied.gguf", quant={"": Q.Q8_0})
    assert GGUFModel(path).quant_type("model.embed_tokens.weight") == "Q8_0"
    art = kiln.compile(path, tmp_path / "art")
    params = {p.name: p.type for p in loads((art / "graph.json").read_text()).params}
    assert params["model.embed_tokens.weight"].dtype == "float32"
    assert params["model.layers.0.mlp.down_proj.qweight"].dtype == "uint8"
    assert_greedy_equal(art, load_reference(path))


def test_dequant_int_offset_type_errors():
    def infer(*types, bits=4, group_size=32):
        return infer_type(OPS["dequant_int_offset"], [TensorType(d, s) for d, s in types],
                          {"bits": bits, "group_size": group_size, "dtype": "float32"})

    assert infer(("uint8", (8, 48)), ("float16", (8, 3)), ("float16", (8, 3))) == TensorType("float32", (8, 96))
    with pytest.raises(VerifyError, match="bits 4 or 8"):
        infer(("uint8", (8, 48)), ("float16", (8, 3)), ("float16", (8, 3)), bits=3)
    with pytest.raises(VerifyError, match="scales and offsets of one shape"):
        infer(("uint8", (8, 48)), ("float16", (8, 3)), ("float16", (8, 2)))
    with pytest.raises(VerifyError, match="do not have the 8 rows"):
        infer(("uint8", (8, 48)), ("float16", (4, 3)), ("float16", (4, 3)))
    with pytest.raises(VerifyError, match="do not give the 2 groups"):
        infer(("uint8", (8, 48)), ("float16", (8, 2)), ("float16", (8, 2)))
