"""kiln.compile: checkpoint -> artifact (frontend -> passes -> codegen -> artifact)."""

from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path

from tqdm.auto import tqdm

import kiln
from kiln.codegen.artifact_writer import write_artifact
from kiln.codegen.fold_weights import fold_weights
from kiln.codegen.targets import MODEL_DTYPES, get_lowering
from kiln.frontend import import_model
from kiln.ir.ops.kernels import LONG_ROPE_META
from kiln.ir.types import torch_dtype
from kiln.ir.verifier import verify
from kiln.passes import PassManager, get_pass, resolve_pipeline
from kiln.runtime.artifact import TOKENIZER_DIR, sha256_file


def compile(
    model_dir: str | Path,
    out_dir: str | Path,
    target: str = "reference",
    dtype: str = "float32",
    passes: str | None = None,
    dump_ir: str | Path | None = None,
    verify_passes: bool = False,
    overwrite: bool = False,
) -> Path:
    """Compile a Hugging Face checkpoint directory into an artifact directory.

    `passes` edits the target's pipeline ("+name,-name") or replaces it ("a,b,c"); `dump_ir`
    writes the IR after each pass; `verify_passes` runs each pass's output against its input
    on random inputs and raises VerifyError on a mismatch.
    """
    if dtype not in MODEL_DTYPES:
        raise ValueError(f"dtype '{dtype}' is not supported; accepted: {', '.join(MODEL_DTYPES)}")
    out = Path(out_dir)
    if out.exists() and not overwrite:
        raise FileExistsError(f"output '{out}' exists; remove it or pass overwrite=True (--force)")
    lower = get_lowering(target)
    names = resolve_pipeline(target, passes)
    started = time.time()
    stages = tqdm(total=4, desc="compile: trace", unit="stage", leave=False, disable=None)
    imported = import_model(str(model_dir), torch_dtype(dtype))
    stages.update()
    stages.set_description("compile: passes")
    pm = PassManager(
        [get_pass(n) for n in names],
        dump_dir=Path(dump_ir) if dump_ir else None,
        check_numerics=verify_passes,
        weights=imported.weights,
    )
    graph = pm.run(imported.graph)
    stages.update()
    stages.set_description("compile: lower")
    graph, folded = fold_weights(graph, imported.weights)
    verify(graph)
    lowered = lower(graph)
    stages.update()
    stages.set_description("compile: write artifact")
    sources = {
        n.name: folded.get(n.name) or (lambda n=n: imported.weights(n.name, n.type)) for n in graph.params
    }
    ckpt = imported.checkpoint
    copies = {f"{TOKENIZER_DIR}/{f.name}": f for f in ckpt.tokenizer_files}
    copies["config.json"] = ckpt.path / "config.json"
    if ckpt.generation_config is not None:
        copies["generation_config.json"] = ckpt.generation_config
    manifest = {
        "kiln_version": kiln.__version__,
        "target": target,
        "dtype": dtype,
        "model": {
            **{k: graph.meta.get(k) for k in ("model_type", "architectures", "vocab_size", "max_position_embeddings")},
            # longrope: a sequence longer than this runs on the long factors (the engine recomputes it)
            "long_rope_after": next((e["long_after"] for e in graph.meta.get(LONG_ROPE_META, [])), None),
        },
        "source": {"path": str(Path(model_dir).resolve()), "sha256": {f.name: sha256_file(f) for f in ckpt.source_files}},
        "pipeline": names,
        "passes": pm.report,
        "compile_seconds": None,
    }
    staging = Path(tempfile.mkdtemp(prefix=".kiln-", dir=out.parent if out.parent.exists() else None))
    try:
        manifest["compile_seconds"] = round(time.time() - started, 2)
        write_artifact(staging / "a", graph, lowered, sources, copies, manifest)
        if out.exists():
            shutil.rmtree(out)
        out.parent.mkdir(parents=True, exist_ok=True)
        (staging / "a").rename(out)
        stages.update()
    finally:
        stages.close()
        shutil.rmtree(staging, ignore_errors=True)
    return out
