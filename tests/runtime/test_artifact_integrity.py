"""Tampered artifacts (issue 9, items 1-5): each attack is built here and must be an ArtifactError
at load naming the file, never a model that loads and serves wrong output or runs code."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import kiln
from kiln.cli import main as kiln_main
from kiln.errors import ArtifactError
from kiln.runtime import artifact as artifact_mod
from kiln.runtime.artifact import ChunkedHash, hash_file, verify_hashes
from kiln.runtime.tokenizer import Tokenizer

WEIGHTS = "weights/model-00001-of-00001.safetensors"


@pytest.fixture
def art(artifact, tmp_path):
    """A private copy of a compiled artifact that a test may damage."""
    dst = tmp_path / "art"
    shutil.copytree(artifact("llama"), dst)
    return dst


def _manifest(art: Path) -> dict:
    return json.loads((art / "manifest.json").read_text())


def _write_manifest(art: Path, m: dict) -> None:
    (art / "manifest.json").write_text(json.dumps(m))


def _relist(art: Path, rel: str) -> None:
    """Record rel's current size and hash in the manifest, as an attacker who edits both would."""
    m = _manifest(art)
    m["files"][rel] = {"size": (art / rel).stat().st_size, "hash": hash_file(art / rel)}
    _write_manifest(art, m)


def _data_offset(path: Path) -> int:
    return 8 + int.from_bytes(path.read_bytes()[:8], "little")


# 1. content hashes ---------------------------------------------------------------------------


def test_flipped_byte_in_tensor_data_is_refused(art):
    f = art / WEIGHTS
    data = bytearray(f.read_bytes())
    data[_data_offset(f) + 1000] ^= 0x01  # inside a tensor: the header still parses
    f.write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match=r"model-00001-of-00001.safetensors' does not match its xxh3_128"):
        kiln.load_artifact(art)
    assert verify_hashes(art) == [WEIGHTS]
    kiln.load_artifact(art, verify=False)  # the opt-out loads it


def test_chunked_hashes_check_every_chunk_in_parallel(art, monkeypatch):
    """The hash is over per-chunk digests, hashed on all cores: with 4 KiB chunks the weight
    file has dozens; streaming (any piece sizes), hash_file and the parallel check agree, and a
    flipped byte in the last chunk is refused."""
    monkeypatch.setattr(artifact_mod, "HASH_CHUNK", 4096)
    f = art / WEIGHTS
    data = f.read_bytes()
    streamed = ChunkedHash()
    for pos in range(0, len(data), 1000):
        streamed.update(data[pos : pos + 1000])
    assert len(streamed.digests) == len(data) // 4096 > 10
    assert streamed.hexdigest() == hash_file(f)
    for rel in _manifest(art)["files"]:  # recorded with 4 KiB chunks
        _relist(art, rel)
    kiln.load_artifact(art)
    flipped = bytearray(data)
    flipped[-2] ^= 0x10
    f.write_bytes(bytes(flipped))
    with pytest.raises(ArtifactError, match=r"model-00001-of-00001.safetensors' does not match"):
        kiln.load_artifact(art)


def test_nan_written_into_a_weight_is_refused(art):
    f = art / WEIGHTS
    data = bytearray(f.read_bytes())
    off = _data_offset(f)
    data[off : off + 4] = bytes(torch.tensor([float("nan")], dtype=torch.float32).view(torch.uint8).tolist())
    f.write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match="does not match"):
        kiln.load_artifact(art)
    with pytest.raises(ArtifactError, match="does not match"):
        kiln.LLM(art)
    kiln.LLM(art, verify=False, num_kv_blocks=8)


@pytest.mark.parametrize("rel", ["plan.json", "graph.json", "config.json", "generation_config.json"])
def test_every_listed_file_is_hashed(art, rel):
    f = art / rel
    text = f.read_text()
    f.write_text(text[:-1] + (" " if text[-1] != " " else "\n"))  # same size, other content
    with pytest.raises(ArtifactError, match=f"{rel}' does not match"):
        kiln.load_artifact(art)


