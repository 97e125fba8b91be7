"""`kiln tune` on a cpu artifact: a short real tune writes tuning.json and a rebuilt kernel
library that loads and still generates what the reference target generates, with a manifest
that verifies; decode and prefill configs that differ give a decode function picked by the row
count; a second tune is idempotent; a reference artifact has nothing to tune."""

from __future__ import annotations

import json
import shutil

import pytest

pytest.importorskip("tvm")

import kiln  # noqa: E402
from kiln import LLM, SamplingParams  # noqa: E402
from kiln.codegen import tune as tune_cli  # noqa: E402
from kiln.codegen.cpu import tune as cpu_tune  # noqa: E402
from kiln.codegen.cpu.tuning import BUCKETS, DECODE_SUFFIX  # noqa: E402
from kiln.runtime.artifact import verify_hashes  # noqa: E402
from kiln.runtime.tvm_library import BUILD_INFO  # noqa: E402

PROMPTS = [[5, 9, 33, 2, 71], list(range(3, 30))]  # 27 prompt rows: past the decode bucket


@pytest.fixture(scope="module")
def cpu_llama(checkpoint, tmp_path_factory):
    return kiln.compile(
        checkpoint("llama"),
        tmp_path_factory.mktemp("cpu-tune") / "artifact",
        target="cpu",
        dtype="float32",
    )


@pytest.fixture(scope="module")
def reference_tokens(artifact):
    return _greedy(artifact("llama", "float32"))


def _greedy(artifact, n: int = 6) -> list[list[int]]:
    llm = LLM(artifact, max_num_seqs=2, num_kv_blocks=16)
    params = SamplingParams(temperature=0, max_tokens=n, ignore_eos=True)
    return [
        o.outputs[0].token_ids
        for o in llm.generate([{"prompt_token_ids": p} for p in PROMPTS], params)
    ]


def _copy(src, tmp_path):
    return shutil.copytree(src, tmp_path / "artifact")


def _fake_measure(k, inputs, compiled):
    """Decode prefers one row per tile (mt=1), prefill eight (mt=8); the rest ties with the default."""
    import tvm_ffi

    from kiln.kernels import tvm_kernels

    def same(config):
        key = (k.name, tuple(config.items()))
        if key not in _HASHES:
            _HASHES[key] = tvm_ffi.structural_hash(tvm_kernels.build(k.info, config).func)
        return tvm_ffi.structural_hash(k.func) == _HASHES[key]

    times = {"decode": 10.0, "prefill": 100.0}
    if k.info.op == "linear" and same({"mt": 1}):
        times["decode"] = 5.0
    if k.info.op == "linear" and same({"mt": 8}):
        times["prefill"] = 50.0
    return times


_HASHES: dict = {}


def test_a_short_tune_stores_tuning_and_a_library_that_generates_like_the_reference(
    cpu_llama, reference_tokens, tmp_path, capsys
):
    art = _copy(cpu_llama, tmp_path)
    text = tune_cli.main_text(art, budget=2, kernels=2)
    table = json.loads((art / "tuning.json").read_text())
    assert table["host"]["mcpu"] and table["target"] == "cpu" and len(table["kernels"]) == 2
    for entry in table["kernels"].values():
        assert entry["op"] == "linear" and entry["calls"] >= 1
        for b in BUCKETS:
            assert entry[b]["default_us"] > 0 and 0 < entry[b]["tuned_us"] <= entry[b]["default_us"]
    assert "default µs" in text and "prefill (T=512)" in text
    assert verify_hashes(art) == []
    assert _greedy(art) == reference_tokens


def test_bucketed_configs_dispatch_by_rows_and_a_second_tune_is_idempotent(
    cpu_llama, reference_tokens, tmp_path, monkeypatch
):
    import itertools

    search = cpu_tune.candidates
    monkeypatch.setattr(cpu_tune, "measure", _fake_measure)
    # the default, then each knob alone (mt first): a finite search that a slow machine finishes too
    monkeypatch.setattr(cpu_tune, "candidates", lambda *a: itertools.islice(search(*a), 12))
    art = _copy(cpu_llama, tmp_path)
    cpu_tune.tune(art, budget=60, kernels=2, progress=False)
    first = json.loads((art / "tuning.json").read_text())
    built = json.loads((art / BUILD_INFO).read_text())
    for name, entry in first["kernels"].items():
        assert entry["decode"]["config"] == {"mt": 1} and entry["prefill"]["config"] == {"mt": 8}
        assert built["kernels"][name]["by_rows"] == [
            [BUCKETS["decode"]["max_rows"], name + DECODE_SUFFIX]
        ]
        assert name + DECODE_SUFFIX in built["kernels"]
    assert verify_hashes(art) == []
    assert _greedy(art) == reference_tokens  # prefill rows run the mt=8 functions, decode rows mt=1

    files = set(json.loads((art / "manifest.json").read_text())["files"])
    cpu_tune.tune(art, budget=60, kernels=2, progress=False)
    second = json.loads((art / "tuning.json").read_text())
    assert {
        n: (e["decode"]["config"], e["prefill"]["config"]) for n, e in second["kernels"].items()
    } == {n: (e["decode"]["config"], e["prefill"]["config"]) for n, e in first["kernels"].items()}
    assert json.loads((art / BUILD_INFO).read_text())["kernels"] == built["kernels"]
    assert set(json.loads((art / "manifest.json").read_text())["files"]) == files
    assert verify_hashes(art) == []


def test_a_reference_artifact_has_nothing_to_tune(artifact, capsys):
    assert "nothing to tune" in tune_cli.tune(artifact("llama", "float32"))["note"]
    assert (
        tune_cli.main([str(artifact("llama", "float32")), "--budget", "1", "--kernels", "1"]) == 0
    )
    assert "nothing to tune" in capsys.readouterr().out


def test_the_launcher_picks_the_decode_function_by_rows():
    import torch

    from kiln.kernels.tvm_provider import make_launcher

    called = []
    record = {"inputs": [0], "outputs": [0], "present": ["mat", "mat"]}
    launch = make_launcher(
        lambda *a: called.append("main"), record, ((16, lambda *a: called.append("decode")),)
    )
    for rows in (1, 16, 17, 512):
        launch([torch.empty(rows, 8)], [torch.empty(rows, 8)], {})
    assert called == ["decode", "decode", "main", "main"]
