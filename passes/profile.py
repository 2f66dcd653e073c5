"""``profile``: expert activation frequency, routing-weight mass and token counts on calibration text."""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from ..ir.graph import Graph
from ..ir.interpreter import Interpreter, RunOptions, check_compute_dtype, compute_dtype, dtype_evidence
from ..ir.stream import SharedForward, layer_outputs, run_layers
from .infra.base import Pass, PassContext, PassResult

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ProfileOptions:
    """Profiling runs layer-major over all calibration sequences at once.

    ``compute_dtype``: the dtype of its matrix products (:func:`~dmpq_compile.ir.interpreter.compute_dtype`;
    the routing decisions themselves are always made in fp32).
    """

    compute_dtype: str = "auto"

    def __post_init__(self) -> None:
        check_compute_dtype(self.compute_dtype, "compute_dtype")


class ProfilePass(Pass):
    """Counts, per expert, the tokens routed to it and the routing weight it receives.

    ``freq`` = routed tokens / all tokens (so the experts of a layer sum to top_k);
    ``mass`` = summed routing weight / all tokens. Router nodes get a ``routing`` summary
    (entropy of the load distribution, max/min frequency). Runs at full precision.
    """

    name = "profile"
    provides = ("freq", "mass", "tokens")
    needs_calibration = True
    cacheable = True  # annotations only; reused across budgets and allocators
    Options = ProfileOptions
    description = "expert activation frequency, routing mass, token counts"

    def environment(self, graph: Graph) -> str:
        """``compute_dtype`` as resolved here (``auto`` depends on the CPU and the checkpoint)."""
        return str(compute_dtype(graph, self.options.compute_dtype))

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        cast = compute_dtype(graph, self.options.compute_dtype)
        counts, mass, total = route_statistics(graph, ctx.calibration, ctx.progress, cast, ctx.forward_share)
        for node in graph.experts():
            layer, e = node.attrs["layer"], node.attrs["expert"]
            graph.annotate(node.id, "tokens", int(counts[layer][e]))
            graph.annotate(node.id, "freq", float(counts[layer][e]) / total)
            graph.annotate(node.id, "mass", float(mass[layer][e]) / total)
        for router in graph.nodes("router"):
            load = counts[router.attrs["layer"]].double()
            p = load / load.sum()
            entropy = float(-(p[p > 0] * p[p > 0].log()).sum())
            graph.annotate(router.id, "routing", {
                "tokens": total, "load_entropy": entropy, "max_entropy": math.log(len(load)),
                "max_freq": float(load.max()) / total, "min_freq": float(load.min()) / total})
        return PassResult(graph, modified=True, stats={
            "tokens": total, "compute_dtype": str(cast or torch.float32).removeprefix("torch."),
            **dtype_evidence(graph, self.options.compute_dtype)})


def route_statistics(graph: Graph, ids: torch.Tensor, progress: bool = True, autocast: torch.dtype | None = None,
                     share: SharedForward | None = None) -> tuple[dict[int, torch.Tensor], dict[int, torch.Tensor], int]:
    """Per layer: tokens routed to each expert ``[E]`` and summed routing weights ``[E]``; total tokens
    (the products in ``autocast``, None: fp32). ``share``: record the forward there for a later pass
    (:class:`~dmpq_compile.ir.stream.SharedForward`), when it wants this one."""
    interp = Interpreter(graph, quantize=False)
    n_exp = graph.meta["num_experts"]
    layers = [r.attrs["layer"] for r in graph.nodes("router")]
    counts = {layer: torch.zeros(n_exp, dtype=torch.long) for layer in layers}
    mass = {layer: torch.zeros(n_exp, dtype=torch.float64) for layer in layers}

    def observe(node_id, kind, value):
        if kind == "router":
            layer = graph.node(node_id).attrs["layer"]
            counts[layer] += torch.bincount(value.indices.reshape(-1), minlength=n_exp)
            mass[layer].index_add_(0, value.indices.reshape(-1), value.weights.reshape(-1).double())

    opts = RunOptions(quantize=False, observer=observe, autocast=autocast)
    bar = tqdm(total=len(layer_outputs(graph)), desc="profile", unit="layer", disable=not progress, leave=False)
    record = share is not None and share.recording(ids, autocast)
    with torch.no_grad():  # layer-major: each weight is read once, memory holds one layer
        h = run_layers(interp, ids, opts, progress=lambda layer: bar.update(1),
                       before_layer=share.put if record else None)
    if record:
        share.finish(h)
    bar.close()
    return counts, mass, int(ids.numel())
