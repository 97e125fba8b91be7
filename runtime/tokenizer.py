"""The artifact's tokenizer, loaded with the `tokenizers` library (no transformers models)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from kiln.errors import ArtifactError


class Tokenizer:
    """Encode/decode plus the special ids generation needs (EOS from generation_config too)."""

    def __init__(self, artifact: str | Path):
        root = Path(artifact)
        tdir = root / "tokenizer"
        self.config: dict[str, Any] = _read(tdir / "tokenizer_config.json")
        self._single: dict[tuple[int, bool], str] = {}
        if (tdir / "tokenizer.json").is_file():
            from tokenizers import Tokenizer as _Fast

            self._tok = _Fast.from_file(str(tdir / "tokenizer.json"))
            self._hf = None
        elif tdir.is_dir() and any(tdir.iterdir()):
            from transformers import AutoTokenizer

            self._hf = AutoTokenizer.from_pretrained(tdir)
            self._tok = None
        else:
            raise ArtifactError(f"artifact '{root}' has no tokenizer files under {tdir}")
        self._decode = self._tok.decode if self._tok is not None else self._hf.decode
        gen = _read(root / "generation_config.json")
        model_cfg = _read(root / "config.json")
        eos: Any = gen.get("eos_token_id", model_cfg.get("eos_token_id"))
        if eos is None and isinstance(self.config.get("eos_token"), str):
            eos = self.token_to_id(self.config["eos_token"])
        self.eos_token_ids: list[int] = [e for e in (eos if isinstance(eos, list) else [eos]) if e is not None]
        self.chat_template: str | None = self.config.get("chat_template")
        if self.chat_template is None and (tdir / "chat_template.jinja").is_file():
            self.chat_template = (tdir / "chat_template.jinja").read_text()

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token) if self._tok else self._hf.convert_tokens_to_ids(token)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of text (special tokens added as the tokenizer's post-processor says)."""
        if self._tok is not None:
            return self._tok.encode(text, add_special_tokens=add_special_tokens).ids
        return self._hf.encode(text, add_special_tokens=add_special_tokens)

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        """Text of token ids. One token's text is remembered: the incremental detokenizer
        decodes a one-token context window for every generated token."""
        if len(ids) == 1:
            key = (ids[0], skip_special_tokens)
            text = self._single.get(key)
            if text is None:
                text = self._single[key] = self._decode(ids, skip_special_tokens=skip_special_tokens)
            return text
        return self._decode(ids, skip_special_tokens=skip_special_tokens)


def _read(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ArtifactError(f"'{path}' is not valid JSON ({e})") from None
