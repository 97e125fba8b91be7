"""The compile driver's side of `--quantize` / `--calibration`: checks at the API boundary, the
calibration text tokenized with the checkpoint's tokenizer, AWQ's search (kiln.passes.awq) run
on the imported graph, the quantize-weights pass built with its scales, the manifest record."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

from kiln.errors import KilnError
from kiln.frontend import Imported
from kiln.frontend.checkpoint import Checkpoint
from kiln.ir.graph import Graph
from kiln.passes.quantize_weights import DEFAULT_GROUP_SIZE, METHODS, QuantizeWeights

PASS = "quantize-weights"
CALIBRATION_SEQ_LEN = 512
"""Tokens per calibration sequence (less when the model's context is shorter)."""
CALIBRATION_MAX_TOKENS = 65536
"""Calibration tokens used at most (the text's first ones)."""


@dataclass(frozen=True)
class QuantizeRequest:
    """What compile(quantize=..., calibration=...) asked for, checked."""

    method: str
    """int8 | fp8 | int4."""
    calibration: Path | None = None
    """The calibration text file (int4 only)."""
    text: str = ""
    """Its content."""
    group_size: int = DEFAULT_GROUP_SIZE
    """int4's group of input channels."""
    lm_head: bool = False
    """Whether the LM head is quantized too."""


def check_request(quantize: str | None, calibration: str | Path | None,
                  lm_head: bool = False) -> QuantizeRequest | None:
    """The checked request, None for no quantization; ValueError / FileNotFoundError naming what
    is wrong: an unknown method, a calibration file without int4, a missing or empty file."""
    if quantize is None:
        if calibration is not None:
            raise ValueError("--calibration needs --quantize int4 (AWQ scales are for int4 weights)")
        if lm_head:
            raise ValueError("--quantize-lm-head needs --quantize")
        return None
    if quantize not in METHODS:
        raise ValueError(f"unknown --quantize value {quantize!r}; accepted: {', '.join(METHODS)}")
    if calibration is None:
        return QuantizeRequest(quantize, lm_head=lm_head)
    if quantize != "int4":
        raise ValueError(f"--calibration applies to --quantize int4 only (AWQ scales), not {quantize}")
    path = Path(calibration)
    if not path.is_file():
        raise FileNotFoundError(f"calibration file '{path}' does not exist")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"calibration file '{path}' is not UTF-8 text ({e})") from None
    if not text.strip():
        raise ValueError(f"calibration file '{path}' is empty; give it text like the model's inputs")
    return QuantizeRequest(quantize, path, text, lm_head=lm_head)


def check_not_quantized(ckpt: Checkpoint) -> None:
    """ValueError when the checkpoint is quantized already: quantization_config in config.json,
    or a GGUF file with quantized tensors (Q4_0, Q8_0, K-quants, ...)."""
    gguf = getattr(ckpt, "gguf", None)
    if gguf is not None:
        kinds = sorted({t.tensor_type.name for t in gguf.reader.tensors} - {"F32", "F16", "BF16"})
        if kinds:
            raise ValueError(f"'{gguf.path}' is already quantized ({', '.join(kinds)} tensors); compile it without "
                             "--quantize, or quantize a float checkpoint")
    qc = getattr(ckpt.config, "quantization_config", None)
    if qc is not None:
        method = qc.get("quant_method") if isinstance(qc, dict) else getattr(qc, "quant_method", None)
        raise ValueError(f"'{ckpt.path}' is already quantized (quant_method {method!r}); compile it without "
                         "--quantize, or quantize its float checkpoint")


def with_quantize_pass(names: list[str]) -> list[str]:
    """The pipeline with quantize-weights before its first fusion (merge-projections or whatever
    follows the normalization passes)."""
    if PASS in names:
        return names
    normalize = ("canonicalize", "cse", "dce")
    at = next((i for i, n in enumerate(names) if n not in normalize), len(names))
    return [*names[:at], PASS, *names[at:]]


def calibration_sequences(ckpt: Checkpoint, text: str, max_len: int) -> list[list[int]]:
    """The calibration text in the checkpoint's tokenizer (tokenizer.json), cut into sequences of
    max_len tokens (at most CALIBRATION_MAX_TOKENS in all)."""
    from tokenizers import Tokenizer

    tj = next((f for f in ckpt.tokenizer_files if f.name == "tokenizer.json"), None)
    if tj is None:
        raise KilnError(f"'{ckpt.path}' has no tokenizer.json: calibration tokenizes the text with it")
    ids = Tokenizer.from_file(str(tj)).encode(text).ids[:CALIBRATION_MAX_TOKENS]
    if not ids:
        raise ValueError("the calibration text gives no tokens")
    return [ids[i : i + max_len] for i in range(0, len(ids), max_len)]


def quantize_pass(request: QuantizeRequest, imported: Imported, ckpt: Checkpoint) -> QuantizeWeights:
    """The quantize-weights pass of the request; with a calibration file its AWQ scales, searched
    on the imported graph (progress bars over the calibration and the search)."""
    if request.calibration is None:
        return QuantizeWeights(method=request.method, group_size=request.group_size, lm_head=request.lm_head)
    from kiln.passes.awq import awq_scales

    limit = imported.graph.meta.get("max_position_embeddings") or CALIBRATION_SEQ_LEN
    seqs = calibration_sequences(ckpt, request.text, min(CALIBRATION_SEQ_LEN, int(limit)))
    scales, _ = awq_scales(imported.graph, imported.weights, seqs, request.group_size, request.lm_head)
    return QuantizeWeights(method=request.method, group_size=request.group_size, act_scales=scales,
                           lm_head=request.lm_head)


def quantization_record(graph: Graph, request: QuantizeRequest) -> dict[str, object]:
    """The manifest's "quantization": the pass's description plus the calibration file's hash."""
    record = dict(graph.meta.get("quantization") or {"method": request.method})
    if request.calibration is not None:
        record["calibration"] = {
            "file": request.calibration.name,
            "sha256": hashlib.sha256(request.calibration.read_bytes()).hexdigest(),
            "algorithm": "AWQ scale search (alpha grid 0..1 step 0.1), round-to-nearest",
        }
    else:
        record["calibration"] = None
    return record
