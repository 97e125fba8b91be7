"""GGUF checkpoints (llama.cpp's single-file format) read as a Hugging Face checkpoint.

`GGUFModel(path)` gives what kiln's frontend needs from a checkpoint directory: the transformers
config (from the file's metadata, by transformers' own GGUF tables), the tokenizer and its chat
template (transformers' GGUF tokenizer converters; saved as ordinary `tokenizer.json` /
`tokenizer_config.json` / `chat_template.jinja`), and each tensor under the name the traced model
gives it, dequantized on demand, one tensor at a time, with the `gguf` package; linear weights in
Q8_0, Q4_0 or Q4_1 blocks are read as their raw rows instead and stay packed
(kiln.models.quant_formats.gguf_blocks).

llama.cpp stores llama-family q/k projections with their rows permuted for its interleaved rope;
transformers' tensor processors undo that (and other per-architecture edits such as Gemma's
norm offset), and kiln reuses them so that its weights equal what
`AutoModelForCausalLM.from_pretrained(dir, gguf_file=...)` loads. The file is memory-mapped:
nothing but the tensor being read is in memory.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from kiln.errors import CheckpointError

# gguf architectures whose transformers tensor processor merges or splits tensors (MoE experts),
# or that kiln refuses anyway (ALiBi, recurrent, encoder-decoder): not read one tensor at a time.
_UNSUPPORTED_ARCHS = {
    "qwen2moe", "qwen3moe", "gpt-oss", "gpt_oss", "minimax-m2", "bloom", "falcon", "t5", "t5encoder",
    "mamba", "lfm2", "qwen35", "qwen35moe",
}


def is_gguf(path: str | Path) -> bool:
    """Whether `path` names a GGUF file (by its magic bytes, whatever its suffix)."""
    p = Path(path)
    if not p.is_file():
        return False
    with open(p, "rb") as f:
        return f.read(4) == b"GGUF"


def supported_archs() -> list[str]:
    """gguf `general.architecture` values kiln reads."""
    from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES

    return sorted(set(GGUF_SUPPORTED_ARCHITECTURES) - _UNSUPPORTED_ARCHS)


def readable_types() -> set:
    """GGML tensor types `gguf.quants.dequantize` turns into floats."""
    from gguf import GGMLQuantizationType as Q
    from gguf import quants

    return {Q.F32, Q.F16, Q.BF16, *getattr(quants, "_type_traits", {})}


class GGUFModel:
    """One GGUF file: its config, tokenizer and tensors under Hugging Face names."""

    def __init__(self, path: str | Path):
        from gguf import GGUFReader

        self.path = Path(path)
        if not is_gguf(self.path):
            raise CheckpointError(f"'{self.path}' is not a GGUF file (no GGUF magic bytes)")
        try:
            self.reader = GGUFReader(self.path)
        except Exception as e:  # the gguf package raises ValueError / struct errors for broken files
            raise CheckpointError(f"cannot read GGUF file '{self.path}': {e}") from None
        field = self.reader.fields.get("general.architecture")
        self.arch: str = field.contents() if field is not None else "<missing general.architecture>"
        if self.arch not in supported_archs():
            raise CheckpointError(
                f"GGUF file '{self.path}' holds architecture '{self.arch}', which kiln cannot import; "
                f"supported GGUF architectures: {', '.join(supported_archs())}"
            )
        readable = readable_types()
        for t in self.reader.tensors:
            if t.tensor_type not in readable:
                raise CheckpointError(
                    f"GGUF file '{self.path}': tensor '{t.name}' has quantization type "
                    f"{t.tensor_type.name}, which kiln cannot dequantize; readable types: "
                    f"{', '.join(sorted(q.name for q in readable))}"
                )
        self.config = self._config()
        self._by_hf_name = self._map_names()
        self._bar: tqdm | None = None

    def _config(self):
        from transformers import AutoConfig

        try:
            return AutoConfig.from_pretrained(self.path.parent, gguf_file=self.path.name, local_files_only=True)
        except Exception as e:  # transformers raises ValueError/OSError/KeyError for what it cannot map
            raise CheckpointError(f"cannot build a transformers config from GGUF file '{self.path}': {e}") from None

    def _map_names(self) -> dict[str, object]:
        """HF parameter name -> the reader's tensor, by transformers' GGUF name table, over the model
        built on the meta device (no weight is allocated)."""
        from transformers import AutoModelForCausalLM
        from transformers.modeling_gguf_pytorch_utils import (
            TENSOR_PROCESSORS,
            TensorProcessor,
            get_gguf_hf_weights_map,
        )

        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(self.config)
        self._processor = TENSOR_PROCESSORS.get(self.arch, TensorProcessor)(config=self.config.to_dict())
        gguf_to_hf = get_gguf_hf_weights_map(model, self._processor)
        out = {}
        for t in self.reader.tensors:
            hf = gguf_to_hf.get(t.name)
            if hf is not None:
                out[hf] = t
        if not out:
            raise CheckpointError(f"GGUF file '{self.path}': no tensor maps to a '{self.config.model_type}' parameter")
        return out

    @property
    def tensor_names(self) -> list[str]:
        """Hugging Face names of the tensors the file holds."""
        return list(self._by_hf_name)

    def read(self, name: str) -> torch.Tensor:
        """The tensor `name` (a Hugging Face name), dequantized to float32."""
        from gguf.quants import dequantize

        t = self._by_hf_name[name]
        w = dequantize(t.data, t.tensor_type)
        w = self._processor.process(weights=w, name=t.name, tensor_key_mapping={}, parsed_parameters={}).weights
        self._tick()
        w = np.ascontiguousarray(w, dtype=np.float32)
        return torch.from_numpy(w if w.flags.writeable else w.copy())  # F32 tensors are read-only memmap views

    def quant_type(self, name: str) -> str:
        """The GGML type name of tensor `name` (Q8_0, Q4_1, F16, ...)."""
        return self._by_hf_name[name].tensor_type.name

    def row_order(self, name: str) -> np.ndarray | None:
        """For a 2-D tensor whose Hugging Face form only reorders the file's rows (llama's q/k
        unpermutation, or nothing), the file row of each Hugging Face row; None when the tensor
        processor does more (a transpose, an offset), so only the dequantized tensor is right.
        Found by running the processor over the row numbers [N, 1]."""
        t = self._by_hf_name[name]
        if t.data.ndim != 2:
            return None
        rows = np.arange(t.data.shape[0], dtype=np.float32)[:, None]
        out = self._processor.process(weights=rows, name=t.name, tensor_key_mapping={}, parsed_parameters={}).weights
        if out.shape != rows.shape or not np.array_equal(np.sort(out[:, 0]), rows[:, 0]):
            return None
        return out[:, 0].astype(np.int64)

    def raw_rows(self, name: str, order: np.ndarray) -> np.ndarray:
        """The stored bytes of tensor `name` as uint8 rows [N, bytes per row] (GGML blocks, not
        dequantized), in `order` (row_order's)."""
        self._tick()
        return np.ascontiguousarray(self._by_hf_name[name].data.view(np.uint8)[order])

    def _tick(self) -> None:
        """One more tensor read, on the progress bar."""
        if self._bar is None:
            self._bar = tqdm(total=len(self._by_hf_name), desc="read GGUF", unit="tensor", disable=None)
        self._bar.update(1)
        if self._bar.n >= self._bar.total:
            self._bar.close()

    def write_files(self, out_dir: str | Path) -> Path:
        """Write config.json, generation_config.json and the tokenizer files into `out_dir`."""
        from transformers import AutoTokenizer

        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        self.config.save_pretrained(out)
        try:
            tok = AutoTokenizer.from_pretrained(self.path.parent, gguf_file=self.path.name, local_files_only=True)
        except Exception as e:
            raise CheckpointError(f"cannot build a tokenizer from GGUF file '{self.path}': {e}") from None
        tok.save_pretrained(out)
        gen = {k: getattr(self.config, k, None) for k in ("bos_token_id", "eos_token_id", "pad_token_id")}
        (out / "generation_config.json").write_text(json.dumps({k: v for k, v in gen.items() if v is not None}))
        return out
