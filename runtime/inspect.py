"""`kiln inspect`: a human-readable summary of an artifact."""

from __future__ import annotations

from pathlib import Path

from kiln.ir.cost import NOMINAL, kernel_coverage
from kiln.ir.graph import Graph, Node
from kiln.ir.ops.quant_linear import packed_bytes
from kiln.ir.serialize import loads
from kiln.ir.types import TensorType
from kiln.runtime.artifact import GRAPH, read_json, read_manifest, verify_hashes
from kiln.runtime.kernel_binaries import BUILD_INFO
from kiln.runtime.tvm_library import BUILD_INFO as CPU_BUILD_INFO
from kiln.runtime.tvm_library import fixed_symbols

DEQUANT_OPS = ("dequant_int", "dequant_int_offset", "dequant_fp8")
"""Dequantizations of packed params (kiln.ir.ops.quant) that run at every call."""


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} GiB"


def _kernels(root: Path, m: dict) -> list[str]:
    """The compiled kernels' line of a cuda or cpu artifact: what they were built for, or that
    they are missing."""
    if m["target"] == "cpu" and CPU_BUILD_INFO in m["files"]:
        b = read_json(root, CPU_BUILD_INFO)
        fixed = fixed_symbols(b, str(root))
        blocks = f"; KV blocks of {fixed['BS']} tokens only" if "BS" in fixed else ""
        return [f"kernels    {len(b['kernels'])} TVM functions for {b.get('mcpu')} ({b.get('triple')}), "
                f"TVM {b.get('tvm')}{blocks}"]
    if m["target"] != "cuda":
        return []
    if BUILD_INFO not in m["files"]:
        return [f"kernels    none built (compiled without a GPU): run `kiln tune {root}` on the GPU that will serve it"]
    b = read_json(root, BUILD_INFO)
    return [f"kernels    {b.get('variants')} Triton variants for {b.get('arch')} ({b.get('gpu')}), Triton "
            f"{b.get('triton')}, torch {b.get('torch')}; {b.get('graphs')} decode CUDA graphs at load"]


def _quant_format(attrs: dict, k: object) -> str:
    """A quantized matmul's weight format in words: int4 group 128 zeros act-order, int4 group 32
    offsets, fp8 blocks 128x128, with its activation quantization."""
    if attrs["format"] == "int":
        group = "per-channel" if attrs["group_size"] == k else f"group {attrs['group_size']}"
        offsets = "offsets" if attrs.get("has_offsets") else "symmetric"
        words = [f"int{attrs['bits']}", group, "zeros" if attrs["has_zeros"] else offsets]
        words += ["act-order"] if attrs["has_g_idx"] else []
    else:
        words = ["fp8 e4m3", f"blocks {attrs['block_n']}x{attrs['block_k']}"]
    return " ".join(words) + ("" if attrs["act"] == "none" else f", act {attrs['act']}")


def _dequant_format(n: Node) -> str:
    """The format of a packed weight that no quantized_linear reads (a linear dequantizes it every
    call: a weight the quantized-linear pass did not run on, say), in words."""
    a = n.attrs
    if n.op == "dequant_fp8":
        return f"fp8 e4m3 blocks {a['block_n']}x{a['block_k']}, unfused"
    group = "per-channel" if a["group_size"] == n.type.shape[1] else f"group {a['group_size']}"
    kind = "offsets" if n.op == "dequant_int_offset" else "zeros" if any(i.type.rank == 2 for i in n.inputs[2:]) \
        else "symmetric"
    return f"int{a['bits']} {group} {kind}, unfused"


def quantized_matmuls(graph: Graph) -> list[str]:
    """The quantized matmuls' lines: how many, their packed bytes against the dense weights they
    replace, then one line per format and weight shape [N, K] with its count and bytes each.
    A packed weight that a plain linear reads through its dequant op counts as one too."""
    kinds: dict[tuple[str, str], list[int]] = {}
    dense = 0
    for n in graph.nodes:
        if n.op == "quantized_linear":
            types = [i.type for i in n.inputs]
            k, rows = types[0].shape[-1], types[1].shape[0]
            key, packed = (_quant_format(n.attrs, k), f"[{rows}, {k}]"), packed_bytes(types, n.attrs)
        elif n.op in DEQUANT_OPS:
            rows, k = n.type.shape
            key, packed = (_dequant_format(n), f"[{rows}, {k}]"), sum(i.type.nbytes({}) for i in n.inputs)
        else:
            continue
        kinds.setdefault(key, [0, packed])[0] += 1
        dense += TensorType(n.attrs["dtype"], (rows, k)).nbytes({})
    if not kinds:
        return []
    count = sum(c for c, _ in kinds.values())
    total = sum(c * b for c, b in kinds.values())
    return [
        f"quantized  {count} matmuls, {_human(total)} of packed weights (dense: {_human(dense)})",
        *(f"  {fmt:42s} {shape:13s} x{c:<4d} {_human(b)} each" for (fmt, shape), (c, b) in kinds.items()),
    ]


def describe(path: str | Path, verify: bool = False) -> tuple[str, bool]:
    """Summary text (model, target, ops by kind, kernel-set coverage, parameters, passes,
    fallbacks, files) and whether every content hash matched (True when not verifying)."""
    m = read_manifest(path)
    graph = loads((Path(path) / GRAPH).read_text())
    cov = kernel_coverage(graph)
    model = m["model"]
    lines = [
        f"artifact   {Path(path)}",
        f"model      {model['model_type']} ({', '.join(model.get('architectures') or []) or '?'}), vocab {model['vocab_size']}",
        f"target     {m['target']}   dtype {m['dtype']}   format v{m['format_version']}   kiln {m['kiln_version']}",
        f"parameters {m['parameters']['elements']:,} in {m['parameters']['tensors']} tensors ({_human(m['parameters']['bytes'])})",
        f"compiled   in {m.get('compile_seconds')} s from {m['source']['path']}",
        "ops (kernel: count)",
        *(f"  {k:28s} {v}" for k, v in m["ops"].items()),
        f"kernel set {cov.flop_share:.2%} of FLOPs (a {NOMINAL['T']}-token step), "
        f"{cov.weight_share:.2%} of weight bytes",
        "other ops  " + (", ".join(f"{k} {v}" for k, v in cov.other_ops.most_common()) or "none"),
        *quantized_matmuls(graph),
        "passes",
        *(
            f"  {i:2d}. {p['pass']:22s} {p['nodes']:5d} ops"
            + (f"   verified, max rel err {p['max_rel_error']:.1e}" if "max_rel_error" in p else "")
            for i, p in enumerate(m["passes"], 1)
        ),
        "fallbacks  " + (", ".join(m["fallbacks"]) if m["fallbacks"] else "none"),
        *_kernels(Path(path), m),
        f"files      {len(m['files'])}, {_human(sum(f['size'] for f in m['files'].values()))}",
    ]
    bad = verify_hashes(path) if verify else []
    if verify:
        lines.append("hashes     " + ("all match" if not bad else f"MISMATCH: {', '.join(bad)}"))
    return "\n".join(lines), not bad
