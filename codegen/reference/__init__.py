"""The reference target: every op runs its IR torch implementation, in plan order."""

from __future__ import annotations

from kiln.codegen.memory_plan import plan_memory
from kiln.ir.graph import Graph
from kiln.runtime.plan import ExecutionPlan, Step

TARGET = "reference"


def lower(graph: Graph) -> ExecutionPlan:
    """The execution plan of a (pass-processed, weight-folded) graph."""
    mem = plan_memory(graph)
    steps: list[Step] = []
    inputs: dict[str, int] = {}
    params: dict[str, int] = {}
    consts = []
    for n in graph.nodes:
        s = mem.slot[n]
        if n.op == "input":
            inputs[n.name] = s
        elif n.op == "param":
            params[n.name] = s
        elif n.op == "const":
            consts.append((s, n.attrs["value"], n.type.dtype, list(n.type.shape)))
        else:
            steps.append(Step(f"torch:{n.op}", [mem.slot[x] for x in n.inputs], s, dict(n.attrs),
                              [mem.slot[x] for x in mem.free_after[n]]))
    return ExecutionPlan(
        target=TARGET,
        num_slots=len(mem.slot_bytes),
        inputs=inputs,
        params=params,
        consts=consts,
        steps=steps,
        outputs=[mem.slot[o] for o in graph.outputs],
        input_types={n.name: (n.type.dtype, list(n.type.shape)) for n in graph.inputs},
        slot_bytes=mem.slot_bytes,
    )
