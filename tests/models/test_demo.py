"""The bundled demo checkpoint (``models/demo/``): files, size, tokenizer and greedy output.

The checkpoint is produced by ``python -m kiln.models.train_demo`` (see its model card); these
tests only read it. The kiln-vs-transformers greedy equality check lives with the compiler tests.
"""

from __future__ import annotations

import inspect
import json
import textwrap
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

import kiln.models

DEMO = Path(kiln.models.__file__).parent / "demo"
MAX_BYTES = 20 * 1000 * 1000  # the "at most 20 MB in all"
REQUIRED_FILES = (
    "config.json",
    "generation_config.json",
    "model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
    "README.md",
)
PROMPT = "def fibonacci(n):"
PYTHON_KEYWORDS = ("return", "if ", "else", "for ", "while ", "in ", "not ", "None", "self")
ROUND_TRIP_TEXTS = [
    PROMPT + "\n    if n < 2:\n        return n\n    return fibonacci(n - 1) + fibonacci(n - 2)\n",
    "\tmixed\ttabs  and   spaces \r\n\n\n",
    "s = 'héllo wörld 😀 — ≠ ∑'  # non-ASCII survives byte-level BPE\n",
    textwrap.dedent(inspect.getsource(textwrap)),  # a whole stdlib module
]


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(DEMO)


@pytest.fixture(scope="module")
def model():
    return AutoModelForCausalLM.from_pretrained(DEMO, dtype=torch.float32).eval()


def test_files_and_size() -> None:
    missing = [name for name in REQUIRED_FILES if not (DEMO / name).is_file()]
    assert not missing, f"missing from {DEMO}: {missing} (run python -m kiln.models.train_demo)"
    total = sum(p.stat().st_size for p in DEMO.rglob("*") if p.is_file())
    assert total <= MAX_BYTES, f"{DEMO} holds {total:,} bytes, over {MAX_BYTES:,}"


def test_config_and_generation_config(tokenizer) -> None:
    config = json.loads((DEMO / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert config["vocab_size"] == len(tokenizer)
    generation = json.loads((DEMO / "generation_config.json").read_text())
    assert generation["do_sample"] is False
    assert generation["bos_token_id"] == tokenizer.bos_token_id == 0
    assert generation["eos_token_id"] == tokenizer.eos_token_id == 1
    assert generation["pad_token_id"] == tokenizer.pad_token_id == 2


def test_model_card_states_the_numbers() -> None:
    card = (DEMO / "README.md").read_text()
    for needle in ("parameters", "training time", "train loss", "validation loss",
                   "unigram baseline", "def fibonacci(n):", "python -m kiln.models.train_demo"):
        assert needle in card, needle


def test_loads_with_transformers(model) -> None:
    assert isinstance(model, LlamaForCausalLM)
    assert model.config.tie_word_embeddings
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    n_params = sum(p.numel() for p in model.parameters())
    assert 1_000_000 < n_params < 5_000_000


@pytest.mark.parametrize("text", ROUND_TRIP_TEXTS, ids=["fib", "whitespace", "unicode", "module"])
def test_tokenizer_round_trips_python(tokenizer, text: str) -> None:
    ids = tokenizer(text).input_ids
    assert tokenizer.bos_token_id not in ids  # nothing is added on encode
    assert tokenizer.decode(ids) == text
    if len(text) > 1000:  # the BPE actually compresses Python source
        assert len(ids) < len(text) / 2.5


def test_chat_template(tokenizer) -> None:
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True
    )
    assert text == "<s><|user|>\nhi</s>\n<|assistant|>\n"


def test_greedy_generate_writes_python(model, tokenizer) -> None:
    ids = tokenizer(PROMPT, return_tensors="pt").input_ids
    out = model.generate(ids, max_new_tokens=48, do_sample=False)
    again = model.generate(ids, max_new_tokens=48, do_sample=False)
    assert torch.equal(out, again)
    text = tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)
    assert "\n    " in text, f"no indented body in {text!r}"
    found = [kw for kw in PYTHON_KEYWORDS if kw in text]
    assert len(found) >= 2, f"too few Python tokens ({found}) in {text!r}"


KILN_PROMPTS = ["def fibonacci(n):", "import os\n\n\ndef ", "class Stack:", "    for i in range(10):"]


def test_kiln_greedy_equals_transformers(model, tokenizer, tmp_path) -> None:
    """The bundled checkpoint compiles with kiln, and kiln's greedy continuation (through the
    engine, prompts batched together) equals transformers' greedy generate token for token."""
    from kiln import LLM, SamplingParams, compile

    art = compile(DEMO, tmp_path / "demo")
    outs = LLM(art).generate(KILN_PROMPTS, SamplingParams(temperature=0, max_tokens=24), use_tqdm=False)
    for prompt, out in zip(KILN_PROMPTS, outs, strict=True):
        ids = tokenizer(prompt, return_tensors="pt").input_ids
        assert out.prompt_token_ids == ids[0].tolist()
        with torch.no_grad():
            want = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=24, do_sample=False)
        want_ids = want[0, ids.shape[1]:].tolist()
        got = out.outputs[0].token_ids
        # transformers stops after EOS, as kiln does; compare what both produced.
        assert got == want_ids[: len(got)] and len(got) == len(want_ids)
        assert out.outputs[0].text == tokenizer.decode(got, skip_special_tokens=True)
