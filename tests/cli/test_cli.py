"""The command line: compile-model, kiln inspect, kiln generate."""

from __future__ import annotations

import json
import shutil
import subprocess

import pytest

from kiln.cli import compile_model_main, main
from kiln.passes import pipeline


def test_compile_model_with_dump_and_verify(checkpoint, tmp_path, capsys):
    out, dump = tmp_path / "art", tmp_path / "ir"
    rc = compile_model_main([str(checkpoint("llama")), "-o", str(out), "--dump-ir", str(dump), "--verify"])
    assert rc == 0 and (out / "manifest.json").is_file()
    dumps = sorted(p.name for p in dump.iterdir())
    assert dumps[0] == "00-input.ir" and dumps[1] == "01-canonicalize.ir"
    assert len(dumps) == 1 + len(pipeline("reference"))
    assert "paged_attention(" in (dump / dumps[-1]).read_text()
    assert "attention(" in (dump / "01-canonicalize.ir").read_text()
    assert main(["inspect", str(out), "--verify"]) == 0
    text = capsys.readouterr().out
    for expected in ("llama", "torch:paged_attention", "canonicalize", "verified", "fallbacks  none", "hashes     all match"):
        assert expected in text


def test_passes_option(checkpoint, tmp_path, capsys):
    out = tmp_path / "art"
    assert compile_model_main([str(checkpoint("llama")), "-o", str(out), "--passes=-merge-projections"]) == 0
    assert main(["inspect", str(out)]) == 0
    assert "merge-projections" not in capsys.readouterr().out
    rc = compile_model_main([str(checkpoint("llama")), "-o", str(tmp_path / "b"), "--passes", "nonsense"])
    assert rc == 2 and "unknown pass 'nonsense'" in capsys.readouterr().err


def test_existing_output_needs_force(artifact, checkpoint, tmp_path, capsys):
    out = tmp_path / "art"
    shutil.copytree(artifact("llama"), out)
    assert compile_model_main([str(checkpoint("llama")), "-o", str(out)]) == 2
    assert "--force" in capsys.readouterr().err
    assert compile_model_main([str(checkpoint("llama")), "-o", str(out), "--force"]) == 0


def test_generate_streams_text(artifact, capsys):
    assert main(["generate", str(artifact("llama")), "--prompt", "def f(x):", "--max-tokens", "5"]) == 0
    assert capsys.readouterr().out.endswith("\n")


def test_console_script_error_has_no_traceback(tmp_path):
    exe = shutil.which("compile-model")
    if exe is None:
        pytest.skip("console scripts not installed")
    r = subprocess.run([exe, str(tmp_path / "nope"), "-o", str(tmp_path / "out")], capture_output=True, text=True)
    assert r.returncode == 2
    assert r.stderr.startswith("error: ") and "Traceback" not in r.stderr


def test_lora_options(checkpoint, tmp_path, capsys):
    out = tmp_path / "art"
    rc = compile_model_main([str(checkpoint("llama")), "-o", str(out), "--max-lora-rank", "8",
                             "--lora-targets", "q_proj,o_proj"])
    assert rc == 0
    lora = json.loads((out / "manifest.json").read_text())["lora"]
    assert lora["max_rank"] == 8 and lora["targets"] == ["q_proj", "o_proj"]
    assert main(["inspect", str(out)]) == 0
    assert "lora" in capsys.readouterr().out
    rc = compile_model_main([str(checkpoint("llama")), "-o", str(tmp_path / "b"), "--lora-targets", "q_proj"])
    assert rc == 2 and "needs max_lora_rank" in capsys.readouterr().err
