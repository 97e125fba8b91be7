"""Greedy completion straight through CompiledModel.forward (no KV cache: each step recomputes
the whole sequence). The debug path behind `kiln generate` until the engine lands."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import torch

from kiln.runtime.model import CompiledModel
from kiln.runtime.tokenizer import Tokenizer


def greedy_ids(model: CompiledModel, prompt_ids: list[int], max_tokens: int, eos: list[int]) -> Iterator[int]:
    """Yield up to max_tokens greedy token ids, stopping after an EOS id."""
    ids = list(prompt_ids)
    for _ in range(max_tokens):
        t = len(ids)
        logits = model.forward(torch.tensor(ids), torch.arange(t), [t], logits_indices=torch.tensor([t - 1]))
        nxt = int(logits[-1].argmax())
        yield nxt
        if nxt in eos:
            return
        ids.append(nxt)


def stream_greedy(artifact: str | Path, prompt: str, max_tokens: int = 64) -> Iterator[str]:
    """Yield the continuation's text as it grows (whole characters only)."""
    model = CompiledModel(artifact)
    tok = Tokenizer(artifact)
    prompt_ids = tok.encode(prompt)
    if not prompt_ids:
        raise ValueError("the prompt encodes to no tokens")
    out: list[int] = []
    shown = ""
    for t in greedy_ids(model, prompt_ids, max_tokens, tok.eos_token_ids):
        out.append(t)
        text = tok.decode(out)
        if text.endswith("\ufffd"):
            continue  # a multi-byte character is split across tokens
        yield text[len(shown):]
        shown = text
