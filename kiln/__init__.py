"""kiln: compile Hugging Face decoders into artifacts and serve them."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

__version__ = "0.1.0"

if TYPE_CHECKING:
    from kiln.runtime.model import CompiledModel

_LAZY = {
    "LLM": "kiln.runtime.llm",
    "SamplingParams": "kiln.runtime.sampling_params",
    "RequestOutput": "kiln.runtime.outputs",
    "CompletionOutput": "kiln.runtime.outputs",
    "LLMEngine": "kiln.runtime.engine",
    "LoRARequest": "kiln.runtime.lora",
}
__all__ = ["compile", "load_artifact", *_LAZY]


def __getattr__(name: str):
    # The public runtime classes, imported on first use so `import kiln` stays light.
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'kiln' has no attribute '{name}'")


def compile(model_dir: str | Path, out_dir: str | Path, target: str = "reference", dtype: str = "float32",
            **kwargs) -> Path:
    """Compile a checkpoint directory into an artifact (see kiln.compile_model.compile for options)."""
    from kiln.compile_model import compile as _compile

    return _compile(model_dir, out_dir, target=target, dtype=dtype, **kwargs)


def load_artifact(path: str | Path, device: str = "cpu", verify: bool = True) -> CompiledModel:
    """Load an artifact; `.forward(input_ids, position_ids, seq_lens)` gives logits for all rows.
    `verify=False` skips checking each file's content hash against the manifest."""
    from kiln.runtime.model import CompiledModel

    return CompiledModel(path, device=device, verify=verify)
