"""Writing an artifact directory (layout and manifest in kiln.runtime.artifact)."""

from __future__ import annotations

import json
import shutil
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from tqdm.auto import tqdm

from kiln.codegen.lowering import LoweredModule
from kiln.ir.graph import Graph
from kiln.ir.serialize import dumps
from kiln.runtime.artifact import (
    FORMAT_VERSION,
    GRAPH,
    HASH_ALGORITHM,
    MANIFEST,
    PLAN,
    WEIGHTS_DIR,
    hash_file,
)

SHARD_BYTES = 1 << 30


def write_weights(root: Path, sources: dict[str, Callable[[], torch.Tensor]], shard_bytes: int = SHARD_BYTES) -> list[str]:
    """Materialize each weight once and write safetensors shards of about shard_bytes."""
    (root / WEIGHTS_DIR).mkdir(parents=True)
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name in tqdm(sorted(sources), desc="write weights", unit="tensor", leave=False, disable=None):
        t = sources[name]().contiguous()
        if size and size + t.nbytes > shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += t.nbytes
    files = []
    for i, shard in enumerate(shards):
        rel = f"{WEIGHTS_DIR}/model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, root / rel, metadata={"format": "pt"})
        files.append(rel)
    return files


def write_artifact(
    root: Path,
    graph: Graph,
    lowered: LoweredModule,
    weights: dict[str, Callable[[], torch.Tensor]],
    copy_files: dict[str, Path],
    manifest: dict[str, Any],
) -> None:
    """Everything into `root` (which must not exist yet); the manifest goes last, listing every
    file with its size and content hash (xxh3-128, named in `hash_algorithm`), so a partial directory is never a valid artifact. The
    lowering's files (compiled kernels, tuning.json) are stored and hashed like the rest, and
    its fallbacks recorded."""
    plan = lowered.plan
    root.mkdir(parents=True)
    (root / GRAPH).write_text(dumps(graph))
    (root / PLAN).write_text(json.dumps(plan.to_dict()))
    rels = [GRAPH, PLAN]
    for rel, data in sorted(lowered.files.items()):
        if rel in (GRAPH, PLAN, MANIFEST) or Path(rel).is_absolute() or ".." in Path(rel).parts:
            raise ValueError(f"a lowering may not write '{rel}'")
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
        rels.append(rel)
    rels += write_weights(root, weights)
    for rel, src in copy_files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, root / rel)
        rels.append(rel)
    params = {n.name: n for n in graph.params}
    nbytes = sum(n.type.itemsize * n.type.numel() for n in params.values())
    manifest = {
        "format_version": FORMAT_VERSION,
        **manifest,
        "hash_algorithm": HASH_ALGORITHM,
        "fallbacks": list(lowered.fallbacks),
        "ops": dict(Counter(s.kernel for s in plan.steps).most_common()),
        "parameters": {"tensors": len(params), "elements": sum(n.type.numel() for n in params.values()), "bytes": nbytes},
        "files": {rel: {"size": (root / rel).stat().st_size, "hash": hash_file(root / rel)} for rel in rels},
    }
    (root / MANIFEST).write_text(json.dumps(manifest, indent=1))


def replace_files(root: Path, files: dict[str, bytes], prefixes: tuple[str, ...]) -> None:
    """Replace every listed file under `prefixes` (folders or exact paths) of the artifact at
    `root` by `files` (artifact-relative path -> contents), and rewrite the manifest's index
    (sizes and hashes): the rebuilt kernels of `kiln tune` and the cuda target's build."""
    manifest = json.loads((root / MANIFEST).read_text())
    listed: dict[str, Any] = manifest["files"]

    def under(rel: str) -> bool:
        return any(rel == p or rel.startswith(p.rstrip("/") + "/") for p in prefixes)

    for rel in [r for r in listed if under(r)]:
        (root / rel).unlink(missing_ok=True)
        del listed[rel]
    for rel, data in sorted(files.items()):
        if not under(rel) or Path(rel).is_absolute() or ".." in Path(rel).parts:
            raise ValueError(f"'{rel}' is not under {prefixes}")
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
        listed[rel] = {"size": len(data), "hash": hash_file(root / rel)}
    tmp = root / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=1))
    tmp.replace(root / MANIFEST)
