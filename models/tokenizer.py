"""A deterministic byte-level BPE tokenizer for the tiny test checkpoints.

The tokenizer is trained with the ``tokenizers`` library on :data:`CORPUS`, a few paragraphs of
English and Python written below, so it needs no network and always yields the same vocabulary.

Layout of the vocabulary (``vocab_size=256``):

* ids 0, 1, 2: ``<s>`` (bos), ``</s>`` (eos), ``<pad>``;
* the 243 byte values that can occur in UTF-8 text (every byte except 0xC0, 0xC1 and
  0xF5-0xFF, which no valid UTF-8 string contains), so any ``str`` round-trips exactly and
  multi-byte characters split into several byte tokens;
* the remaining ids: BPE merges learned from the corpus (10 of them at ``vocab_size=256``).

No special tokens are added automatically when encoding; the chat template writes ``<s>`` and
``</s>`` itself.
"""

from __future__ import annotations

import os
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

BOS, EOS, PAD = "<s>", "</s>", "<pad>"
BOS_ID, EOS_ID, PAD_ID = 0, 1, 2
SPECIAL_TOKENS = [BOS, EOS, PAD]

# Bytes that never occur in well-formed UTF-8.
_INVALID_UTF8_BYTES = frozenset([0xC0, 0xC1, *range(0xF5, 0x100)])
MIN_VOCAB_SIZE = len(SPECIAL_TOKENS) + 256 - len(_INVALID_UTF8_BYTES)

CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "<|{{ message['role'] }}|>\n{{ message['content'] }}{{ eos_token }}\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)

CORPUS = [
    "The quick brown fox jumps over the lazy dog. A compiler reads a program, builds an "
    "intermediate representation, rewrites it with a series of passes, and finally emits code "
    "for the machine that will run it.",
    "Language models predict the next token from the tokens that came before. Each layer mixes "
    "information across positions with attention and then transforms every position on its own "
    "with a small feed-forward network. The last layer projects back onto the vocabulary.",
    "When the weights are tiny and random, the model says nothing useful, but it still exercises "
    "every kernel: embeddings, normalisation, rotary positions, attention, the gated MLP and the "
    "final projection. That is exactly what a parity test needs.",
    "Caching keys and values lets generation reuse the work done for earlier tokens. Paged caches "
    "split that memory into fixed-size blocks so that many requests can share one pool.",
    "def greet(name: str) -> str:\n"
    '    """Return a friendly greeting."""\n'
    '    return f"Hello, {name}!"\n',
    "class Counter:\n"
    "    def __init__(self) -> None:\n"
    "        self.count = 0\n"
    "\n"
    "    def increment(self, step: int = 1) -> int:\n"
    "        self.count += step\n"
    "        return self.count\n",
    "def softmax(xs: list[float]) -> list[float]:\n"
    "    m = max(xs)\n"
    "    exps = [math.exp(x - m) for x in xs]\n"
    "    total = sum(exps)\n"
    "    return [e / total for e in exps]\n",
    "for i in range(10):\n"
    "    if i % 2 == 0:\n"
    "        print(i, 'is even')\n"
    "    else:\n"
    "        print(i, 'is odd')\n",
]


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map from byte values to printable unicode characters."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1)]
    printable += list(range(ord("®"), ord("ÿ") + 1))
    mapping = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in mapping:
            mapping[b] = chr(256 + extra)
            extra += 1
    return mapping


def _utf8_alphabet() -> list[str]:
    """The byte-level characters of every byte that can appear in UTF-8 text."""
    table = _bytes_to_unicode()
    return [table[b] for b in range(256) if b not in _INVALID_UTF8_BYTES]


def train_tokenizer(vocab_size: int = 256) -> Tokenizer:
    """Train the byte-level BPE on :data:`CORPUS` and return the raw ``tokenizers.Tokenizer``."""
    if vocab_size < MIN_VOCAB_SIZE:
        raise ValueError(f"vocab_size must be at least {MIN_VOCAB_SIZE}, got {vocab_size}")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=_utf8_alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS, trainer=trainer)
    for token, expected in zip(SPECIAL_TOKENS, (BOS_ID, EOS_ID, PAD_ID), strict=True):
        assert tok.token_to_id(token) == expected, (token, tok.token_to_id(token))
    assert tok.get_vocab_size() <= vocab_size
    return tok


def build_tokenizer(
    out_dir: str | os.PathLike[str], vocab_size: int = 256
) -> PreTrainedTokenizerFast:
    """Train the tiny byte-level tokenizer, save it to ``out_dir`` and return it.

    ``AutoTokenizer.from_pretrained(out_dir)`` loads the result offline. The tokenizer's vocabulary
    never exceeds ``vocab_size`` (it may be smaller if the corpus runs out of merges), so every id
    is valid for a model config with ``vocab_size`` rows.
    """
    hf_tok = PreTrainedTokenizerFast(
        tokenizer_object=train_tokenizer(vocab_size),
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        model_max_length=256,
        clean_up_tokenization_spaces=False,
        chat_template=CHAT_TEMPLATE,
    )
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    hf_tok.save_pretrained(out)
    return hf_tok
