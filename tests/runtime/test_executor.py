"""The plan executor: destination-passing steps into an arena allocated once, multi-result and
in-place steps, alias views, symbol binding without sympy, and errors for bad plans. Every
numerical check compares with the IR interpreter (exact: the same torch kernels run)."""

from __future__ import annotations

import copy
import weakref

import pytest
import torch

from kiln.codegen.reference import lower
from kiln.errors import ArtifactError, KilnError
from kiln.ir import parse_graph, run_graph
from kiln.ir.interpreter import bind_symbols
from kiln.runtime.executor import PlanExecutor
from kiln.runtime.plan import ExecutionPlan

NO_WEIGHTS = {}


def _interp(g, inputs, weights=NO_WEIGHTS):
    return run_graph(g, inputs, lambda name, t: weights[name])


MLP = """
graph {
  %x = input : f32[T,8]
  @w = param : f32[16,8]
  %0 = linear(%x, @w) : f32[T,16]
  %1 = silu_and_mul(%0) : f32[T,8]
  %2 = mul(%1, 2.0) : f32[T,8]
  %3 = add(%2, %x) : f32[T,8]
  %4 = reshape(%3) {"shape": ["T", 2, 4]} : f32[T,2,4]
  %5 = permute(%4) {"dims": [1, 0, 2]} : f32[2,T,4]
  %6 = slice(%5) {"dim": 2, "start": 1, "end": 3, "step": 1} : f32[2,T,2]
  %7 = exp(%6) : f32[2,T,2]
  return %7, %4
}
"""


def _mlp():
    g = parse_graph(MLP)
    w = torch.randn(16, 8)
    return g, {"w": w}


def test_arena_is_allocated_once_and_reused_across_token_counts():
    g, w = _mlp()
    ex = PlanExecutor(lower(g).plan, w, limits={"T": 16})
    arena = ex.arena
    assert arena is not None
    for t in (16, 1, 7, 1, 16, 3):
        x = torch.randn(t, 8)
        got = ex.run({"x": x})
        for a, b in zip(got, _interp(g, {"x": x}, w), strict=True):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert ex.arena is arena  # no call needed more than the limits


def test_a_call_past_the_limits_grows_the_arena_once():
    g, w = _mlp()
    ex = PlanExecutor(lower(g).plan, w, limits={"T": 4})
    small = ex.arena.numel()
    x = torch.randn(9, 8)
    torch.testing.assert_close(ex.run({"x": x})[0], _interp(g, {"x": x}, w)[0], rtol=0, atol=0)
    grown = ex.arena
    assert grown.numel() > small and ex.limits == {"T": 9}
    ex.run({"x": torch.randn(2, 8)})
    assert ex.arena is grown


def test_views_of_a_repeated_shape_are_built_once():
    g, w = _mlp()
    ex = PlanExecutor(lower(g).plan, w, limits={"T": 8})
    first = ex.run({"x": torch.randn(3, 8)})
    again = ex.run({"x": torch.randn(3, 8)})
    assert first[0] is again[0] and first[1] is again[1]  # the same cached arena views
    assert ex.run({"x": torch.randn(4, 8)})[0] is not first[0]


def test_an_input_is_read_afresh_each_call_whether_new_rewritten_or_a_new_view():
    g, w = _mlp()
    ex = PlanExecutor(lower(g).plan, w, limits={"T": 8})
    buf = torch.randn(8, 8)
    for x in (buf[:3], buf[:3], torch.randn(3, 8), torch.randn(8, 3).t(), buf[:3]):
        buf.normal_()  # the model runner rewrites its buffers in place and passes new views of them
        for a, b in zip(ex.run({"x": x}), _interp(g, {"x": x}, w), strict=True):
            torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_only_the_last_calls_inputs_stay_referenced():
    g, w = _mlp()
    ex = PlanExecutor(lower(g).plan, w, limits={"T": 8})
    x = torch.randn(3, 8)
    held = weakref.ref(x)
    ex.run({"x": x})
    del x
    assert held() is not None  # the next call of this shape may bring it again
    ex.run({"x": torch.randn(4, 8)})
    assert held() is None


def test_view_results_take_no_arena_space_and_alias_their_base():
    g, w = _mlp()
    plan = lower(g).plan
    views = [b for b in plan.buffers if b.kind == "view"]
    assert [b.op for b in views] == ["reshape", "permute", "slice"]
    assert not any(s.kernel.split(":")[1] in ("reshape", "permute", "slice") for s in plan.steps)
    ex = PlanExecutor(plan, w, limits={"T": 4})
    out = ex.run({"x": torch.randn(4, 8)})[1]  # %4: a reshape of add's arena buffer
    assert out.untyped_storage().data_ptr() == ex.arena.untyped_storage().data_ptr()


