"""What the frontend says when it cannot compile a model: clear errors, never torch internals."""

from __future__ import annotations

import pytest
import torch
import transformers
from safetensors.torch import save_file

import kiln
from kiln.errors import CheckpointError, KilnError, UnsupportedOpError
from kiln.frontend.aten import TABLE
from kiln.models.tokenizer import build_tokenizer


def test_unknown_aten_op_names_op_and_model(checkpoint, tmp_path, monkeypatch):
    monkeypatch.delitem(TABLE, "silu")
    with pytest.raises(UnsupportedOpError) as e:
        kiln.compile(checkpoint("llama"), tmp_path / "a")
    msg = str(e.value)
    assert "'silu'" in msg and "'llama'" in msg and "frontend/aten" in msg
    assert not (tmp_path / "a").exists()


def _save(config, path):
    model = transformers.AutoModelForCausalLM.from_config(config)
    model.save_pretrained(path)
    build_tokenizer(path)
    return path


def test_model_with_its_own_attention_is_rejected(tmp_path):
    src = _save(transformers.BloomConfig(vocab_size=256, hidden_size=32, n_layer=1, n_head=2), tmp_path / "bloom")
    with pytest.raises(UnsupportedOpError, match="'bloom'.*own modeling code"):
        kiln.compile(src, tmp_path / "a")


def test_non_causal_model_type_is_rejected(tmp_path):
    cfg = transformers.T5Config(vocab_size=256, d_model=32, d_ff=64, num_layers=1, num_heads=2, d_kv=16)
    src = _save_config_only(cfg, tmp_path / "t5")
    with pytest.raises(UnsupportedOpError, match="'t5'.*decoder-only"):
        kiln.compile(src, tmp_path / "a")


def _save_config_only(config, path):
    path.mkdir()
    config.save_pretrained(path)
    save_file({"unused": torch.zeros(1)}, path / "model.safetensors")
    return path


def test_missing_config(tmp_path):
    with pytest.raises(CheckpointError, match="config.json"):
        kiln.compile(tmp_path, tmp_path / "a")


def test_pickle_only_checkpoint(checkpoint, tmp_path):
    src = tmp_path / "ck"
    src.mkdir()
    (src / "config.json").write_text((checkpoint("llama") / "config.json").read_text())
    (src / "pytorch_model.bin").write_bytes(b"\0")
    with pytest.raises(CheckpointError, match="never unpickles"):
        kiln.compile(src, tmp_path / "a")


def test_missing_tensor(checkpoint, tmp_path):
    import shutil

    from safetensors.torch import load_file

    src = tmp_path / "ck"
    shutil.copytree(checkpoint("llama"), src)
    tensors = load_file(src / "model.safetensors")
    del tensors["model.norm.weight"]
    save_file(tensors, src / "model.safetensors")
    with pytest.raises(Exception, match="model.norm.weight"):
        kiln.compile(src, tmp_path / "a")


def test_bad_dtype_and_target(checkpoint, tmp_path):
    with pytest.raises(ValueError, match="float32"):
        kiln.compile(checkpoint("llama"), tmp_path / "a", dtype="int8")
    with pytest.raises(KilnError, match="reference"):
        kiln.compile(checkpoint("llama"), tmp_path / "a", target="tpu")
