"""GGUF import: tiny llama GGUF files written here (Q8_0 / Q4_0 / Q4_1 / F16 / F32 tensors), compiled
by kiln and loaded by transformers (`gguf_file=`) as the reference.

Tolerances (float32): weights equal transformers' exactly (same dequantization, same q/k
unpermutation); logits max |error| / max |logit| < 1e-4; greedy tokens identical.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q
from gguf.quants import dequantize, quantize
from transformers import AutoModelForCausalLM, AutoTokenizer

import kiln
from kiln.cli import compile_model_main
from kiln.errors import CheckpointError
from kiln.models.gguf import GGUFModel, is_gguf
from kiln.models.tiny_gguf import DEFAULT_QUANT, write_gguf
from kiln.runtime.llm import LLM
from kiln.runtime.sampling_params import SamplingParams
from kiln.runtime.server.chat_template import ChatTemplate
from kiln.runtime.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def gguf_file(checkpoint, tmp_path_factory):
    return write_gguf(checkpoint("llama"), tmp_path_factory.mktemp("gguf") / "tiny.gguf")


@pytest.fixture(scope="module")
def reference(gguf_file):
    return AutoModelForCausalLM.from_pretrained(
        gguf_file.parent, gguf_file=gguf_file.name, dtype=torch.float32, attn_implementation="eager"
    ).eval()


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
    llm = LLM(gguf_artifact, num_kv_blocks=64)
    prompts = [[5, 17, 42, 99], [8, 9, 10, 11, 12, 13]]
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts],
                        SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True), use_tqdm=False)
    for p, out in zip(prompts, outs, strict=True):
        with torch.no_grad():
            want = reference.generate(torch.tensor([p]), max_new_tokens=16, min_new_tokens=16, do_sample=False)
        assert out.outputs[0].token_ids == want[0, len(p):].tolist()


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