def test_a_reshape_torch_cannot_view_is_a_copy_step():
    g = parse_graph("""
graph {
  %x = input : f32[T,4]
  %0 = neg(%x) : f32[T,4]
  %1 = permute(%0) {"dims": [1, 0]} : f32[4,T]
  %2 = reshape(%1) {"shape": [-1]} : f32[4*T]
  return %2
}""")
    plan = lower(g).plan
    assert [s.kernel for s in plan.steps] == ["torch:neg", "torch:reshape"]
    x = torch.randn(5, 4)
    torch.testing.assert_close(PlanExecutor(plan, {}).run({"x": x})[0], _interp(g, {"x": x})[0], rtol=0, atol=0)


def test_multi_result_step_writes_both_buffers():
    g = parse_graph("""
graph {
  %x = input : f32[T,8]
  %r = input : f32[T,8]
  @w = param : f32[8]
  %0 = fused_add_rms_norm(%x, %r, @w) {"eps": 1e-6, "offset": 0.0, "weight_fp32": false} : (f32[T,8], f32[T,8])
  %1 = get_result(%0) {"index": 0} : f32[T,8]
  %2 = get_result(%0) {"index": 1} : f32[T,8]
  %3 = mul(%1, %2) : f32[T,8]
  return %3, %2
}""")
    plan = lower(g).plan
    (step,) = [s for s in plan.steps if s.kernel == "torch:fused_add_rms_norm"]
    assert len(step.outputs) == 2 and not any(s.kernel == "torch:get_result" for s in plan.steps)
    w = {"w": torch.randn(8)}
    inputs = {"x": torch.randn(6, 8), "r": torch.randn(6, 8)}
    for a, b in zip(PlanExecutor(plan, w).run(inputs), _interp(g, inputs, w), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


PAGED = """
graph {
  %q = input : f32[T,2,4]
  %k = input : f32[T,1,4]
  %cu_seqlens = input : i32[S+1]
  %slot_mapping = input : i64[T]
  %block_tables = input : i32[S,MB]
  %seq_lens = input : i32[S]
  %k_cache.0 = input : f32[NB,BS,1,4]
  %v_cache.0 = input : f32[NB,BS,1,4]
  %0 = neg(%k) : f32[T,1,4]
  %1 = kv_cache_write(%k, %0, %k_cache.0, %v_cache.0, %slot_mapping) : (f32[NB,BS,1,4], f32[NB,BS,1,4])
  %2 = get_result(%1) {"index": 0} : f32[NB,BS,1,4]
  %3 = get_result(%1) {"index": 1} : f32[NB,BS,1,4]
  %4 = paged_attention(%q, %2, %3, %block_tables, %seq_lens, %cu_seqlens) {"scale": 0.5, "causal": true, "sliding_window": 0, "softcap": 0.0} : f32[T,2,4]
  return %4
}
"""


def _paged_inputs():
    lens = [3, 2]
    return {
        "q": torch.randn(5, 2, 4), "k": torch.randn(5, 1, 4),
        "cu_seqlens": torch.tensor([0, 3, 5], dtype=torch.int32),
        "slot_mapping": torch.tensor([4, 5, 6, 0, 1]),
        "block_tables": torch.tensor([[1, 0], [0, 0]], dtype=torch.int32),
        "seq_lens": torch.tensor(lens, dtype=torch.int32),
        "k_cache.0": torch.zeros(3, 4, 1, 4), "v_cache.0": torch.zeros(3, 4, 1, 4),
    }


def test_in_place_cache_writes_land_in_the_callers_tensors():
    g = parse_graph(PAGED)
    plan = lower(g).plan
    (write,) = [s for s in plan.steps if s.kernel == "torch:kv_cache_write"]
    assert write.outputs == [plan.inputs["k_cache.0"], plan.inputs["v_cache.0"]]
    inputs = _paged_inputs()
    ref_inputs = copy.deepcopy(inputs)
    kc = inputs["k_cache.0"]
    got = PlanExecutor(plan, {}).run(inputs)[0]
    want = _interp(g, ref_inputs)[0]
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert inputs["k_cache.0"] is kc
    torch.testing.assert_close(kc, ref_inputs["k_cache.0"], rtol=0, atol=0)
    torch.testing.assert_close(inputs["v_cache.0"], ref_inputs["v_cache.0"], rtol=0, atol=0)
    assert kc.view(12, 1, 4)[4].equal(inputs["k"][0])


def test_binding_rules_agree_with_the_interpreter():
    g = parse_graph(PAGED)
    plan = lower(g).plan
    assert {r.symbol for r in plan.bindings} == {"T", "S", "MB", "NB", "BS"}
    ex = PlanExecutor(plan, {})
    inputs = _paged_inputs()
    assert ex.bind(inputs) == bind_symbols({n.name: n.type for n in g.inputs}, inputs)


def test_scalar_consts_become_device_tensors_at_load(monkeypatch):
    g = parse_graph("""
graph {
  %x = input : f32[T,2]
  %i = input : i64[T]
  %0 = mul(%x, 3.0) : f32[T,2]
  %1 = index_select(%0, %i) {"dim": 0} : f32[T,2]
  %2 = arange() {"start": 0, "end": "T", "step": 1, "dtype": "int64"} : i64[T]
  %3 = add(%2, %i) : i64[T]
  return %1, %3
}""")
    ex = PlanExecutor(lower(g).plan, {})
    inputs = {"x": torch.randn(4, 2), "i": torch.tensor([3, 0, 1, 1])}

    def no_tensor(*a, **k):
        raise AssertionError("torch.tensor called while running")

    monkeypatch.setattr(torch, "tensor", no_tensor)
    got = ex.run(inputs)
    monkeypatch.undo()
    for a, b in zip(got, _interp(g, inputs), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_bad_inputs_are_kiln_errors():
    g, w = _mlp()
    ex = PlanExecutor(lower(g).plan, w)
    with pytest.raises(KilnError, match="missing graph input 'x'"):
        ex.run({})
    with pytest.raises(KilnError, match="input 'x'"):
        ex.run({"x": torch.randn(3, 7)})
    with pytest.raises(KilnError, match="input 'x'"):
        ex.run({"x": torch.randn(3, 8, dtype=torch.float64)})


def _broken(plan: ExecutionPlan, **changes) -> ExecutionPlan:
    data = plan.to_dict()
    for path, value in changes.items():
        where, index, key = path.split(".")
        data[where][int(index)][key] = value
    return ExecutionPlan.from_dict(data)


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"steps.0.kernel": "cuda:linear"}, "unknown provider 'cuda'"),
        ({"steps.0.kernel": "tvm:linear"}, r"provider 'tvm' \(target 'cpu'\).*--target reference"),
        ({"steps.0.kernel": "triton:linear_q4"}, "'triton:linear_q4', which provider 'triton' does not have"),
        ({"steps.0.kernel": "torch:no_such_op"}, "'torch:no_such_op', which provider 'torch' does not have"),
        ({"steps.0.outputs": [99]}, "names buffer 99"),
        ({"steps.0.outputs": [1]}, "writes param buffer"),
    ],
)
def test_bad_plans_are_artifact_errors(change, match):
    g, w = _mlp()
    plan = lower(g).plan
    assert plan.buffers[1].kind == "param"
    with pytest.raises(ArtifactError, match=match):
        PlanExecutor(_broken(plan, **change), w)


