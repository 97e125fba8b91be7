"""Loading validates an artifact: every way it can be wrong is an ArtifactError naming the file."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

import kiln
from kiln.errors import ArtifactError
from kiln.runtime.artifact import FORMAT_VERSION, read_manifest, verify_hashes
from kiln.runtime.model import CompiledModel


@pytest.fixture
def art(artifact, tmp_path):
    """A private copy of a compiled artifact that a test may damage."""
    dst = tmp_path / "art"
    shutil.copytree(artifact("llama"), dst)
    return dst


def _weights(art):
    return sorted((art / "weights").glob("*.safetensors"))[0]


def test_layout_and_manifest(art):
    m = read_manifest(art)
    assert m["target"] == "reference" and m["dtype"] == "float32" and m["format_version"] == FORMAT_VERSION == 4
    assert m["hash_algorithm"] == "xxh3_128-of-64MiB-chunks"
    assert m["fallbacks"] == []
    assert m["kiln_version"] == kiln.__version__
    assert set(m["source"]["sha256"]) >= {"config.json", "model.safetensors"}
    assert m["pipeline"][0] == "canonicalize"
    for rel in ("graph.json", "plan.json", "config.json", "tokenizer/tokenizer.json"):
        assert rel in m["files"] and (art / rel).is_file()
    assert verify_hashes(art) == []


def test_wrong_format_version(art):
    m = json.loads((art / "manifest.json").read_text())
    m["format_version"] = 99
    (art / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(ArtifactError, match=r"manifest.json.*format version 99"):
        kiln.load_artifact(art)


def test_wrong_target(art):
    with pytest.raises(ArtifactError, match="compiled for target 'reference', not 'cuda'"):
        CompiledModel(art, target="cuda")


def test_missing_file(art):
    _weights(art).unlink()
    with pytest.raises(ArtifactError, match=r"model-00001-of-00001.safetensors' is missing"):
        kiln.load_artifact(art)


def test_truncated_weights(art):
    f = _weights(art)
    f.write_bytes(f.read_bytes()[:-100])
    with pytest.raises(ArtifactError, match=r"model-00001-of-00001.safetensors.*truncated"):
        kiln.load_artifact(art)


def test_corrupt_weights_same_size(art):
    f = _weights(art)
    data = bytearray(f.read_bytes())
    data[:8] = b"\xff" * 8  # the safetensors header length
    f.write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match="model-00001-of-00001.safetensors"):
        kiln.load_artifact(art)
    assert verify_hashes(art) == ["weights/model-00001-of-00001.safetensors"]


def test_modified_plan(art):
    (art / "plan.json").write_text((art / "plan.json").read_text().replace("torch:silu", "torch:gelu"))
    with pytest.raises(ArtifactError, match="plan.json"):
        kiln.load_artifact(art)


def test_not_an_artifact(tmp_path):
    with pytest.raises(ArtifactError, match="manifest.json' is missing"):
        kiln.load_artifact(tmp_path)
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(ArtifactError, match="not valid JSON"):
        kiln.load_artifact(tmp_path)


def test_forward_rejects_bad_inputs(artifact):
    m = kiln.load_artifact(artifact("llama"))
    ids = torch.arange(3, 8)
    with pytest.raises(ValueError, match="1-D"):
        m.forward(ids[None], torch.arange(5), [5])
    with pytest.raises(ValueError, match="sum to"):
        m.forward(ids, torch.arange(5), [2, 2])
    with pytest.raises(ValueError, match="vocab|lie in"):
        m.forward(torch.tensor([10_000]), torch.arange(1), [1])


def test_runtime_does_not_import_compiler(artifact):
    """A server starts from an artifact alone: loading must not pull in the compiler side."""
    import subprocess
    import sys

    code = (
        "import sys, kiln, torch; m = kiln.load_artifact(sys.argv[1]); "
        "m.forward(torch.arange(3, 7), torch.arange(4), [4]); "
        "bad = [k for k in sys.modules if k.startswith(('kiln.frontend', 'kiln.passes', 'kiln.codegen')) "
        "or k.startswith('transformers.models.')]; print(bad); sys.exit(1 if bad else 0)"
    )
    r = subprocess.run([sys.executable, "-c", code, str(artifact("llama"))], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
