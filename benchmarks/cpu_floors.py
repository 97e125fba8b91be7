"""kiln's cpu target against this machine's limits: per-kernel time beside its floor, and the
load time and resident memory of an artifact. Used by benchmarks/cpu.py; alone:

    python benchmarks/cpu_floors.py ARTIFACT [--threads N]

- machine(): memory bandwidth, the better of a large copy (a 256 MiB float32 tensor copied:
  bytes read plus bytes written over the time) and a large read (its sum: the traffic of a
  GEMV, which streams weights and writes little), and fp32 peak from a large matmul (2048^3,
  torch.mm), best of 5 each, on every core the process may use (torch's threads raised for the
  measurement: the engine keeps torch at one thread on the cpu target, and one core's rates
  are about half the machine's); measured again before each model's kernel table, keeping the
  best (others' load lowers a measurement).
- kernel_floors(): every plan step of a cpu-target engine timed (perf_counter around the call
  the executor makes, its bound TVM call where it has one, through PlanExecutor.step_timer:
  TVM and torch kernels return when done on the CPU) during batch-1 decode steps at a
  64-token context and during one 512-token prefill, aggregated by kernel id: calls, ms per
  step, bytes moved, FLOPs, floor = max(bytes / bandwidth, FLOPs / peak) and time / floor.
  Bytes count each operand once (weights, activations, outputs); paged attention reads the K/V
  of its context (not the whole cache), the cache write and row gathers move their rows.
- load_stats(): CompiledModel load time and RSS right after it (anonymous vs file-backed: the
  weights are views of the artifact's mapped safetensors, so they are file pages, not copies),
  in a fresh process, with and without content verification (which reads every byte).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch


def _best(fn, reps: int = 5) -> float:
    fn()
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def machine(before: dict | None = None) -> dict:
    """Measured memory bandwidth (GB/s) and fp32 matmul peak (GFLOP/s) on every core this
    process may use; with `before` (an earlier measurement), the better of the two each: a
    machine that others load measures low, and a floor is the best the machine has shown."""
    from kiln.runtime.threads import available_cores

    threads = torch.get_num_threads()
    torch.set_num_threads(available_cores())
    try:
        a = torch.rand(64 << 20)  # 256 MiB
        b = torch.empty_like(a)
        copy = 2 * a.nbytes / _best(lambda: b.copy_(a)) / 1e9
        read = a.nbytes / _best(lambda: a.sum()) / 1e9
        x, y = torch.rand(2048, 2048), torch.rand(2048, 2048)
        peak = 2 * 2048**3 / _best(lambda: torch.mm(x, y)) / 1e9
        cores = torch.get_num_threads()
    finally:
        torch.set_num_threads(threads)
    bw = max(copy, read)
    if before:
        bw, peak = max(bw, before["bandwidth_gb_s"]), max(peak, before["fp32_gflop_s"])
    return {"bandwidth_gb_s": bw, "copy_gb_s": copy, "read_gb_s": read, "fp32_gflop_s": peak, "threads": cores}


def _cost(kernel: str, outs: list, args: list) -> tuple[int, int]:
    """(bytes moved, FLOPs) of one step from its operands. A TVM kernel's name starts with its op
    (kiln.kernels.tvm_kernels.name_of); a torch kernel id is the op."""
    name = kernel.split(":", 1)[1]
    ts = [t for t in args if isinstance(t, torch.Tensor)]
    out_bytes = sum(t.nbytes for t in outs)
    if name.startswith("paged_attention"):
        q, kc, vc, _, seq_lens, cu = args[:6]
        ctx = seq_lens.long()
        q_len = (cu[1:] - cu[:-1]).long()
        keys = int((q_len * (ctx - q_len) + q_len * (q_len + 1) // 2).sum())  # causal rows' keys
        kv_row = (kc[0, 0].numel() + vc[0, 0].numel()) * kc.element_size()
        hq, d, dv = q.shape[1], q.shape[2], vc.shape[-1]
        return q.nbytes + out_bytes + int(ctx.sum()) * kv_row, 2 * keys * hq * (d + dv)
    if name.startswith("kv_cache_write"):
        return 2 * (args[0].nbytes + args[1].nbytes) + args[4].nbytes, 0
    if name.startswith(("embedding", "gather_rows")):
        return 2 * out_bytes + sum(t.nbytes for t in ts[1:]), 0
    if name.startswith("linear"):
        x, w = args[0], args[1]
        return sum(t.nbytes for t in ts) + out_bytes, 2 * (x.numel() // x.shape[-1]) * w.numel()
    if name.startswith("quantized_linear"):  # 2 FLOPs a weight a row; the weight's size from x and y
        x, y = args[0], outs[0]
        return sum(t.nbytes for t in ts) + out_bytes, 2 * (x.numel() // x.shape[-1]) * x.shape[-1] * y.shape[-1]
    if name.startswith("lora"):  # the slots its tokens use, not every slot; R * (K + N) FMAs a token
        x, a, b, index = args[:4]
        live = index[(index >= 0) & (index < a.shape[0])]
        return (x.nbytes + index.nbytes + out_bytes + int(live.unique().numel()) * (a[0].nbytes + b[0].nbytes),
                2 * live.numel() * (a[0].numel() + b[0].numel()))
    return sum(t.nbytes for t in ts) + out_bytes, sum(t.numel() for t in outs)


class _Timer:
    """An executor's step timer (PlanExecutor.step_timer): while `on`, adds each step's time and
    cost per kernel id. The executor times the call it really makes (the bound TVM call where it
    has one, else the launcher), so a small kernel reads its own time, not a launcher's."""

    def __init__(self, executor) -> None:
        self.executor = executor
        self.kernels = [step.kernel for step in executor.plan.steps]  # kernel id per plan step
        self.rows: dict[str, list[float]] = defaultdict(lambda: [0, 0.0, 0, 0])  # calls, s, bytes, flops

    @property
    def on(self) -> bool:
        return self.executor.step_timer is not None

    @on.setter
    def on(self, value: bool) -> None:
        self.executor.step_timer = self._record if value else None

    def _record(self, s: int, outs, args, dt: float) -> None:
        kernel = self.kernels[s]
        nbytes, flops = _cost(kernel, outs, args)
        row = self.rows[kernel]
        row[0] += 1
        row[1] += dt
        row[2] += nbytes
        row[3] += flops


