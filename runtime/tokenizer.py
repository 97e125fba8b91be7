"""The artifact's tokenizer, loaded with the `tokenizers` library from `tokenizer/tokenizer.json`.

Nothing from the artifact is ever executed: there is no transformers fallback (whose
`tokenizer_config.json` `auto_map` can name Python code to run), only the fast tokenizer's JSON.
Its files are read through the manifest and hash-checked like every other artifact file.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from kiln.errors import ArtifactError
from kiln.runtime.artifact import TOKENIZER_DIR, Artifact

TOKENIZER_JSON = f"{TOKENIZER_DIR}/tokenizer.json"
TOKENIZER_CONFIG = f"{TOKENIZER_DIR}/tokenizer_config.json"
CHAT_TEMPLATE = f"{TOKENIZER_DIR}/chat_template.jinja"


class Tokenizer:
    """Encode/decode plus the special ids generation needs (EOS from generation_config too)."""

    def __init__(self, artifact: str | Path | Artifact | _Directory, verify: bool = True):
        art = artifact if isinstance(artifact, Artifact | _Directory) else Artifact(artifact, verify=verify)
        root = art.root
        self.config: dict[str, Any] = _object(art, TOKENIZER_CONFIG)
        self._single: dict[tuple[int, bool], str] = {}
        if not art.has(TOKENIZER_JSON):
            raise ArtifactError(
                f"artifact '{root}' has no {TOKENIZER_JSON}: kiln reads only fast tokenizers (tokenizer.json) and "
                "never runs tokenizer code; save the checkpoint's tokenizer as a fast tokenizer "
                "(transformers' AutoTokenizer(...).save_pretrained) and recompile"
            )
        from tokenizers import Tokenizer as _Fast

        try:
            self._tok = _Fast.from_str(art.read_text(TOKENIZER_JSON))
        except ArtifactError:
            raise
        except Exception as e:  # tokenizers raises a bare Exception for a malformed file
            raise ArtifactError(
                f"artifact file '{root / TOKENIZER_JSON}' is not a tokenizer the `tokenizers` library can read "
                f"({e}); recompile the artifact"
            ) from None
        self._decode = self._tok.decode
        gen = _object(art, "generation_config.json")
        model_cfg = _object(art, "config.json")
        eos: Any = gen.get("eos_token_id", model_cfg.get("eos_token_id"))
        if eos is None and isinstance(self.config.get("eos_token"), str):
            eos = self.token_to_id(self.config["eos_token"])
        eos_list = eos if isinstance(eos, list) else [eos]
        if not all(e is None or (isinstance(e, int) and not isinstance(e, bool)) for e in eos_list):
            raise ArtifactError(f"eos_token_id {eos!r} in '{root}' (generation_config.json / config.json) is not a token id")
        self.eos_token_ids: list[int] = [e for e in eos_list if e is not None]
        template = self.config.get("chat_template")
        if template is not None and not isinstance(template, str):
            raise ArtifactError(f"artifact file '{root / TOKENIZER_CONFIG}' has a chat_template that is not a string")
        self.chat_template: str | None = template
        if self.chat_template is None and art.has(CHAT_TEMPLATE):
            self.chat_template = art.read_text(CHAT_TEMPLATE)
        art.verify_rest(skip_prefix=tuple(r for r in art.files if not r.startswith(TOKENIZER_DIR + "/")))

    @classmethod
    def from_directory(cls, path: str | Path) -> Tokenizer:
        """The tokenizer of a directory laid out like an artifact (tokenizer/, config.json,
        generation_config.json) that has no manifest: for tests and tools; nothing is hashed."""
        return cls(_Directory(Path(path)))

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of text (special tokens added as the tokenizer's post-processor says)."""
        return self._tok.encode(text, add_special_tokens=add_special_tokens).ids

    def encode_batch(self, texts: list[str], add_special_tokens: bool = True,
                     limit: int | None = None) -> list[list[int] | int]:
        """Token ids of each text, or just their count when it reaches `limit` (a list of millions
        of ints is then never built). `tokenizers`' batch encoder releases the GIL while it works
        (encode holds it throughout), so a server thread running this leaves the event loop free;
        its fast form tracks no offsets, so freeing the result takes ms, not 0.25 s per 3M tokens."""
        batch = getattr(self._tok, "encode_batch_fast", None) or self._tok.encode_batch
        out: list[list[int] | int] = []
        for e in batch(texts, add_special_tokens=add_special_tokens):
            out.append(len(e) if limit is not None and len(e) >= limit else e.ids)
        return out

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


class _Directory:
    """The part of Artifact's reading interface a tokenizer uses, over a plain directory."""

    def __init__(self, root: Path):
        self.root = root
        self.files: dict[str, dict] = {}

    def has(self, rel: str) -> bool:
        return (self.root / rel).is_file()

    def read_text(self, rel: str) -> str:
        try:
            return (self.root / rel).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise ArtifactError(f"cannot read '{self.root / rel}' as UTF-8 text ({e})") from None

    def read_json(self, rel: str) -> Any:
        try:
            return json.loads(self.read_text(rel))
        except json.JSONDecodeError as e:
            raise ArtifactError(f"'{self.root / rel}' is not valid JSON ({e})") from None

    def verify_rest(self, skip_prefix: tuple[str, ...] = ()) -> None:
        pass


def _object(art: Artifact | _Directory, rel: str) -> dict[str, Any]:
    """A listed JSON object file ({} when the manifest does not list it)."""
    if not art.has(rel):
        return {}
    data = art.read_json(rel)
    if not isinstance(data, dict):
        raise ArtifactError(f"artifact file '{art.root / rel}' is not a JSON object; recompile the artifact")
    return data
