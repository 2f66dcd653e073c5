"""Reference interpreter: executes the IR in PyTorch, optionally with fake quantization.

It is the oracle for emitted artifacts and what profiling, sensitivity and QAT run on.
Quantized experts use, in order of preference: the exact tensors the ``quantize`` pass stored
(annotation ``quant``), else round-to-nearest fake quantization at the annotated ``bits``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from . import ops
from .graph import QUANTIZABLE_KINDS, Graph, IRError

DEFAULT_GROUP_SIZE = 64
Observer = Callable[[str, str, Any], None]  # (node_id, kind, value)


@dataclass
class RunOptions:
    """How one interpreter call treats quantization and what it exposes.

    Attributes:
        quantize: apply each quantizable node's annotated bits (False: full precision).
        bits_override: node id -> bits, applied on top of (or instead of) annotations.
        expert_scales: layer -> ``[E]`` tensor multiplying routed expert outputs (for gradients).
        observer: called with every computed node value.
        resume: node id -> precomputed value; those nodes and everything only they need are skipped.
        weight_override: node id -> role -> tensor, used instead of stored weights (QAT).
    """

    quantize: bool = True
    bits_override: Mapping[str, int] = field(default_factory=dict)
    expert_scales: Mapping[int, torch.Tensor] = field(default_factory=dict)
    observer: Observer | None = None
    resume: Mapping[str, Any] = field(default_factory=dict)
    weight_override: Mapping[str, Mapping[str, torch.Tensor]] = field(default_factory=dict)


class Interpreter:
    """Executes a :class:`Graph`; call it with token ids ``[B, T]`` to get logits ``[B, T, V]``."""

    def __init__(self, graph: Graph, quantize: bool = True, dtype: torch.dtype = torch.float32):
        self.graph = graph
        self.quantize = quantize
        self.dtype = dtype
        self._order = graph.topo_order()
        self._fq_cache: dict[tuple, torch.Tensor] = {}

    def __call__(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.run(input_ids, RunOptions(quantize=self.quantize))["lm_head"]

    def run(self, input_ids: torch.Tensor | None, opts: RunOptions | None = None,
            outputs: tuple[str, ...] = ("lm_head",)) -> dict[str, Any]:
        """Execute the nodes needed for ``outputs`` and return their values."""
        opts = opts or RunOptions(quantize=self.quantize)
        needed = self._needed(outputs, opts.resume)
        values: dict[str, Any] = dict(opts.resume)
        if input_ids is not None:
            values.setdefault("tokens", input_ids)
        for node_id in self._order:
            if node_id not in needed or node_id in values:
                continue
            values[node_id] = self._eval(node_id, values, opts)
            if opts.observer is not None:
                opts.observer(node_id, self.graph.g.nodes[node_id]["kind"], values[node_id])
        return {o: values[o] for o in outputs}

    def _needed(self, outputs: tuple[str, ...], resume: Mapping[str, Any]) -> set[str]:
        needed, stack = set(), list(outputs)
        while stack:
            n = stack.pop()
            if n in needed:
                continue
            needed.add(n)
            if n not in resume:
                stack.extend(self.graph.g.predecessors(n))
        return needed

    # -- weights -----------------------------------------------------------------------------
    def bits_of(self, node_id: str, opts: RunOptions) -> int:
        if node_id in opts.bits_override:
            return opts.bits_override[node_id]
        if not opts.quantize:
            return 16
        return self.graph.g.nodes[node_id]["ann"].get("bits", 16)

    def weights(self, node_id: str, opts: RunOptions) -> dict[str, torch.Tensor]:
        d = self.graph.g.nodes[node_id]
        override = opts.weight_override.get(node_id, {})
        bits = self.bits_of(node_id, opts) if d["kind"] in QUANTIZABLE_KINDS else 16
        out = {}
        for role, key in d["params"].items():
            if role in override:
                out[role] = override[role]
            elif bits < 16 and role in ("gate", "up", "down"):
                out[role] = self._quantized(node_id, role, key, bits, d["ann"])
            else:
                out[role] = self.graph.weights[key].to(self.dtype)
        return out

    def _quantized(self, node_id: str, role: str, key: str, bits: int, ann: Mapping[str, Any]) -> torch.Tensor:
        from ..quant import fake_quantize
        from ..quant.stored import dequantize_stored

        quant = ann.get("quant")
        if quant and quant["spec"]["bits"] == bits:
            cache_key = ("stored", node_id, role, bits)
            if cache_key not in self._fq_cache:
                self._fq_cache[cache_key] = dequantize_stored(self.graph.weights, quant, role).to(self.dtype)
            return self._fq_cache[cache_key]
        group = int(ann.get("group_size", self.graph.meta.get("group_size", DEFAULT_GROUP_SIZE)))
        cache_key = ("rtn", key, bits, group)
        if cache_key not in self._fq_cache:
            w = self.graph.weights[key].to(self.dtype)
            self._fq_cache[cache_key] = fake_quantize(w, bits, group)
        return self._fq_cache[cache_key]

    def clear_cache(self) -> None:
        self._fq_cache.clear()

    # -- evaluation --------------------------------------------------------------------------
    def _eval(self, node_id: str, values: dict[str, Any], opts: RunOptions) -> Any:
        d = self.graph.g.nodes[node_id]
        kind, a = d["kind"], d["attrs"]
        ins = [values[i] for i in self.graph.inputs(node_id)]
        if kind == "input":
            raise IRError("the interpreter needs input_ids for node 'tokens'")
        w = self.weights(node_id, opts)
        if kind == "embed":
            return F.embedding(ins[0], w["weight"])
        if kind == "norm":
            return ops.rms_norm(ins[0], w["weight"], a["eps"])
        if kind == "attention":
            return ops.attention(ins[0], w, a)
        if kind == "add":
            return ins[0] + ins[1]
        if kind == "router":
            return ops.route(ins[0], w["weight"], a)
        if kind == "expert":
            return ops.expert(ins[0], ins[1], a["expert"], w)
        if kind == "shared_expert":
            return ops.shared_expert(ins[0], w)
        if kind == "mlp":
            return ops.swiglu(ins[0], w["gate"], w["up"], w["down"])
        if kind == "combine":
            x_shape = values[self.graph.inputs(self.graph.inputs(node_id)[0])[0]].shape
            return ops.combine(x_shape, ins[0], ins[1:], opts.expert_scales.get(a["layer"]))
        if kind == "lm_head":
            return F.linear(ins[0], w["weight"])
        raise IRError(f"node {node_id!r}: the interpreter has no rule for kind {kind!r}")


def logits_fn(graph: Graph, quantize: bool = True) -> Callable[[torch.Tensor], torch.Tensor]:
    """A ``input_ids -> logits`` callable (no autograd) for evaluation code."""
    interp = Interpreter(graph, quantize=quantize)

    def fn(input_ids: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return interp(input_ids)

    return fn
