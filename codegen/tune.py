"""`kiln tune ARTIFACT`: fit an artifact's compiled kernels to the machine it runs on.

cuda: builds the artifact's Triton kernels on this GPU (kiln.codegen.cuda.build) and stores them
in it, replacing kernels built for another GPU or Triton version; the search over kernel configs
per shape bucket (tuning.json) is not built yet. reference: nothing to tune. cpu: not built yet.
"""

from __future__ import annotations

import json
from pathlib import Path

from kiln.errors import KilnError
from kiln.runtime.artifact import read_manifest


def tune(artifact: str | Path) -> dict:
    """Tune the artifact in place for this machine; returns what was done (printable JSON)."""
    target = read_manifest(artifact).get("target")
    if target == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise KilnError(f"'{artifact}' is a cuda artifact: tune it on the GPU that will serve it (no CUDA GPU here)")
        from kiln.codegen.cuda.build import build_kernels

        return {"target": target, "kernels": build_kernels(artifact)}
    if target == "reference":
        return {"target": target, "note": "the reference target runs torch references: nothing to tune"}
    raise KilnError(f"kiln tune does not support target '{target}' yet")


def main_text(artifact: str | Path) -> str:
    """What `kiln tune` prints."""
    return json.dumps(tune(artifact), indent=1)
