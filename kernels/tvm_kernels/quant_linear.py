"""quantized_linear over canonical packed integer weights (ir/ops/quant.py), weight-only or
with int8 activations (W8A8 / W4A8):

    x [M, K]   qweight uint8 [N, K * bits / 8]   scales [N, G]   zeros uint8 [N, G] (optional)
    g_idx int32 [K] (optional)   offsets float [N, G] (optional, in place of zeros and g_idx)
    w[n, k] = dtype(float32(q[n, k] - z[n, g(k)]) * scales[n, g(k)])   g(k) = g_idx[k] or k // group
              (z: 2^(bits-1) without zeros; bits 4: byte j holds k = 2j in its low nibble, 2j + 1
              in its high one)
    w[n, k] = dtype(float32(q[n, k]) * scales[n, g(k)] + offsets[n, g(k)])   with offsets (Q4_1)
    y [M, N] = x @ w^T (+ bias), accumulated in float32, rounded once to y's dtype

fp8 weights and fp8 activations are not built here: those nodes run the op's torch reference
(the cpu lowering lists them as fallbacks).

Schedule, two stages (quant_linear_paths.py holds their loops):

    stage: each row of x once into a float32 scratch XQ [M, K] (with act "int8" through
        quant_act's rounding: max |x| / 127 per row, the reference's values exactly); bits 4
        stores each chunk of v channels as two planes, the even channels then the odd ones,
        the order of a packed byte's low and high nibbles. Serial below pm rows, else parallel.
    tasks: one parallel loop over blocks of nb output columns; each task serves every row:

    narrow (M < pm: decode steps, and the rows the wide path leaves): tiles of mt rows x nj
        columns, then lone rows x nj1 columns; the packed rows streamed once per tile:

            for each group g:                     (float32 without g_idx; else per chunk)
              part[i, j, :] = 0
              for each chunk of v channels:       q: v bytes (bits 8) or v / 2 (bits 4, two planes)
                w[j, :] = float32(q[n0 + j, chunk] - z[n0 + j, g])        no scale: hoisted
                part[i, j, :] += XQ[m0 + i, chunk] * w[j, :]               lanes of float32
              acc[i, j, :] += scales[n0 + j, g] * part[i, j, :]
            y[m0 + i, n0 + j] = sum of acc[i, j, :]

        bits 4 in chunks of 32 channels on AVX-512 (lut) takes w from a table instead: per
        group and column the 16 values (c - z) * scale (c * scale + offset), rounded to the dtype as the reference
        rounds, in one register; each byte's two nibbles index it by vpermps (2 instructions
        for 32 weights in place of and / shift, 2 subtracts, 2 conversions), part added
        unscaled. 16-bit dtypes, offsets and act-order g_idx otherwise dequantize each weight as
        the reference does (g_idx's scale and zero gathered per channel), part added unscaled.
        A lone row's default is one column at a time: the task's packed rows then stream from
        memory as one run (8 interleaved rows of 384 bytes, too short for the prefetcher: int4
        k768 n4096 180 vs 130 us a call on one core).
    wide (M >= pm, prefill): the task's nb columns dequantized once into a panel P [K, nb]
        float32 (rows in XQ's channel order), then register tiles acc[mr, nb] of y: per
        channel one broadcast of XQ[m, k] against the panel's row, as linear.py's wide path.

Knobs (`KNOBS`, searched by `kiln tune`): nb, nj, nj1, v, mt, mr, pm and ser (the most KiB of
packed weight x rows run on the calling thread, no fork and join of TVM's pool).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping

import tvm

from kiln.kernels.tvm_kernels import (
    AS_IS,
    FLOATS,
    MAT,
    Kernel,
    OpInfo,
    keep_params,
    name_of,
    short,
    vec_width,
)
from kiln.kernels.tvm_kernels.quant_linear_paths import Spec, prim_func
from kiln.kernels.tvm_kernels.tir import F32

KNOBS = {"quantized_linear": {"nb": (8, 16, 32, 64), "nj": (1, 2, 4, 8), "nj1": (2, 4, 8, 16), "v": (8, 16, 32, 64),
                              "mt": (1, 2, 4, 8), "mr": (4, 6, 8, 12), "pm": (8, 16, 32, 64),
                              "ser": (0, 64, 256, 1024), "lut": (0, 1)}}
"""The search space: output columns per task and per wide register tile (nb), per narrow tile
of mt rows (nj) and per lone row (nj1); input channels per chunk (v: divides the group size and
K, even for bits 4); rows per narrow tile (mt), per wide register tile (mr), fewest rows that
take the wide path (pm); serial bound in KiB (ser); bits 4 in 16-lane chunks: a group's values
looked up by vpermps (lut 1, AVX-512 only) or computed per weight (lut 0). A value that does not divide the shape is no
schedule of it."""


@functools.cache
def host_avx512() -> bool:
    """Whether this machine's processor has AVX-512 (the kernels are built for it)."""
    from tvm.target import codegen

    target = tvm.target.Target({"kind": "llvm", "mcpu": codegen.llvm_get_system_cpu()})
    return "avx512f" in {str(f) for f in codegen.llvm_get_cpu_features(target)}


