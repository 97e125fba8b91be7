"""Loading an artifact's safetensors weights onto a device."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors import safe_open

from kiln.errors import ArtifactError


def load_weights(files: list[Path], names: set[str], device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """The named tensors from the artifact's weight files; ArtifactError for a corrupt file or
    a weight the plan needs that no file holds."""
    out: dict[str, torch.Tensor] = {}
    for f in files:
        try:
            with safe_open(f, framework="pt", device=str(device)) as h:
                for k in h.keys():
                    if k in names:
                        out[k] = h.get_tensor(k)
        except ArtifactError:
            raise
        except Exception as e:
            raise ArtifactError(f"weight file '{f}' is corrupt or unreadable ({e}); recompile the artifact") from None
    missing = names - out.keys()
    if missing:
        raise ArtifactError(f"weights {sorted(missing)[:5]} are in no file under {files[0].parent if files else '?'}")
    return out
