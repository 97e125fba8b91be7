"""Multi-result nodes and in-place writes: text and JSON forms, verifier rules, DCE and CSE."""

from __future__ import annotations

import pytest
import torch

from kiln.errors import VerifyError
from kiln.ir import graph_from_dict, graph_to_dict, parse_graph, print_graph, run_graph, verify
from kiln.ir.types import TupleType
from kiln.passes import get_pass

HEADER = """graph {
  %k = input : f32[T,1,2]
  %slot_mapping = input : i64[T]
  %k_cache.0 = input : f32[NB,BS,1,2]
  %v_cache.0 = input : f32[NB,BS,1,2]
"""
WRITE = '  %0 = kv_cache_write(%k, %k, %k_cache.0, %v_cache.0, %slot_mapping) : (f32[NB,BS,1,2], f32[NB,BS,1,2])\n'


def _graph(*lines: str, ret: str) -> str:
    return HEADER + WRITE + "".join(f"  {line}\n" for line in lines) + f"  return {ret}\n}}\n"


READ_AFTER_WRITE = _graph(
    '%1 = get_result(%0) {"index": 0} : f32[NB,BS,1,2]',
    '%2 = sum(%1) {"dims": [0, 1, 2, 3], "keepdim": false} : f32[]',
    ret="%2",
)


def test_tuple_type_prints_parses_and_round_trips_through_json():
    g = parse_graph(READ_AFTER_WRITE)
    verify(g)
    write = next(n for n in g.nodes if n.op == "kv_cache_write")
    assert isinstance(write.type, TupleType) and len(write.type.types) == 2
    assert print_graph(parse_graph(print_graph(g))) == print_graph(g)
    assert print_graph(graph_from_dict(graph_to_dict(g))) == print_graph(g)


def test_interpreter_writes_the_callers_cache_in_place():
    g = parse_graph(READ_AFTER_WRITE)
    kc, vc = torch.zeros(2, 2, 1, 2), torch.zeros(2, 2, 1, 2)
    k = torch.ones(3, 1, 2)
    inputs = {"k": k, "slot_mapping": torch.tensor([0, 3, -1]), "k_cache.0": kc, "v_cache.0": vc}
    (total,) = run_graph(g, inputs, lambda name, t: None)
    assert total.item() == 4.0  # two slots written, the padded row (-1) nowhere
    assert kc.view(4, 1, 2)[[0, 3]].eq(1).all() and kc.view(4, 1, 2)[[1, 2]].eq(0).all()


def test_reading_the_written_operand_is_rejected():
    text = _graph('%1 = sum(%k_cache.0) {"dims": [0, 1, 2, 3], "keepdim": false} : f32[]', ret="%1")
    with pytest.raises(VerifyError, match="writes .* in place, but .* also reads it"):
        verify(parse_graph(text))


def test_writing_a_computed_value_is_rejected():
    text = """graph {
  %k = input : f32[T,1,2]
  %slot_mapping = input : i64[T]
  %c = input : f32[NB,BS,1,2]
  %0 = neg(%c) : f32[NB,BS,1,2]
  %1 = kv_cache_write(%k, %k, %0, %c, %slot_mapping) : (f32[NB,BS,1,2], f32[NB,BS,1,2])
  %2 = get_result(%1) {"index": 1} : f32[NB,BS,1,2]
  return %2
}"""
    with pytest.raises(VerifyError, match="not a buffer the caller owns"):
        verify(parse_graph(text))


def test_a_tuple_is_read_only_through_get_result():
    text = _graph("%1 = neg(%0) : f32[NB,BS,1,2]", ret="%1")
    with pytest.raises(VerifyError, match="get_result"):
        verify(parse_graph(text))


def test_get_result_index_out_of_range_is_rejected():
    text = _graph('%1 = get_result(%0) {"index": 2} : f32[NB,BS,1,2]', ret="%1")
    with pytest.raises(VerifyError, match="out of range"):
        verify(parse_graph(text))


def test_dce_keeps_a_write_nothing_reads():
    text = HEADER + WRITE + "  %1 = neg(%k) : f32[T,1,2]\n  return %1\n}\n"
    g = parse_graph(text)
    verify(g)
    out = get_pass("dce").apply(g)
    assert sorted(n.op for n in out.ops()) == ["kv_cache_write", "neg"]


def test_cse_never_merges_two_writes():
    text = HEADER + WRITE + (
        '  %1 = get_result(%0) {"index": 0} : f32[NB,BS,1,2]\n'
        '  %2 = get_result(%0) {"index": 1} : f32[NB,BS,1,2]\n'
        "  %3 = kv_cache_write(%k, %k, %1, %2, %slot_mapping) : (f32[NB,BS,1,2], f32[NB,BS,1,2])\n"
        '  %4 = get_result(%3) {"index": 0} : f32[NB,BS,1,2]\n'
        "  return %4\n}\n"
    )
    g = parse_graph(text)
    verify(g)
    out = get_pass("cse").apply(g)
    assert sum(n.op == "kv_cache_write" for n in out.nodes) == 2
