"""The cpu target's tuning table (`tuning.json` in the artifact, written by `kiln tune`) and how
a build applies it.

    {"format": 1, "target": "cpu",
     "host": {"tvm", "triple", "mcpu", "cores"},     the machine it was tuned on
     "threads": 2,                                   TVM worker threads while timing
     "buckets": {"decode": {"rows": 1, "max_rows": 16}, "prefill": {"rows": 512}},
     "kernels": {"<function name>": {
         "op": "linear", "calls": 10,                op; plan steps that call it
         "decode":  {"config": {...}, "default_us": 41.0, "tuned_us": 30.2, "tried": 12},
         "prefill": {"config": {...}, "default_us": 900.0, "tuned_us": 610.5, "tried": 12}}}}

A config is a kernel builder's knob values (kiln.kernels.tvm_kernels: `KNOBS`); {} is the
default schedule. A bucket is timed at `rows` tokens and serves calls of at most `max_rows` rows
(the last bucket: every other call). One function per kernel keeps the plan's name and takes the
prefill config; when decode wants another config, a second function `<name>__decode` is built
with it and the first one's launch record routes small calls to it (`by_rows`), so the plan
and the runtime's loader stay as they are.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

from kiln.kernels import tvm_kernels
from kiln.kernels.tvm_kernels import Kernel

FORMAT = 1
"""tuning.json's format version."""

BUCKETS: dict[str, dict[str, int]] = {
    "decode": {"rows": 1, "max_rows": 16},
    "prefill": {"rows": 512},
}
"""Shape buckets of the token count: decode steps (a batch of at most 16 sequences) and prefill."""

DECODE_SUFFIX = "__decode"


def _rebuilt(kernel: Kernel, config: Mapping[str, Any]) -> Kernel:
    if not config or kernel.info is None:
        return kernel
    k = tvm_kernels.build(kernel.info, config)
    if k is None or k.name != kernel.name:
        raise ValueError(
            f"tuning.json's config {dict(config)} does not rebuild kernel '{kernel.name}'"
        )
    return k


def apply(kernels: Sequence[Kernel], table: Mapping[str, Any] | None) -> list[Kernel]:
    """The kernels to compile with `table`'s configs: each tuned kernel rebuilt with its prefill
    config, plus its decode function where that config differs; the rest as they are."""
    entries = (table or {}).get("kernels", {})
    out: list[Kernel] = []
    for k in kernels:
        entry = entries.get(k.name)
        if not entry or k.info is None:
            out.append(k)
            continue
        decode = entry.get("decode", {}).get("config") or {}
        prefill = entry.get("prefill", {}).get("config") or {}
        main = _rebuilt(k, prefill)
        if decode == prefill:
            out.append(main)
            continue
        small = dataclasses.replace(_rebuilt(k, decode), name=k.name + DECODE_SUFFIX)
        out += [
            dataclasses.replace(main, by_rows=((BUCKETS["decode"]["max_rows"], small.name),)),
            small,
        ]
    return out
