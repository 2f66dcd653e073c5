"""``quantize``: quantize and pack every expert's weights at its assigned bits.

Writes, per quantized node, the packed codes, scales and zero points into the weight store and
a ``quant`` annotation (spec + keys; see :mod:`dmpq_compile.quant.stored`). Methods: ``rtn``
(round to nearest), ``hqq`` (half-quadratic zero/scale optimisation) and ``gptq`` (Hessian-aware
rounding from calibration activations of the tokens routed to each expert).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..ir.graph import Graph
from ..ir.interpreter import Interpreter, RunOptions
from ..quant import QuantSpec, quantize
from ..quant.stored import store_quantized
from .base import Pass, PassContext, PassResult

log = logging.getLogger(__name__)
METHODS = ("rtn", "hqq", "gptq")
ROLES = ("gate", "up", "down")


@dataclass(frozen=True)
class QuantizeOptions:
    method: str = "rtn"
    group_size: int = 64
    max_sequences: int = 16  # calibration sequences for gptq

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {self.method!r}")


class QuantizePass(Pass):
    name = "quantize"
    requires = ("bits",)
    provides = ("quant",)
    Options = QuantizeOptions
    description = "group-wise affine quantization + bit packing at each expert's bits (rtn|hqq|gptq)"

    def __init__(self, options=None, **kwargs) -> None:
        super().__init__(options, **kwargs)
        self.needs_calibration = self.options.method == "gptq"

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        o = self.options
        graph.meta["group_size"] = o.group_size
        hessians = _hessians(graph, ctx.calibration[: o.max_sequences]) if o.method == "gptq" else {}
        nodes = [n for n in graph.experts() if n.ann["bits"] < 16]
        for node in tqdm(nodes, desc=f"quantize ({o.method})", disable=not ctx.progress, leave=False):
            spec = QuantSpec(bits=node.ann["bits"], group_size=o.group_size, method=o.method)
            tensors = {}
            for role in ROLES:
                w = graph.weights[node.params[role]].float()
                qt = _quantize_one(w, spec, hessians.get((node.id, role)))
                tensors[role] = store_quantized(graph.weights, f"{node.id}.{role}", qt)
            graph.annotate(node.id, "group_size", o.group_size)
            graph.annotate(node.id, "quant", {"spec": spec.to_dict(), "tensors": tensors})
        for node in graph.experts():  # kept experts carry an explicit "no quantization" record
            if node.ann["bits"] == 16:
                graph.annotate(node.id, "quant", {"spec": QuantSpec(bits=16).to_dict(), "tensors": {}})
        return PassResult(graph, modified=bool(nodes), stats={"quantized_experts": len(nodes)})


def _quantize_one(w: torch.Tensor, spec: QuantSpec, hessian: torch.Tensor | None):
    if spec.method == "rtn":
        return quantize(w, spec)
    if spec.method == "hqq":
        from ..quant.hqq import hqq_quantize

        return hqq_quantize(w, spec)
    from ..quant.gptq import gptq_quantize

    return gptq_quantize(w, hessian, spec)


def _hessians(graph: Graph, ids: torch.Tensor) -> dict[tuple[str, str], torch.Tensor]:
    """``H = X^T X / n`` of each expert projection's input over its routed calibration tokens."""
    interp = Interpreter(graph, quantize=False)
    acts: dict[str, torch.Tensor] = {}

    def observe(node_id, kind, value):
        if node_id.endswith(".moe_norm") or kind == "router":
            acts[node_id] = value

    with torch.no_grad():
        interp.run(ids, RunOptions(quantize=False, observer=observe), outputs=("final_norm",))
    out = {}
    for node in graph.experts():
        layer, e = node.attrs["layer"], node.attrs["expert"]
        x = acts[f"L{layer}.moe_norm"].reshape(-1, graph.meta["hidden_size"])
        token_idx, _ = torch.where(acts[f"L{layer}.router"].indices == e)
        xt = x[token_idx]  # [n, H]
        w = interp.weights(node.id, RunOptions(quantize=False))
        with torch.no_grad():
            mid = F.silu(F.linear(xt, w["gate"])) * F.linear(xt, w["up"])  # [n, I]
        n = max(1, len(token_idx))
        out[(node.id, "gate")] = out[(node.id, "up")] = xt.T @ xt / n
        out[(node.id, "down")] = mid.T @ mid / n
    return out
