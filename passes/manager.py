"""The PassManager: runs a pipeline, verifies after every pass, dumps IR, checks numerics."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

from tqdm.auto import tqdm

from kiln.errors import VerifyError
from kiln.ir.graph import Graph
from kiln.ir.interpreter import WeightFn
from kiln.ir.printer import print_graph
from kiln.ir.verifier import verify
from kiln.passes.base import Pass
from kiln.passes.differential import check_equivalent

log = logging.getLogger(__name__)


@dataclass
class PassManager:
    """Runs passes in order. After each: the verifier (always), the IR text into dump_dir
    (NN-name.ir), and with check_numerics a differential run against the previous graph."""

    passes: list[Pass]
    dump_dir: Path | None = None
    check_numerics: bool = False
    weights: WeightFn | None = None
    report: list[dict] = field(default_factory=list)

    def run(self, graph: Graph) -> Graph:
        verify(graph)
        self._dump(0, "input", graph)
        for i, p in enumerate(tqdm(self.passes, desc="passes", unit="pass", leave=False, disable=None), 1):
            new = p.apply(graph)
            try:
                verify(new)
            except VerifyError as e:
                raise VerifyError(f"after pass '{p.name}': {e}") from None
            self._dump(i, p.name, new)
            entry = {"pass": p.name, "nodes": len(new.ops())}
            if self.check_numerics and p.exact:
                if self.weights is None:
                    raise ValueError("check_numerics needs weights")
                entry["max_rel_error"] = check_equivalent(p.name, graph, new, self.weights)
            self.report.append(entry)
            log.info("pass %s: %d ops", p.name, entry["nodes"])
            graph = new
        return graph

    def _dump(self, i: int, name: str, graph: Graph) -> None:
        if self.dump_dir is not None:
            self.dump_dir.mkdir(parents=True, exist_ok=True)
            (self.dump_dir / f"{i:02d}-{name}.ir").write_text(print_graph(graph))
