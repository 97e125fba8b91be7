"""Corpus, tokenizer and batches for the bundled demo model (see :mod:`kiln.models.train_demo`).

The corpus is the Python standard library's own source, so every machine has it without a
download. Files are read in sorted path order and split into train/validation by a checksum of
their relative path, which makes the split independent of the seed and of the file count.

Token stream layout (what the model is trained on and how it should be prompted)::

    file_0 tokens </s> file_1 tokens </s> ... file_n tokens </s>

No ``<s>`` is written anywhere and the tokenizer adds nothing on ``encode``; training windows
start at arbitrary offsets, so a bare prompt such as ``"def fibonacci(n):"`` is in-distribution.
"""

from __future__ import annotations

import math
import sys
import sysconfig
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

from .tokenizer import BOS, CHAT_TEMPLATE, EOS, PAD, SPECIAL_TOKENS

# Directories skipped anywhere in a path. Tests and installed packages are not the standard
# library proper; `encodings` (codec tables emitted by gencodec.py) and `pydoc_data` (a 750 KB
# dict of English help text) are generated data that would flatter the loss without teaching
# the model any Python.
EXCLUDED_DIRS = frozenset(
    {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__",
     "encodings", "pydoc_data"}
)
VAL_MODULUS = 50  # a file goes to validation when crc32(relative path) % 50 == 0 (~2%)


@dataclass(frozen=True)
class Corpus:
    """The standard-library source files, split into train and validation texts."""

    root: Path
    """The stdlib directory the files were read from."""
    train_paths: list[str]
    """Relative paths of the training files, sorted."""
    val_paths: list[str]
    """Relative paths of the held-out validation files, sorted."""
    train_texts: list[str]
    """Source text of each training file, in ``train_paths`` order."""
    val_texts: list[str]
    """Source text of each validation file, in ``val_paths`` order."""

    @property
    def train_bytes(self) -> int:
        return sum(len(t.encode()) for t in self.train_texts)

    @property
    def val_bytes(self) -> int:
        return sum(len(t.encode()) for t in self.val_texts)


def load_corpus(root: str | Path | None = None) -> Corpus:
    """Read every ``.py`` file under ``root`` (default: this interpreter's stdlib), split it."""
    root = Path(root or sysconfig.get_paths()["stdlib"])
    split: dict[bool, tuple[list[str], list[str]]] = {False: ([], []), True: ([], [])}
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root)
        if EXCLUDED_DIRS & set(rel.parts[:-1]):
            continue
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        if not text.strip():
            continue
        is_val = zlib.crc32(rel.as_posix().encode()) % VAL_MODULUS == 0
        split[is_val][0].append(rel.as_posix())
        split[is_val][1].append(text)
    (train_paths, train_texts), (val_paths, val_texts) = split[False], split[True]
    if not train_texts or not val_texts:
        counts = f"train {len(train_texts)}, val {len(val_texts)}"
        raise ValueError(f"no usable .py files ({counts}) under {root}")
    return Corpus(root, train_paths, val_paths, train_texts, val_texts)


