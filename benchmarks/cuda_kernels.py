"""Per-kernel GPU timings against their floors: paged attention at the 8B shape (a 2048-token
prefill beside torch's flash SDPA on the same shapes; decode at batch 1, 32 and 256 over 1024
tokens; an offline-serving mixed step of 511 decodes and a 390-token prefill chunk, in the
kernel's two launches and in the single launch it replaced), the sampler's greedy rows and the
multi-LoRA `lora` kernel (8 adapters of rank 16 added to the 8B projections' results, against
the op's torch reference and the bytes of the slots and rows it reads and writes). Each
is timed as decode steps run it, replayed from a CUDA graph over memory that does not fit in L2
(kiln.codegen.cuda.tune.graph_time_us); the per-shape linear choices are `kiln tune`'s table.
Prints a table, writes JSON.

    python benchmarks/cuda_kernels.py [--shape llama-3.1-8b] [--out FILE]
                                      [--only attention attention_mixed sampling lora]
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
from pathlib import Path

import torch
import triton

from kiln.codegen.cuda.tune import AttentionShape, attention_calls, graph_time_us
from kiln.ir.ops import OPS
from kiln.kernels.triton_kernels import attention, lora, sampling
from kiln.models.shapes import shape_config


def copy_bandwidth(nbytes: int = 4 << 30) -> float:
    """Bytes read + written per second by a device-to-device copy (median of 10)."""
    a = torch.empty(nbytes // 2, dtype=torch.uint8, device="cuda")
    b = torch.empty_like(a)
    times = []
    for _ in range(12):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        b.copy_(a)
        e.record()
        e.synchronize()
        times.append(s.elapsed_time(e) / 1e3)
    del a, b
    return nbytes / statistics.median(times[2:])


def _time(fn) -> float:
    """Median µs per call, replayed from a CUDA graph as decode steps run (no launch overhead)."""
    return graph_time_us([fn])


def _flops(seqs, q_lens, hq, d) -> float:
    return sum(4.0 * hq * d * sum(c - q + i + 1 for i in range(q)) for c, q in zip(seqs, q_lens, strict=True))


CASES = {"prefill_2048": ([2048], [2048]), "decode_b1_ctx1024": ([1024], [1]),
         "decode_b32_ctx1024": ([1024] * 32, [1] * 32), "decode_b256_ctx1024": ([1024] * 256, [1] * 256)}


def _attention_shape(cfg) -> AttentionShape:
    d = cfg.head_dim
    return AttentionShape(cfg.num_attention_heads, cfg.num_key_value_heads, d, d, torch.bfloat16,
                          (("causal", True), ("scale", d ** -0.5), ("sliding_window", None), ("softcap", None)),
                          False)


def attention_table(cfg, bw: float) -> dict:
    """The default paged-attention kernel per case against its floors (KV bytes over the copy
    bandwidth; FLOPs at 793 TFLOP/s), and torch's SDPA (flash) on the prefill's shapes."""
    hq, hkv, d = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    shape = _attention_shape(cfg)
    launch = attention.make_launcher()
    res: dict = {}
    for name, (seqs, q_lens) in CASES.items():
        calls = attention_calls(shape, seqs, q_lens)(launch)
        us = graph_time_us(calls)
        flops = _flops(seqs, q_lens, hq, d)
        row = {"us": us, "kv_floor_us": sum(seqs) * hkv * d * 2 * 2 / bw * 1e6, "flop_floor_us": flops / 793e6,
               "tflops": flops / us / 1e6}
        if name.startswith("prefill"):
            qs = torch.randn(1, hq, 2048, d, device="cuda", dtype=torch.bfloat16)
            ks = torch.randn(1, hkv, 2048, d, device="cuda", dtype=torch.bfloat16)
            vs = torch.randn_like(ks)
            sdpa = _time(lambda qs=qs, ks=ks, vs=vs: torch.nn.functional.scaled_dot_product_attention(
                qs, ks, vs, is_causal=True, enable_gqa=True))
            row |= {"torch_sdpa_us": sdpa, "sdpa_tflops": flops / sdpa / 1e6}
        res[name] = row
        print(f"attention {name:<22} {us:9.1f} us  floor {max(row['kv_floor_us'], row['flop_floor_us']):8.1f} us"
              f"  {row['tflops']:6.1f} TFLOP/s"
              + (f"  torch sdpa {row['torch_sdpa_us']:.1f} us" if "torch_sdpa_us" in row else ""), flush=True)
    return res


def mixed_step() -> tuple[list[int], list[int]]:
    """An offline-serving step (block size 16, as the runtime's default): 511 decodes over
    contexts uniform in 100..1500, then a 390-token prefill chunk at context 800."""
    g = torch.Generator().manual_seed(0)
    ctx = torch.randint(100, 1501, (511,), generator=g).tolist()
    return [*ctx, 800], [1] * 511 + [390]


def attention_mixed_table(cfg) -> dict:
    """The mixed step in the default launcher's two launches (decode_block_m tiles for the
    decodes, block_m tiles for the chunk) and in one launch of block_m tiles for all (the
    launcher before the split: decode_block_m == block_m), beside its 511 decodes alone (one
    launch of decode tiles: the floor the decodes of the mixed step can reach). KV TB/s: each
    sequence's context read once, over the kernel time."""
    shape = _attention_shape(cfg)
    per_token = shape.hkv * (shape.d + shape.dv) * shape.dtype.itemsize
    seqs, q_lens = mixed_step()
    one = attention.make_launcher(attention.AttentionConfig(decode_block_m=attention.DEFAULT_CONFIG.block_m))
    cases = {"mixed_two_launches": (seqs, q_lens, attention.make_launcher()),
             "mixed_one_launch": (seqs, q_lens, one),
             "decodes_alone": (seqs[:-1], q_lens[:-1], attention.make_launcher())}
    res: dict = {}
    for name, (ctx, q, launch) in cases.items():
        us = graph_time_us(attention_calls(shape, ctx, q)(launch))
        kv = sum(ctx) * per_token
        res[name] = {"us": us, "kv_bytes": kv, "kv_TBps": kv / us / 1e6, "tokens": sum(q), "seqs": len(ctx)}
        print(f"attention {name:<22} {us:9.1f} us  KV {kv / 1e9:6.2f} GB at {kv / us / 1e6:5.2f} TB/s", flush=True)
    res["speedup"] = res["mixed_one_launch"]["us"] / res["mixed_two_launches"]["us"]
    print(f"attention mixed step: two launches {res['speedup']:.2f}x the single launch", flush=True)
    return res