def test_a_view_of_a_later_buffer_is_rejected():
    g, w = _mlp()
    plan = lower(g).plan
    i = next(i for i, b in enumerate(plan.buffers) if b.kind == "view")
    with pytest.raises(ArtifactError, match=f"buffer {i} is a view of buffer {i + 1}"):
        PlanExecutor(_broken(plan, **{f"buffers.{i}.base": i + 1}), w)


def test_running_needs_no_sympy(monkeypatch):
    """Symbols bind and dim attributes resolve through the plan's forms, not kiln.ir.dims."""
    import kiln.ir.dims as dims

    g, w = _mlp()
    ex = PlanExecutor(lower(g).plan, w)

    def no_sympy(*a, **k):
        raise AssertionError("sympy used while running")

    monkeypatch.setattr(dims, "_parse", no_sympy)
    monkeypatch.setattr(dims, "_compiled", no_sympy)
    x = torch.randn(5, 8)
    got = ex.run({"x": x})
    monkeypatch.undo()
    torch.testing.assert_close(got[0], _interp(g, {"x": x}, w)[0], rtol=0, atol=0)


@pytest.mark.parametrize("layout", ["out_in", "in_out"])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("rows", ["T", "2,T"])
def test_linear_into_its_destination_matches_the_reference(layout, bias, rows):
    w_shape = "16,8" if layout == "out_in" else "8,16"
    operands = "%x, @w, @b" if bias else "%x, @w"
    g = parse_graph(f"""
graph {{
  %x = input : f32[{rows},8]
  @w = param : f32[{w_shape}]
  @b = param : f32[16]
  %0 = linear({operands}) {{"weight_layout": "{layout}"}} : f32[{rows},16]
  return %0
}}""")
    w = {"w": torch.randn(*map(int, w_shape.split(","))), "b": torch.randn(16)}
    x = torch.randn(*(3 if d == "T" else int(d) for d in rows.split(",")), 8)
    got = PlanExecutor(lower(g).plan, w).run({"x": x})[0]
    torch.testing.assert_close(got, _interp(g, {"x": x}, w)[0], rtol=0, atol=0)