def test_tokenizer_files_are_hashed(art):
    f = art / "tokenizer/tokenizer.json"
    f.write_text(f.read_text().replace('": ', '" :', 1))  # same size, still a valid tokenizer
    kiln.load_artifact(art)  # the model itself does not read the tokenizer
    with pytest.raises(ArtifactError, match="tokenizer.json' does not match"):
        Tokenizer(art)
    with pytest.raises(ArtifactError, match="tokenizer.json' does not match"):
        kiln.LLM(art)
    Tokenizer(art, verify=False)


def test_no_verify_on_the_cli(art, capsys):
    f = art / WEIGHTS
    data = bytearray(f.read_bytes())
    data[-1] ^= 0xFF
    f.write_bytes(bytes(data))
    assert kiln_main(["generate", str(art), "--prompt", "ab", "--max-tokens", "2", "--num-kv-blocks", "8"]) == 2
    assert "does not match" in capsys.readouterr().err
    assert kiln_main(["generate", str(art), "--prompt", "ab", "--max-tokens", "2", "--num-kv-blocks", "8",
                      "--no-verify"]) == 0


def test_an_older_format_is_refused_with_recompile(art):
    m = _manifest(art)
    m["format_version"] = 2
    for info in m["files"].values():
        info["sha256"] = info.pop("hash")
    _write_manifest(art, m)
    with pytest.raises(ArtifactError, match="format version 2.*recompile"):
        kiln.load_artifact(art)


def test_format_3_whole_file_hashes_are_refused_with_recompile(art):
    m = _manifest(art)
    m["format_version"], m["hash_algorithm"] = 3, "xxh3_128"
    _write_manifest(art, m)
    with pytest.raises(ArtifactError, match="format version 3; this kiln reads version 4: recompile"):
        kiln.load_artifact(art)


# 2. exactly the listed weight files ---------------------------------------------------------


def test_an_unlisted_weight_file_is_an_error(art):
    save_file({"lm_head.weight": torch.zeros(8, 8)}, art / "weights/zz-override.safetensors")
    with pytest.raises(ArtifactError, match=r"zz-override.safetensors' is not listed in the manifest"):
        kiln.load_artifact(art)
    assert kiln_main(["inspect", str(art), "--verify"]) == 2


def test_a_second_listed_file_cannot_override_a_weight(art):
    with __import__("safetensors").safe_open(art / WEIGHTS, "pt") as h:
        name = next(iter(h.keys()))
        t = h.get_tensor(name)
    save_file({name: torch.zeros_like(t)}, art / "weights/zz-override.safetensors")
    _relist(art, "weights/zz-override.safetensors")
    with pytest.raises(ArtifactError, match=f"weight '{name}' is in both"):
        kiln.load_artifact(art)


def test_a_manifest_without_files_is_invalid(art):
    m = _manifest(art)
    del m["files"]
    _write_manifest(art, m)
    with pytest.raises(ArtifactError, match="lists no files"):
        kiln.load_artifact(art)
    assert kiln_main(["inspect", str(art), "--verify"]) == 2


def test_a_weight_file_dropped_from_the_list_is_unlisted(art):
    m = _manifest(art)
    del m["files"][WEIGHTS]
    _write_manifest(art, m)
    with pytest.raises(ArtifactError, match="lists no weight files|is not listed"):
        kiln.load_artifact(art)


# 3. paths confined to the artifact -----------------------------------------------------------


@pytest.mark.parametrize("rel", ["../../../../etc/passwd", "/etc/passwd", "weights/../../outside.safetensors"])
def test_paths_outside_the_artifact_are_refused(art, rel, tmp_path):
    outside = Path("/etc/passwd") if "passwd" in rel else (art / rel)
    if not outside.exists():
        outside.write_bytes(b"x" * 16)
    m = _manifest(art)
    m["files"][rel] = {"size": outside.stat().st_size, "hash": hash_file(outside)}
    _write_manifest(art, m)
    with pytest.raises(ArtifactError, match="outside the artifact directory"):
        kiln.load_artifact(art)


def test_a_symlink_pointing_out_is_refused(art, tmp_path):
    real = tmp_path / "elsewhere.safetensors"
    shutil.move(art / WEIGHTS, real)
    os.symlink(real, art / WEIGHTS)
    with pytest.raises(ArtifactError, match="outside the artifact directory"):
        kiln.load_artifact(art)


# 4. no code from the artifact ----------------------------------------------------------------


