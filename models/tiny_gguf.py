"""Write a tiny llama checkpoint as a GGUF file, the way llama.cpp's converter does, for tests.

``write_gguf(ckpt_dir, path, quant)`` takes a checkpoint from :func:`build_checkpoint("llama")`
and writes llama.cpp's metadata keys, its tensor names, q/k rows permuted for its rope, the
byte-level BPE vocabulary with merges and the chat template, and each tensor in the GGML type
that the first matching pattern of ``quant`` names (blocks made with ``gguf.quants.quantize``).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from gguf import GGML_QUANT_SIZES, MODEL_ARCH, GGMLQuantizationType, GGUFWriter, get_tensor_name_map
from gguf.quants import quantize
from safetensors.numpy import load_file
from transformers import AutoConfig

Q = GGMLQuantizationType

DEFAULT_QUANT: dict[str, GGMLQuantizationType] = {
    "attn_q.": Q.Q8_0,
    "attn_k.": Q.Q4_0,
    "attn_v.": Q.F16,
    "attn_output.": Q.Q8_0,
    "ffn_gate.": Q.Q4_1,
    "ffn_up.": Q.Q4_1,
    "ffn_down.": Q.Q4_0,
    "output.": Q.Q8_0,
    "": Q.F32,  # embeddings and norms
}
"""Pattern (a substring of the GGUF tensor name) -> GGML type; the first match wins."""


def llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's row order for q/k weights (its rope rotates interleaved pairs)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _encode(w: np.ndarray, qtype: GGMLQuantizationType) -> np.ndarray:
    if qtype == Q.F32:
        return w.astype(np.float32)
    if qtype == Q.F16:
        return w.astype(np.float16)
    try:
        return quantize(w.astype(np.float32), qtype)
    except NotImplementedError:  # a type gguf cannot make (Q8_1, ...): zero blocks, for refusal tests
        block, nbytes = GGML_QUANT_SIZES[qtype]
        return np.zeros((*w.shape[:-1], w.shape[-1] // block * nbytes), dtype=np.uint8)


def write_gguf(ckpt_dir: str | Path, path: str | Path,
               quant: dict[str, GGMLQuantizationType] | None = None, arch: str = "llama") -> Path:
    """Write the llama checkpoint in ``ckpt_dir`` as the GGUF file ``path``. ``arch`` is the
    ``general.architecture`` written (tests give an unknown one to see it refused)."""
    ckpt, path = Path(ckpt_dir), Path(path)
    cfg = AutoConfig.from_pretrained(ckpt)
    quant = DEFAULT_QUANT if quant is None else quant
    path.parent.mkdir(parents=True, exist_ok=True)
    w = GGUFWriter(str(path), arch)
    w.add_name("tiny-llama")
    w.add_block_count(cfg.num_hidden_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_rope_freq_base(cfg.rope_parameters["rope_theta"])
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_rope_dimension_count(cfg.head_dim)
    w.add_vocab_size(cfg.vocab_size)
    w.add_file_type(1)

    tok = json.loads((ckpt / "tokenizer.json").read_text())
    vocab = {**tok["model"]["vocab"], **{t["content"]: t["id"] for t in tok["added_tokens"]}}
    tokens = [""] * cfg.vocab_size
    for text, i in vocab.items():
        tokens[i] = text
    # Ids the tokenizer does not use: unreachable placeholders, as llama.cpp writes them.
    types = [1] * cfg.vocab_size
    for i, t in enumerate(tokens):
        if not t:
            tokens[i], types[i] = f"[PAD{i}]", 5
    for t in tok["added_tokens"]:
        types[t["id"]] = 3
    merges = [m if isinstance(m, str) else " ".join(m) for m in tok["model"]["merges"]]
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    w.add_bos_token_id(cfg.bos_token_id)
    w.add_eos_token_id(cfg.eos_token_id)
    w.add_pad_token_id(cfg.pad_token_id)
    w.add_add_bos_token(False)
    tcfg = json.loads((ckpt / "tokenizer_config.json").read_text())
    template = tcfg.get("chat_template")
    if template is None and (ckpt / "chat_template.jinja").is_file():
        template = (ckpt / "chat_template.jinja").read_text()
    if template is not None:
        w.add_chat_template(template)

    names = get_tensor_name_map(MODEL_ARCH.LLAMA, cfg.num_hidden_layers)
    for hf_name, t in load_file(ckpt / "model.safetensors").items():
        base, suffix = hf_name.rsplit(".", 1)
        name = f"{names.get_name(base)}.{suffix}"
        if ".attn_q." in name:
            t = llama_cpp_permute(t, cfg.num_attention_heads)
        elif ".attn_k." in name:
            t = llama_cpp_permute(t, cfg.num_key_value_heads)
        qtype = next(q for pattern, q in quant.items() if pattern in name)
        if t.ndim == 1:
            qtype = Q.F32
        data = _encode(t, qtype)
        w.add_tensor(name, data, raw_dtype=qtype if qtype not in (Q.F32, Q.F16) else None)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path
