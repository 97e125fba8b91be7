"""Reading a Hugging Face checkpoint directory: config, tokenizer files, lazy weights."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from transformers import AutoConfig, PretrainedConfig

from kiln.errors import CheckpointError

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
)


@dataclass
class Checkpoint:
    """A checkpoint directory and what it holds; weights are opened, never read, here."""

    path: Path
    config: PretrainedConfig
    weight_files: list[Path]
    """safetensors files, in index order."""
    key_to_file: dict[str, Path]
    """Every tensor name in the checkpoint -> the file that holds it."""
    tokenizer_files: list[Path] = field(default_factory=list)
    generation_config: Path | None = None

    @property
    def model_type(self) -> str:
        return self.config.model_type

    @property
    def source_files(self) -> list[Path]:
        """config.json and every weight file: what the artifact records hashes of."""
        return [self.path / "config.json", *self.weight_files]

    def read(self, key: str) -> torch.Tensor:
        """One tensor as stored (dtype untouched)."""
        with safe_open(self.key_to_file[key], framework="pt") as f:
            return f.get_tensor(key)


def load_checkpoint(model_dir: str | Path) -> Checkpoint:
    """Open a checkpoint directory; CheckpointError says what is missing or malformed."""
    path = Path(model_dir)
    if not path.is_dir():
        raise CheckpointError(f"model directory '{path}' does not exist")
    if not (path / "config.json").is_file():
        raise CheckpointError(f"'{path}' has no config.json: is it a Hugging Face checkpoint directory?")
    try:
        config = AutoConfig.from_pretrained(path, local_files_only=True)
    except Exception as e:  # transformers raises several types for unknown or broken configs
        raise CheckpointError(f"cannot read {path / 'config.json'}: {e}") from None
    index = path / "model.safetensors.index.json"
    if index.is_file():
        weight_map: dict[str, str] = json.loads(index.read_text())["weight_map"]
        files = sorted({path / f for f in weight_map.values()})
    else:
        files = sorted(path.glob("*.safetensors"))
        if not files:
            bins = list(path.glob("*.bin")) + list(path.glob("*.pt"))
            hint = " (only pickle files found: convert them to safetensors; kiln never unpickles)" if bins else ""
            raise CheckpointError(f"'{path}' has no .safetensors weights{hint}")
    key_to_file: dict[str, Path] = {}
    for f in files:
        if not f.is_file():
            raise CheckpointError(f"weight file '{f}' named in {index.name} is missing")
        try:
            with safe_open(f, framework="pt") as h:
                for k in h.keys():
                    key_to_file[k] = f
        except Exception as e:
            raise CheckpointError(f"cannot read weight file '{f}': {e}") from None
    tok = [path / n for n in TOKENIZER_FILES if (path / n).is_file()]
    gen = path / "generation_config.json"
    return Checkpoint(path, config, files, key_to_file, tok, gen if gen.is_file() else None)