def sampling_table(vocab: int) -> dict:
    """The greedy rows of the sampler's kernel at batch 1, 32 and 256, per vocabulary chunk and warps."""
    res: dict = {}
    for b in (1, 32, 256):
        x = torch.randn(b, vocab, device="cuda")
        fp, ip = sampling.pack_params([[0.0, 1, 0, 0, 1, 0]] * b,
                                      [[0, 0, 0, sampling.MODE_GREEDY, -1, 0, 0]] * b, torch.device("cuda"))
        for block, warps in itertools.product((1024, 2048, 4096), (4, 8, 16)):
            us = _time(lambda x=x, fp=fp, ip=ip, block=block, warps=warps: sampling.sample_rows(
                x, fp, ip, block=block, num_warps=warps))
            res[f"b{b}_block{block}_w{warps}"] = us
            print(f"sample greedy b={b:<4} block {block:<5} warps {warps:<3} {us:8.1f} us", flush=True)
    return res


def _lora_case(k: int, n: int, t: int, slots: int, rank: int) -> tuple[float, float, int]:
    """(kernel us, reference us, floor bytes) of one lora shape, going round copies of the slot
    stacks that together pass the L2 (a step's 224 lora calls read theirs from memory)."""
    slot_bytes = rank * (k + n) * 2
    stacks = [(torch.randn(slots, rank, k, device="cuda").to(torch.bfloat16),
               torch.randn(slots, n, rank, device="cuda").to(torch.bfloat16))
              for _ in range(-(-(256 << 20) // (slots * slot_bytes)))]
    x = torch.randn(t, k, device="cuda").to(torch.bfloat16)
    index = (torch.arange(t, device="cuda") % slots).to(torch.int32)  # token i on slot i % slots
    base = torch.randn(t, n, device="cuda").to(torch.bfloat16)  # the linear's result, as the lora pass emits
    y = torch.empty_like(base)
    kiln_us = graph_time_us([lambda a=a, b=b: lora.lora(y, x, a, b, index, base) for a, b in stacks])
    ref_us = graph_time_us([lambda a=a, b=b: OPS["lora"].impl(x, a, b, index, base) for a, b in stacks])
    return kiln_us, ref_us, min(t, slots) * slot_bytes + x.nbytes + base.nbytes + y.nbytes


def lora_table(cfg, bw: float, slots: int = 8, rank: int = 16) -> dict:
    """The lora kernel and the op's torch reference in bfloat16 at batch 1, 32 and 256 for the
    q/o (N hidden) and gate/up (N intermediate) shapes; the floor reads each used slot, x and
    base once and writes y."""
    res: dict = {}
    k = cfg.hidden_size
    for n, t in itertools.product((cfg.hidden_size, cfg.intermediate_size), (1, 32, 256)):
        kiln_us, ref_us, nbytes = _lora_case(k, n, t, slots, rank)
        floor_us = nbytes / bw * 1e6
        res[f"n{n}_t{t}"] = {"us": kiln_us, "reference_us": ref_us, "floor_us": floor_us}
        print(f"lora k={k} n={n:<6} t={t:<4} {kiln_us:7.1f} us  reference {ref_us:7.1f} us  floor {floor_us:5.1f} us",
              flush=True)
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", default="llama-3.1-8b")
    ap.add_argument("--out", default="benchmarks/results/cuda-kernels.json")
    ap.add_argument("--only", nargs="+", choices=("attention", "attention_mixed", "sampling", "lora"),
                    default=("attention", "attention_mixed", "sampling", "lora"), help="the tables to run")
    a = ap.parse_args()
    bw = copy_bandwidth()
    cfg = shape_config(a.shape)
    tables = {"attention": ("attention", lambda: attention_table(cfg, bw)),
              "attention_mixed": ("attention_mixed", lambda: attention_mixed_table(cfg)),
              "sampling": ("sampling_greedy_us", lambda: sampling_table(128256)),
              "lora": ("lora", lambda: lora_table(cfg, bw))}
    report = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
              "copy_bandwidth_GBps": bw / 1e9, "shape": a.shape}
    report |= {key: table() for name, (key, table) in tables.items() if name in a.only}
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