def test_a_tokenizer_with_remote_code_is_refused_and_never_run(art, tmp_path):
    marker = tmp_path / "pwned"
    tdir = art / "tokenizer"
    (tdir / "tokenizer.json").unlink()
    (tdir / "evil.py").write_text(
        f"open({str(marker)!r}, 'w').write('ran')\n"
        "from transformers import PreTrainedTokenizer\nclass Evil(PreTrainedTokenizer):\n    pass\n"
    )
    (tdir / "tokenizer_config.json").write_text(json.dumps({"auto_map": {"AutoTokenizer": ["evil.Evil", None]}}))
    m = _manifest(art)
    del m["files"]["tokenizer/tokenizer.json"]
    _write_manifest(art, m)
    for rel in ("tokenizer/evil.py", "tokenizer/tokenizer_config.json"):
        _relist(art, rel)
    with pytest.raises(ArtifactError, match="no tokenizer/tokenizer.json.*never runs tokenizer code"):
        kiln.LLM(art)
    assert not marker.exists()


# 5. clear errors for garbage files and bad plans ---------------------------------------------


@pytest.mark.parametrize("rel, content", [
    ("tokenizer/tokenizer.json", b"{ this is not json"),
    ("tokenizer/tokenizer.json", b'{"version": "1.0", "model": {"type": "Nope"}}'),
    ("tokenizer/tokenizer_config.json", b"\xff\xfe garbage"),
    ("tokenizer/tokenizer_config.json", b"[1, 2, 3]"),
])
def test_garbage_tokenizer_files_name_the_file(art, rel, content):
    (art / rel).write_bytes(content)
    _relist(art, rel)  # the hash matches: the content itself must be refused
    with pytest.raises(ArtifactError, match=rel.split("/")[-1]):
        Tokenizer(art)


def _edit_plan(art: Path, edit) -> None:
    plan = json.loads((art / "plan.json").read_text())
    edit(plan)
    (art / "plan.json").write_text(json.dumps(plan))
    _relist(art, "plan.json")


def _first(plan: dict, kernel: str) -> dict:
    return next(s for s in plan["steps"] if s["kernel"] == kernel)


def _first_arena(plan: dict) -> dict:
    return next(b for b in plan["buffers"] if b["kind"] == "arena")


@pytest.mark.parametrize("edit, match", [
    (lambda p: _first_arena(p).update(slot=10_000), "slot 10000"),
    (lambda p: _first_arena(p).update(slot=-1), "slot -1"),
    (lambda p: _first(p, "torch:embedding")["inputs"].pop(), "1 inputs; op 'embedding' takes 2"),
    (lambda p: _first(p, "torch:linear")["inputs"].extend([0, 0]), "4 inputs; op 'linear' takes 2 to 3"),
    (lambda p: _first(p, "torch:linear")["inputs"].__setitem__(0, 10**6), "names buffer 1000000"),
    (lambda p: _first(p, "torch:linear").update(kernel="torch:no_such_op"), "no_such_op"),
    (lambda p: _first(p, "torch:linear").update(kernel="linear"), "kernel ids are 'provider:name'"),
    (lambda p: next(b for b in p["buffers"] if b.get("name") == "position_ids").update(name="evil"), "input 'evil'"),
    (lambda p: p["outputs"].__setitem__(0, 10**6), "output names buffer"),
    (lambda p: p["buffers"][0].update(dtype="float128"), "dtype 'float128'"),
    (lambda p: p.pop("steps"), "malformed"),
])
def test_a_bad_plan_fails_at_load_not_per_request(art, edit, match):
    _edit_plan(art, edit)
    with pytest.raises(ArtifactError, match=match) as e:
        kiln.load_artifact(art)
    assert "plan.json" in str(e.value) or "no_such_op" in str(e.value)


def test_inspect_verify_exits_nonzero_on_a_mismatch(art, capsys):
    assert kiln_main(["inspect", str(art), "--verify"]) == 0
    assert "all match" in capsys.readouterr().out
    f = art / WEIGHTS
    data = bytearray(f.read_bytes())
    data[-1] ^= 0xFF
    f.write_bytes(bytes(data))
    assert kiln_main(["inspect", str(art), "--verify"]) == 1
    assert f"MISMATCH: {WEIGHTS}" in capsys.readouterr().out