def train_tokenizer(texts: Sequence[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """Byte-level BPE over ``texts``: ``<s>``=0, ``</s>``=1, ``<pad>``=2, 256 bytes, merges.

    Nothing is added on ``encode``; the chat template writes ``<s>``/``</s>`` itself.
    """
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        clean_up_tokenization_spaces=False,
        chat_template=CHAT_TEMPLATE,
    )


def encode_stream(tok: PreTrainedTokenizerFast, texts: Sequence[str]) -> torch.Tensor:
    """Concatenate ``texts`` as ``tokens </s> tokens </s> ...`` -> int64 ``[N]``."""
    ids: list[int] = []
    for enc in tok.backend_tokenizer.encode_batch(list(texts), add_special_tokens=False):
        ids.extend(enc.ids)
        ids.append(tok.eos_token_id)
    return torch.tensor(ids, dtype=torch.long)


def random_batch(
    stream: torch.Tensor, batch: int, context: int, gen: torch.Generator
) -> torch.Tensor:
    """``batch`` windows of ``context`` tokens at offsets drawn from ``gen`` -> ``[B, T]``."""
    starts = torch.randint(0, len(stream) - context + 1, (batch,), generator=gen)
    return torch.stack([stream[s : s + context] for s in starts.tolist()])


def fixed_windows(stream: torch.Tensor, count: int, context: int) -> torch.Tensor:
    """Up to ``count`` non-overlapping windows spread evenly over ``stream`` -> ``[n, T]``."""
    n_windows = len(stream) // context
    if n_windows == 0:
        raise ValueError(f"stream of {len(stream)} tokens is shorter than context {context}")
    picks = torch.linspace(0, n_windows - 1, min(count, n_windows)).round().long().unique()
    return torch.stack([stream[i * context : (i + 1) * context] for i in picks.tolist()])


def unigram_cross_entropy(train: torch.Tensor, val: torch.Tensor, vocab_size: int) -> float:
    """Nats/token of ``val`` under the add-one-smoothed unigram distribution of ``train``."""
    counts = torch.bincount(train, minlength=vocab_size).double() + 1.0
    log_p = counts.log() - math.log(counts.sum().item())
    return -log_p[val].mean().item()


# ---- model card ---------------------------------------------------------------------------------


def render_card(r: dict, command: str) -> str:
    """The model card (``README.md``) for a finished run ``r`` (see ``train_demo.train``)."""
    a, c, tok = r["args"], r["corpus"], r["tok"]
    ppl = lambda nats: f"{math.exp(nats):,.1f}"  # noqa: E731
    tokens_seen = r["steps"] * a.batch * a.context
    history = "\n".join(f"| {step} | {loss:.3f} |" for step, loss in r["history"])
    samples = "\n\n".join(f"Prompt `{p!r}`:\n\n```python\n{text}\n```" for p, text in r["samples"])
    stopped = ""
    if r["steps"] < r["total"]:
        stopped = f" (stopped by the time budget at step {r['steps']} of {r['total']})"
    excluded = ", ".join(f"`{d}`" for d in sorted(EXCLUDED_DIRS))
    minutes = f"{r['train_minutes']:.1f} min of training steps"
    minutes += f", {r['wall_minutes']:.1f} min wall clock"
    return f"""---
library_name: transformers
pipeline_tag: text-generation
tags: [kiln, demo, python, llama]
---

# kiln demo model

A {r["n_params"] / 1e6:.2f}M-parameter `LlamaForCausalLM` trained from scratch on CPU, in
{r["train_minutes"]:.0f} minutes, on the Python standard library's own source. It is kiln's
default model so the quick start prints real (if not always sensible) Python. It is a toy:
expect plausible-looking code that does not do what its names promise.

| | |
|---|---|
| parameters | {r["n_params"]:,} (float32, tied input/output embeddings) |
| training time | {minutes} in all |
| final train loss | {r["train_loss"]:.3f} nats/token (perplexity {ppl(r["train_loss"])}) |
| final validation loss | **{r["val_loss"]:.3f}** nats/token (perplexity {ppl(r["val_loss"])}) |
| unigram baseline | {r["unigram"]:.3f} nats/token (perplexity {ppl(r["unigram"])}) |

The validation loss is {r["unigram"] - r["val_loss"]:.2f} nats/token below the unigram baseline.

## Corpus

Every `.py` file under `sysconfig.get_paths()["stdlib"]` of Python {sys.version.split()[0]},
read in sorted path order, skipping directories named {excluded}
(tests, installed packages, caches, and two generated-data packages: codec tables and pydoc's
help-text dump). A file is held out for validation when `crc32(relative path) % {VAL_MODULUS} == 0`:

* train: {len(c.train_paths)} files, {c.train_bytes / 1e6:.2f} MB, {r["train_tokens"]:,} tokens
  ({c.train_bytes / r["train_tokens"]:.2f} bytes/token, counting one `</s>` per file)
* validation: {len(c.val_paths)} files, {c.val_bytes / 1e3:.0f} KB, {r["val_tokens"]:,} tokens:
  {", ".join(f"`{p}`" for p in c.val_paths)}

The CPython source is under the PSF License.

## Tokenizer

Byte-level BPE trained with `tokenizers` on the training files: {len(tok)} ids = `<s>` (0, bos),
`</s>` (1, eos), `<pad>` (2), the 256 bytes, and the learned merges. Any string round-trips.
**Encoding adds no special tokens.** The model was trained on the files concatenated as
`file tokens </s> file tokens </s> ...` (no `<s>` anywhere), in random {a.context}-token windows,
so prompt it with plain text and no `<s>`; `</s>` marks the end of a file. The chat template
(`<|user|>` / `<|assistant|>` blocks between `<s>` and `</s>`) exists for API compatibility; the
model never saw it in training.

## Model and training

`LlamaConfig`: hidden {a.hidden}, {a.layers} layers, {a.heads} heads ({a.kv_heads} KV heads),
intermediate {a.intermediate}, context {a.context}, vocab {len(tok)}, default RoPE, tied embeddings.

AdamW (betas 0.9/0.95, weight decay {a.weight_decay} on matrices), peak lr {a.lr:g} after
{a.warmup} warm-up steps, cosine to {a.lr * a.min_lr_ratio:g}; gradient clipping at 1.0; batch
{a.batch} x {a.context} tokens; {r["steps"]} steps{stopped}, {tokens_seen:,} tokens seen
({tokens_seen / r["train_tokens"]:.1f} epochs); {"bfloat16 autocast, " if a.bf16 else ""}float32
weights; seed {a.seed}; {r["machine"]}.

Losses are mean next-token cross-entropy in float32 over fixed, non-overlapping {a.context}-token
windows spread evenly over each split (up to {a.eval_windows} per split). The unigram baseline is
the cross-entropy of the validation tokens under the add-one-smoothed token frequencies of the
training split.

| step | validation loss |
|---|---|
{history}

## Samples (greedy, 96 new tokens)

{samples}

## Reproduce

```
{command}
```

This run was started as `{r["invocation"]}`.

Deterministic given the seed and `--steps` on the same machine and library versions (another
Python version has another standard library).

## Use

```python
from transformers import AutoModelForCausalLM, AutoTokenizer

tok = AutoTokenizer.from_pretrained("models/demo")
model = AutoModelForCausalLM.from_pretrained("models/demo")
ids = tok("def fibonacci(n):", return_tensors="pt").input_ids
print(tok.decode(model.generate(ids, max_new_tokens=64)[0]))
```
"""
