"""Attention ops against a naive per-sequence, per-head, per-query loop; paged attention over
a cache written by kv_cache_write in a prefill step and then a decode step."""

from __future__ import annotations

import math

import pytest
import torch

from kiln.ir import Graph, Node, TensorType, input_node, run_graph, verify
from kiln.ir.ops import get_op, infer_type
from kiln.ir.ops.attention import attention, paged_attention
from kiln.ir.ops.kernels import kv_cache_write
from kiln.ir.printer import _parse_type as _t
from kiln.ir.step_inputs import contiguous_paged_inputs

# -- attention against a naive per-sequence, per-head, per-query loop ------------------------


def naive_attention(q, k, v, cu_seqlens, *, scale, causal, sliding_window, softcap, sinks=None):
    """q: [T, Hq, D], k: [T, Hkv, D], v: [T, Hkv, Dv]; float64 loops over everything."""
    q, k, v = q.double(), k.double(), v.double()
    hq, hkv = q.shape[1], k.shape[1]
    out = torch.zeros(q.shape[0], hq, v.shape[-1], dtype=torch.float64)
    bounds = cu_seqlens.tolist()
    for start, end in zip(bounds[:-1], bounds[1:], strict=True):
        for h in range(hq):
            kv = h // (hq // hkv)  # query head h reads kv head h // group
            for i in range(start, end):
                logits, values = [], []
                for j in range(start, end):
                    if causal and j > i:
                        continue
                    if sliding_window and i - j >= sliding_window:
                        continue
                    s = float(q[i, h] @ k[j, kv]) * scale
                    if softcap:
                        s = math.tanh(s / softcap) * softcap
                    logits.append(s)
                    values.append(v[j, kv])
                if sinks is not None:
                    logits.append(float(sinks[h]))
                    values.append(torch.zeros_like(v[0, 0]))
                if not logits:
                    continue
                m = max(logits)
                w = [math.exp(s - m) for s in logits]
                total = sum(w)
                out[i, h] = sum((wi / total) * vi for wi, vi in zip(w, values, strict=True))
    return out


LENGTHS = (3, 7, 1, 5)


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize(
    ("sliding_window", "softcap", "with_sinks"),
    [(0, 0.0, False), (3, 0.0, False), (0, 4.0, False), (0, 0.0, True), (2, 3.0, True)],
)
def test_attention_matches_naive_loop(causal, sliding_window, softcap, with_sinks):
    g = torch.Generator().manual_seed(3)
    total, hq, hkv, d, dv = sum(LENGTHS), 4, 2, 8, 6
    q = torch.randn(total, hq, d, generator=g)
    k = torch.randn(total, hkv, d, generator=g)
    v = torch.randn(total, hkv, dv, generator=g)
    sinks = torch.randn(hq, generator=g) if with_sinks else None
    cu = torch.tensor([0, *torch.tensor(LENGTHS).cumsum(0).tolist()], dtype=torch.int32)
    attrs = {
        "scale": d**-0.5,
        "causal": causal,
        "sliding_window": sliding_window,
        "softcap": softcap,
    }
    extra = [sinks] if with_sinks else []
    got = attention(q, k, v, cu, *extra, **attrs)
    want = naive_attention(q, k, v, cu, sinks=sinks, **attrs).float()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    # the traced layout with a leading batch axis of 1 computes the same
    batched = attention(q[None], k[None], v[None], cu, *extra, **attrs)
    assert batched.shape == (1, total, hq, dv)
    torch.testing.assert_close(batched[0], got, rtol=0, atol=0)


def test_attention_sequences_do_not_see_each_other():
    g = torch.Generator().manual_seed(4)
    q, k, v = (torch.randn(8, 2, 4, generator=g) for _ in range(3))
    attrs = {"scale": 0.5, "causal": False, "sliding_window": 0, "softcap": 0.0}
    joint = attention(q, k, v, torch.tensor([0, 3, 8], dtype=torch.int32), **attrs)
    first = attention(q[:3], k[:3], v[:3], torch.tensor([0, 3], dtype=torch.int32), **attrs)
    second = attention(q[3:], k[3:], v[3:], torch.tensor([0, 5], dtype=torch.int32), **attrs)
    torch.testing.assert_close(joint, torch.cat([first, second]), rtol=1e-6, atol=1e-6)


def test_attention_in_a_graph_via_interpreter():
    text_types = {"q": "f32[T,4,8]", "k": "f32[T,2,8]", "v": "f32[T,2,8]", "cu_seqlens": "i32[S+1]"}
    ins = [input_node(n, _t(t)) for n, t in text_types.items()]
    attrs = {"scale": 0.25, "causal": True, "sliding_window": 4, "softcap": 0.0}
    node = Node(
        "attention",
        tuple(ins),
        attrs,
        infer_type(get_op("attention"), [i.type for i in ins], attrs),
    )
    graph = Graph([*ins, node], [node])
    verify(graph)
    g = torch.Generator().manual_seed(5)
    cu = torch.tensor([0, 6, 16], dtype=torch.int32)
    vals = {"q": torch.randn(16, 4, 8, generator=g), "k": torch.randn(16, 2, 8, generator=g),
            "v": torch.randn(16, 2, 8, generator=g), "cu_seqlens": cu}  # fmt: skip
    (out,) = run_graph(graph, vals, lambda n, t: None)
    want = naive_attention(vals["q"], vals["k"], vals["v"], cu, **attrs).float()
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)


def test_paged_attention_prefill_then_decode_matches_attention():
    g = torch.Generator().manual_seed(6)
    lengths, hq, hkv, d = (6, 3, 9), 4, 2, 8
    total = sum(lengths)
    q, k, v = (torch.randn(total, h, d, generator=g) for h in (hq, hkv, hkv))
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    attrs = {"scale": d**-0.5, "causal": True, "sliding_window": 4, "softcap": 0.0}
    want = attention(q, k, v, cu, **attrs)
    cache_types = {
        "k_cache": TensorType("float32", ("NB", 4, hkv, d)),
        "v_cache": TensorType("float32", ("NB", 4, hkv, d)),
    }
    meta = contiguous_paged_inputs(lengths, 4, cache_types, shuffle_seed=1)
    kc, vc = meta["k_cache"], meta["v_cache"]

    def step(rows: list[int], seq_lens: list[int]) -> torch.Tensor:
        per_seq = [sum(1 for r in rows if cu[s] <= r < cu[s + 1]) for s in range(len(lengths))]
        step_cu = torch.tensor([0, *torch.tensor(per_seq).cumsum(0).tolist()], dtype=torch.int32)
        kw, vw = kv_cache_write(k[rows], v[rows], kc, vc, meta["slot_mapping"][rows])
        return paged_attention(
            q[rows], kw, vw, meta["block_tables"], torch.tensor(seq_lens, dtype=torch.int32), step_cu, **attrs,
        )  # fmt: skip

    # prefill all but the last token of every sequence, then decode the last tokens together
    last = [int(c) - 1 for c in cu[1:]]
    prefill_rows = [r for r in range(total) if r not in last]
    got_prefill = step(prefill_rows, [n - 1 for n in lengths])
    got_decode = step(last, list(lengths))
    torch.testing.assert_close(got_prefill, want[prefill_rows], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got_decode, want[last], rtol=1e-5, atol=1e-5)
