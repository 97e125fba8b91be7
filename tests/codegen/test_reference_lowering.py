"""The reference lowering: plan v2 structure, slot reuse, fallbacks, the LoweredModule's files
in the artifact and its manifest, and the plan's JSON round trip."""

from __future__ import annotations

import json

import pytest
import sympy
import torch

from kiln.codegen.artifact_writer import write_artifact
from kiln.codegen.lowering import LoweredModule, byte_form, to_form
from kiln.codegen.reference import lower
from kiln.errors import ArtifactError, KilnError
from kiln.ir import parse_graph
from kiln.ir.types import TensorType
from kiln.runtime.artifact import read_manifest, verify_hashes
from kiln.runtime.plan import ExecutionPlan, evaluate, form_str

LAYER = """
graph {
  %input_ids = input : i64[T]
  %cu_seqlens = input : i32[S+1]
  %logits_indices = input : i64[R]
  @emb = param : f32[32,8]
  @w = param : f32[8]
  @up = param : f32[16,8]
  @down = param : f32[8,8]
  %0 = embedding(@emb, %input_ids) : f32[T,8]
  %1 = rms_norm(%0, @w) {"normalized_shape": [8], "eps": 1e-6} : f32[T,8]
  %2 = linear(%1, @up) : f32[T,16]
  %3 = silu_and_mul(%2) : f32[T,8]
  %4 = linear(%3, @down) : f32[T,8]
  %5 = fused_add_rms_norm(%4, %0, @w) {"eps": 1e-6, "offset": 0.0, "weight_fp32": false} : (f32[T,8], f32[T,8])
  %6 = get_result(%5) {"index": 0} : f32[T,8]
  %7 = reshape(%6) {"shape": ["T", 2, 4]} : f32[T,2,4]
  %8 = reshape(%7) {"shape": ["T", 8]} : f32[T,8]
  %9 = gather_rows(%8, %logits_indices) : f32[R,8]
  %10 = linear(%9, @emb) : f32[R,32]
  return %10
}
"""


def test_plan_structure():
    lowered = lower(parse_graph(LAYER))
    plan = lowered.plan
    assert plan.target == "reference" and plan.symbols == ["R", "S", "T"]
    kinds = [b.kind for b in plan.buffers]
    assert kinds.count("input") == 3 and kinds.count("param") == 4 and kinds.count("view") == 2
    assert [s.kernel for s in plan.steps] == [
        "torch:embedding", "torch:rms_norm", "torch:linear", "torch:silu_and_mul", "torch:linear",
        "torch:fused_add_rms_norm", "torch:gather_rows", "torch:linear",
    ]
    for s in plan.steps:
        assert all(plan.buffers[o].kind == "arena" for o in s.outputs)
    fused = plan.steps[5]
    assert len(fused.outputs) == 2
    view = plan.buffers[plan.steps[6].inputs[0]]
    assert view.kind == "view" and plan.buffers[view.base].kind == "view"
    assert plan.buffers[plan.buffers[view.base].base] is plan.buffers[fused.outputs[0]]
    rules = {r.symbol: (r.input, r.axis, r.coeff, r.offset) for r in plan.bindings}
    assert rules == {"T": ("input_ids", 0, 1, 0), "S": ("cu_seqlens", 0, 1, 1), "R": ("logits_indices", 0, 1, 0)}
    assert plan.input_types["cu_seqlens"] == TensorType("int32", ("S+1",))


def test_slots_are_reused_and_sized_by_forms():
    plan = lower(parse_graph(LAYER)).plan
    arena = [b for b in plan.buffers if b.kind == "arena"]
    assert len(plan.slots) < len(arena)
    for i, forms in enumerate(plan.slots):
        held = [b for b in arena if b.slot == i]
        assert held
        at = {"T": 5, "R": 2, "S": 2}
        need = max(evaluate(d, at) for d in forms)
        for b in held:
            numel = 1
            for d in b.shape:
                numel *= evaluate(d, at)
            assert numel * 4 <= need


def test_reference_has_no_fallbacks_and_no_files():
    lowered = lower(parse_graph(LAYER))
    assert lowered.fallbacks == [] and lowered.files == {}


def test_plan_json_round_trip():
    plan = lower(parse_graph(LAYER)).plan
    text = json.dumps(plan.to_dict())
    again = ExecutionPlan.from_dict(json.loads(text))
    assert again == plan
    assert json.dumps(again.to_dict()) == text
    with pytest.raises(ValueError, match="plan format 1"):
        ExecutionPlan.from_dict({**plan.to_dict(), "format": 1})


def test_forms():
    t, s = sympy.symbols("T S")
    assert to_form(2 * t + 1, "d") == {"T": 2, "const": 1}
    assert form_str({"T": 2, "const": 1}) == "2*T+1" and form_str({"S": 1, "const": -1}) == "S-1"
    assert byte_form(TensorType("bfloat16", ("S", "MB"))) == {"MB*S": 2}
    assert evaluate({"MB*S": 2}, {"S": 3, "MB": 5}) == 30
    assert byte_form(TensorType("int4", (7, 8))) == 28
    with pytest.raises(KilnError, match="not affine"):
        to_form(t * s, "d")


def test_lowered_files_are_stored_and_hashed(tmp_path):
    g = parse_graph(LAYER)
    lowered = lower(g)
    files = {"kernels/layer.bin": b"\x7fELF...", "tuning.json": b'{"linear": {}}'}
    lowered = LoweredModule(lowered.plan, files, fallbacks=["rope"])
    root = tmp_path / "a"
    manifest = {"target": "reference", "dtype": "float32"}
    weights = {n.name: (lambda n=n: torch.zeros([int(d) for d in n.type.shape])) for n in g.params}
    write_artifact(root, g, lowered, weights, {}, manifest)
    m = read_manifest(root)
    assert m["fallbacks"] == ["rope"]
    assert set(files) <= set(m["files"]) and verify_hashes(root) == []
    assert (root / "kernels/layer.bin").read_bytes() == files["kernels/layer.bin"]
    (root / "tuning.json").write_bytes(b'{"linear": []}')
    with pytest.raises(ArtifactError, match="tuning.json"):
        read_manifest(root)


def test_a_lowering_cannot_write_outside_the_artifact(tmp_path):
    g = parse_graph(LAYER)
    lowered = LoweredModule(lower(g).plan, {"../escape": b""})
    with pytest.raises(ValueError, match="may not write"):
        write_artifact(tmp_path / "a", g, lowered, {}, {}, {})