def _block(n: int, widest: int) -> int:
    b = widest
    while b > 1 and n % b:
        b //= 2
    return b


def default_config(k: int, n: int, group: int, bits: int) -> dict[str, int]:
    """The schedule built without tuning: 32 columns per task (an 8 x 32 wide register tile:
    16 zmm of accumulators, as linear.py's), 16 float32 lanes per chunk (16 bytes of bits 8, 16
    bytes = 32 channels of bits 4), narrow tiles of 4 rows x 2 columns, lone rows 8 columns at a
    time for bits 8 (independent chains: a group of K channels is one sum) and 1 for bits 4 (one
    stream of packed rows), the wide path from 32 rows on, the table lookup where AVX-512 is."""
    lanes = 16 if bits == 8 else 32
    nb = _block(n, 32)
    return {"nb": nb, "nj": min(2, nb), "nj1": min(8 if bits == 8 else 1, nb), "v": vec_width(math.gcd(k, group), lanes),
            "mt": 4, "mr": 8, "pm": 32, "ser": 256, "lut": int(host_avx512())}


def resolve(k: int, n: int, group: int, bits: int, config: Mapping[str, int] | None,
            act_order: bool = False) -> dict[str, int] | None:
    """The full config of this shape (defaults for missing knobs), or None when a value does not
    divide it (with act_order, a chunk of v channels need not lie in one group)."""
    c = default_config(k, n, group, bits)
    c.update({key: int(v) for key, v in (config or {}).items() if key in c})
    c.update({key: min(c[key], c["nb"]) for key in ("nj", "nj1") if key not in (config or {})})
    ok = n % c["nb"] == 0 and c["nb"] % c["nj"] == 0 and c["nb"] % c["nj1"] == 0 and k % c["v"] == 0 \
        and (act_order or group % c["v"] == 0) and (bits == 8 or c["v"] % 2 == 0) \
        and (not c["lut"] or host_avx512())
    return c if ok and c["ser"] >= 0 and min(v for key, v in c.items() if key not in ("ser", "lut")) >= 1 else None


def quantized_linear(info: OpInfo, config: Mapping[str, int] | None = None) -> Kernel | None:
    """The kernel of an int4 / int8 quantized_linear node, weight-only or with int8 activations
    (schedule `config`, None: the default); None for the nodes it does not cover. A config
    that does not divide the shape is a ValueError."""
    a = info.attrs
    if a.get("format") != "int" or a.get("act") not in ("none", "int8") or a.get("bits") not in (4, 8):
        return None
    x, qweight, scales = info.inputs[:3]
    rest = list(info.inputs[3:])
    zeros = rest.pop(0) if a["has_zeros"] else None
    offsets = rest.pop(0) if a.get("has_offsets") else None
    g_idx = rest.pop(0) if a["has_g_idx"] else None
    bias = rest.pop(0) if a["has_bias"] else None
    if g_idx is not None and (g_idx.dtype != "int32" or g_idx.rank != 1):
        return None
    if x is None or x.dtype not in FLOATS or scales is None or scales.dtype not in FLOATS:
        return None
    if bias is not None and bias.dtype not in FLOATS or offsets is not None and offsets.dtype not in FLOATS:
        return None
    bits, n, kp = a["bits"], *qweight.shape
    if not isinstance(n, int) or not isinstance(kp, int):
        return None
    k = kp * 8 // bits
    group = a["group_size"]
    g = scales.shape[1]
    if not isinstance(group, int) or not isinstance(g, int) or g_idx is None and (k % group or g != k // group):
        return None
    c = resolve(k, n, group, bits, config, g_idx is not None)
    if c is None:
        raise ValueError(f"quantized_linear k={k} n={n} group={group}: config {dict(config or {})} does not divide "
                         "the shape")
    bdt = bias.dtype if bias is not None else F32
    odt = offsets.dtype if offsets is not None else F32
    act = a["act"] == "int8"
    spec = Spec(k, n, group, g, bits, x.dtype, scales.dtype, bdt, odt, zeros is not None, offsets is not None,
                g_idx is not None, bias is not None, act)
    name = name_of("quantized_linear", f"k{k}n{n}", f"int{bits}", f"g{group}" if g_idx is None else f"gidx{g}",
                   "z" if zeros is not None else "", f"o{short(odt)}" if offsets is not None else "",
                   "a8" if act else "", short(x.dtype), f"s{short(scales.dtype)}",
                   f"b{short(bdt)}" if bias is not None else "")
    present_ops = (zeros, offsets, g_idx, bias)
    keep = (0, 1, 2, *(3 + i for i, t in enumerate(present_ops) if t is not None), 7)
    ins = tuple(range(len(info.inputs)))  # x, qweight, scales[, zeros][, offsets][, g_idx][, bias]: every op input
    present = (MAT, *(AS_IS,) * (len(ins) - 1), MAT)
    return Kernel(name, keep_params(prim_func(spec, c), keep), ins, (0,), present)


BUILDERS = {"quantized_linear": quantized_linear}
