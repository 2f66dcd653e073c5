"""``cost``: attach the target backend's cost table (latency, bytes, energy per bits) to every expert."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from ..ir.graph import Graph
from .infra.base import Pass, PassContext, PassError, PassResult


@dataclass(frozen=True)
class CostOptions:
    # the expert dispatch the compile emits (--dispatch), for targets whose table depends on it (ort-cpu
    # measures --dispatch kernel's node only for a kernel compile); None: the target's default
    dispatch: str | None = None


class CostPass(Pass):
    name = "cost"
    provides = ("cost",)
    Options = CostOptions
    description = "annotate each expert with the target's cost table rows (cost[target][bits])"

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        if ctx.backend is None:
            raise PassError("pass 'cost' needs a target backend (--target)")
        extra = {"dispatch": self.options.dispatch} if self.options.dispatch is not None else {}
        table = ctx.backend.cost_table(graph, progress=ctx.progress, **extra)
        for node in graph.experts():
            if node.id not in table:
                raise PassError(f"backend {ctx.backend.name!r} gave no cost for expert {node.id!r}")
            rows = {b: dataclasses.asdict(r) for b, r in table[node.id].items()}
            merged = dict(node.ann.get("cost", {}))
            merged[ctx.backend.name] = rows
            graph.annotate(node.id, "cost", merged)
        return PassResult(graph, modified=True, stats={"target": ctx.backend.name})
