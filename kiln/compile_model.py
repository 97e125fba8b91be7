"""kiln.compile: checkpoint -> artifact (frontend -> passes -> codegen -> artifact)."""

from __future__ import annotations

import logging
import shutil
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

import kiln
from kiln.codegen.artifact_writer import write_artifact
from kiln.codegen.fold_weights import fold_weights
from kiln.codegen.targets import MODEL_DTYPES, get_lowering
from kiln.compile_quantize import (
    QuantizeRequest,
    check_not_quantized,
    check_request,
    quantization_record,
    quantize_pass,
    with_quantize_pass,
)
from kiln.frontend import import_model
from kiln.frontend.checkpoint import TOKENIZER_FILES, Checkpoint, load_checkpoint
from kiln.ir.ops.kernels import LONG_ROPE_META
from kiln.ir.types import torch_dtype
from kiln.ir.verifier import verify
from kiln.models.gguf import GGUFModel
from kiln.models.quantized import load_quantized
from kiln.passes import PassManager, get_pass, resolve_pipeline
from kiln.passes.lora import META as LORA_META
from kiln.passes.lora import Lora, lora_pass, with_lora_pass
from kiln.runtime.artifact import TOKENIZER_DIR, sha256_file

log = logging.getLogger(__name__)


def compile(
    model_dir: str | Path,
    out_dir: str | Path,
    target: str = "reference",
    dtype: str = "float32",
    passes: str | None = None,
    dump_ir: str | Path | None = None,
    verify_passes: bool = False,
    overwrite: bool = False,
    quantize: str | None = None,
    calibration: str | Path | None = None,
    quantize_lm_head: bool = False,
    max_lora_rank: int | None = None,
    lora_targets: Sequence[str] | None = None,
) -> Path:
    """Compile a Hugging Face checkpoint directory (or a GGUF file) into an artifact directory.

    `passes` edits the target's pipeline ("+name,-name") or replaces it ("a,b,c"); `dump_ir`
    writes the IR after each pass; `verify_passes` runs each pass's output against its input
    on random inputs and raises VerifyError on a mismatch. `quantize` (int8 | fp8 | int4) quantizes
    the linear layers (the quantize-weights pass, before the target's fusions); `calibration`, a
    UTF-8 text file, gives int4 AWQ's activation-aware scales (kiln.compile_quantize);
    `quantize_lm_head` quantizes the LM head too (it stays in `dtype` by default).
    `max_lora_rank` adds the lora pass (kiln.passes.lora): the artifact then serves PEFT LoRA
    adapters of rank <= max_lora_rank on the modules `lora_targets` names (default: the
    attention and MLP projections), loaded at run time (`LLM(..., enable_lora=True)`).
    """
    if dtype not in MODEL_DTYPES:
        raise ValueError(f"dtype '{dtype}' is not supported; accepted: {', '.join(MODEL_DTYPES)}")
    out = Path(out_dir)
    if out.exists() and not overwrite:
        raise FileExistsError(f"output '{out}' exists; remove it or pass overwrite=True (--force)")
    get_lowering(target)
    request = check_request(quantize, calibration, quantize_lm_head)
    names = resolve_pipeline(target, passes)
    if request is not None:
        names = with_quantize_pass(names)
    elif "quantize-weights" in names:
        raise ValueError("the quantize-weights pass comes with --quantize int8|fp8|int4 (quantize= in kiln.compile), "
                         "which places it before the fusions; do not name it in --passes")
    lora = lora_pass(max_lora_rank, lora_targets)
    if lora is not None:
        names = with_lora_pass(names)
    elif "lora" in names:
        raise ValueError("the lora pass comes with --max-lora-rank (max_lora_rank= in kiln.compile); do not name it "
                         "in --passes")
    started = time.time()
    with tempfile.TemporaryDirectory(prefix=".kiln-gguf-") as gguf_dir:
        # A file can only be a GGUF checkpoint (GGUFModel says so when it is not one).
        ckpt = open_gguf(model_dir, gguf_dir) if Path(model_dir).is_file() else load_checkpoint(model_dir)
        if request is not None:
            check_not_quantized(ckpt)
        return _compile(ckpt, model_dir, out, target, dtype, names, dump_ir, verify_passes, started, request, lora)


@dataclass
class _GGUFCheckpoint(Checkpoint):
    """A GGUF file seen as a checkpoint: config and tokenizer files written to `path`, tensors
    dequantized from the file one at a time."""

    gguf: GGUFModel | None = None

    @property
    def source_files(self) -> list[Path]:
        return [self.gguf.path]

    def read(self, key: str):
        return self.gguf.read(key)


def open_gguf(path: str | Path, work_dir: str | Path) -> Checkpoint:
    """A GGUF file as a Checkpoint; its config and tokenizer files are written into `work_dir`."""
    model = GGUFModel(path)
    d = model.write_files(work_dir)
    return _GGUFCheckpoint(
        d, model.config, [model.path], dict.fromkeys(model.tensor_names, model.path),
        [d / n for n in TOKENIZER_FILES if (d / n).is_file()], d / "generation_config.json", gguf=model,
    )


def _compile(ckpt: Checkpoint, model_dir, out: Path, target: str, dtype: str, names: list[str],
             dump_ir, verify_passes: bool, started: float, request: QuantizeRequest | None = None,
             lora: Lora | None = None) -> Path:
    lower = get_lowering(target)
    stages = tqdm(total=4, desc="compile: trace", unit="stage", leave=False, disable=None)
    imported = load_quantized(import_model(ckpt, torch_dtype(dtype)))
    stages.update()
    stages.set_description("compile: passes")
    quantizer = quantize_pass(request, imported, ckpt) if request is not None else None
    chosen = {"quantize-weights": quantizer, "lora": lora}
    pm = PassManager(
        [chosen.get(n) or get_pass(n) for n in names],
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
        **({"quantization": quantization_record(graph, request)} if request is not None else {}),
        **({"lora": graph.meta[LORA_META]} if LORA_META in graph.meta else {}),
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
    if target == "cuda":
        _build_cuda_kernels(out)
    return out


def _build_cuda_kernels(out: Path) -> None:
    """Compile the artifact's Triton kernels on this machine's GPU into it (none without one)."""
    if not torch.cuda.is_available():
        log.warning("no CUDA GPU here: '%s' holds no compiled kernels; run `kiln tune %s` on the GPU that "
                    "will serve it", out, out)
        return
    from kiln.codegen.cuda.build import build_kernels

    build_kernels(out)