def kernel_floors(artifact: Path, limits: dict, threads: int | None = None, decode_steps: int = 8) -> dict:
    """{"decode_b1": table, "prefill_512": table}: per kernel id, per step, its time beside its
    floor under `limits` (machine()); rows sorted by time."""
    from kiln import SamplingParams
    from kiln.runtime.engine import LLMEngine

    engine = LLMEngine(artifact, max_num_seqs=8, max_num_batched_tokens=1024, enable_prefix_caching=False,
                       threads=threads)
    timer = _Timer(engine.model.executor)
    vocab = engine.model.vocab_size
    params = SamplingParams(temperature=0, max_tokens=decode_steps + 3, ignore_eos=True)
    ids = torch.randint(10, vocab, (600,), generator=torch.Generator().manual_seed(7)).tolist()
    prefill = min(512, engine.max_model_len - decode_steps - 4)
    out = {}
    for what, prompt, steps in (("decode_b1", ids[:64], decode_steps), (f"prefill_{prefill}", ids[:prefill], 1)):
        for _ in range(2):  # a warm-up pass, then the measured one
            timer.rows.clear()
            engine.add_request(None, {"prompt_token_ids": prompt}, params)
            if what.startswith("decode"):
                engine.step()  # the prompt
            timer.on = True
            for _ in range(steps):
                engine.step()
            timer.on = False
            while engine.has_unfinished_requests():
                engine.step()
        out[what] = _table(timer.rows, steps, limits)
    return out


def _table(rows: dict, steps: int, limits: dict) -> dict:
    bw, peak = limits["bandwidth_gb_s"] * 1e9, limits["fp32_gflop_s"] * 1e9
    table = {}
    for kernel, (calls, s, nbytes, flops) in sorted(rows.items(), key=lambda kv: -kv[1][1]):
        floor = max(nbytes / bw, flops / peak)
        table[kernel] = {"calls": calls // steps, "ms": 1e3 * s / steps, "floor_ms": 1e3 * floor / steps,
                         "x_floor": s / floor if floor else None, "mb": nbytes / steps / 1e6,
                         "gflop": flops / steps / 1e9, "bound": "memory" if nbytes / bw >= flops / peak else "compute"}
    total = sum(r["ms"] for r in table.values())
    floor = sum(r["floor_ms"] for r in table.values())
    return {"total_ms": total, "floor_ms": floor, "x_floor": total / floor if floor else None, "kernels": table}


LOAD = """
import json, resource, sys, time
t = time.perf_counter()
from kiln.runtime.model import CompiledModel
m = CompiledModel(sys.argv[1], verify=sys.argv[2] == "1")
dt = time.perf_counter() - t
status = dict(line.split(":", 1) for line in open("/proc/self/status") if line.startswith(("VmRSS", "RssAnon", "RssFile")))
print(json.dumps({"load_s": dt, **{k: int(v.split()[0]) / 1024 for k, v in status.items()}}))
"""


def load_stats(artifact: Path) -> dict:
    """Load time (s, imports included) and RSS (MiB: total, anonymous, file-backed) after
    CompiledModel(artifact) in a fresh process, verified and not (median of 3)."""
    out = {}
    for verify in (True, False):
        runs = [json.loads(subprocess.run([sys.executable, "-c", LOAD, str(artifact), str(int(verify))], check=True,
                                          capture_output=True, text=True).stdout.splitlines()[-1]) for _ in range(3)]
        out["verified" if verify else "unverified"] = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
    return out


def format_floors(name: str, floors: dict, top: int = 8) -> str:
    """A text table of kernel_floors' result."""
    lines = []
    for what, t in floors.items():
        if "kernels" not in t:
            continue
        lines.append(f"{name} {what}: {t['total_ms']:.2f} ms of kernels per step, floor {t['floor_ms']:.2f} ms "
                     f"({t['x_floor']:.1f}x)")
        for k, r in list(t["kernels"].items())[:top]:
            lines.append(f"  {k[:58]:58} {r['calls']:3d}x {r['ms']:8.3f} ms  floor {r['floor_ms']:7.3f} ms "
                         f"{r['x_floor'] or 0:6.1f}x  {r['bound']}")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("artifact", type=Path)
    ap.add_argument("--threads", type=int, default=None)
    a = ap.parse_args()
    limits = machine()
    print(json.dumps(limits))
    print(format_floors(a.artifact.name, kernel_floors(a.artifact, limits, a.threads)))
    print(json.dumps(load_stats(a.artifact)))


if __name__ == "__main__":
    main()
