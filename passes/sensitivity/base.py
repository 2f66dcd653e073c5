"""``sensitivity``: per expert and bit-width, how much quantizing only it changes the model.

Two methods (``method``):

* ``local`` (default): each expert's output error at its own layer on the tokens routed to it,
  weighted by the gradient of the model's output distribution at that layer: a Fisher estimate
  of the KL increase (see :mod:`.local`). One forward and one backward per label
  sample, layer-major: cost linear in depth, memory bounded by one layer. ``sensitivity``
  (the NLL-increase annotation) is set to the same estimate: the expected NLL increase under
  the model's own next-token distribution is exactly the KL.
* ``whole``: the measured NLL and KL increase of the whole model with only that expert
  quantized. It runs the full-precision model once, keeps each layer's residual stream,
  patches in the quantized expert's output for the routed tokens and runs the suffix (layers
  l+1..L) for ``chunk`` perturbations stacked along the batch axis: O(E . L . |bits| . T .
  suffix) token-layer evaluations, quadratic in depth, and whole-model memory. For small
  models and for checking ``local``.

Both write ``contribution`` (``whole``: |dL/ds_e| for a scale s_e on each expert's output;
``local``: the square root of the Fisher estimate of removing the expert's output) and, with
``gradvar``, the features of the router-gradient/variance allocator: ``router_grad_change``
(relative change of each expert's router-row gradient when all experts are quantized at
``gradvar_bits``) and ``neuron_variance`` (mean over the expert's intermediate neurons of the
activation variance across its routed tokens).

With ``nonexpert`` kinds (``--nonexpert-bits auto``), ``local`` also scores the non-expert nodes
the allocator will place (:func:`.precision.allocatable`), writing ``kl`` and ``sensitivity``:

* attention, shared-expert and dense-MLP nodes: the same Fisher estimate, with the node's output
  recomputed from its observed inputs with fake-quantized weights against the gradient of that
  output (retained during the backward pass that scores the experts): one evaluation of the node
  per bit-width, linear in depth, nothing kept beyond the layer;
* the LM head and the embedding table: measured, not estimated, as the whole model's KL with
  only that node quantized (the head: one head projection per bit-width; the table: one
  layer-major forward per bit-width of the first ``embed_sequences`` sequences (4 of 16: a
  forward of the whole model per bit-width was a quarter of the pass at OLMoE's depth), linear in
  depth).
  The Fisher estimate misses what it cannot
  differentiate (top-k routing flips downstream): on ``samples/mixtral-tiny`` it read 0.14-0.27x
  the measured KL for the embedding table at 4 bits, which made the allocator leave the table at
  4 bits where 8 paid most; for a single node a measurement costs one forward.

The layer-local estimate sees the model with every router frozen; with ``flips`` (the default;
``--no-flip-probe`` turns it off) ``local`` adds the KL of top-k routing flips downstream:
``flip_kl[b] = c_l x`` the node's mean output-change norm at ``b`` bits, ``c_l`` measured once per MoE
layer by :func:`.local.flip_rates` (every expert of the layer at ``flip_bits``, the rest of
the model run with routers free and frozen, on a disjoint group of the calibration sequences;
the layer's own change comes from the expert scores, so about one forward in all). ``kl`` and
``sensitivity`` are the sum; ``flip_kl`` is kept apart.

Every bit-width is fake-quantized in the weight format the target declares for it
(``ctx.backend.weight_formats``, else the graph's declaration; see
:mod:`dmpq_compile.quant.formats`), so what is measured is what the backend emits.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ...eval.metrics import mean_nll, next_token_logprobs, token_kl, token_nll
from ...ir import ops
from ...ir.graph import Graph, layer_node, layer_role
from ...ir.interpreter import Interpreter, RunOptions, check_compute_dtype, compute_dtype, dtype_evidence
from ...quant.spec import VALID_BITS
from ...sysinfo import release_free_heap
from ..infra.base import Pass, PassContext, PassResult
from ..infra.layer_clock import LayerClock
from ..precision import allocatable, measured_bits
from . import local, rare_experts
from .resume import open_state

log = logging.getLogger(__name__)
METHODS = ("local", "whole")
# the local method's steps in units of one forward layer, for the ETA (OLMoE-1B-7B widths, 16 x 128
# tokens, bf16 products: forward 1.1 s a layer, backward with the expert scores about 7.8 s since their
# weight changes come from one native pass (9 s before), the head's and the embedding's measured KL about
# 3 forward layers per layer of depth)
WORK = {"backward": 7.0, "gradvar": 2.0, "measured": 3.0}


@dataclass(frozen=True)
class SensitivityOptions:
    bits: tuple[int, ...] | None = None  # default: the backend's supported bits below 16, else (2, 3, 4, 8)
    max_sequences: int = 16  # calibration sequences used
    chunk: int = 8  # whole: perturbations evaluated per suffix pass
    gradvar: bool = True
    gradvar_bits: int = 3
    method: str = "local"  # local (Fisher-weighted layer-local error, linear in depth) | whole
    label_samples: int = 1  # local: sampled-label backward passes averaged
    nonexpert: tuple[str, ...] = ()  # local: also score these non-expert kinds (--nonexpert-bits auto)
    flips: bool = True  # local: add the KL of routing flips downstream, rated by one probe per layer
    flip_bits: int | None = None  # bits of the flip probe (default: 3 if measured, else the nearest)
    min_tokens: int = 8  # local: experts measured on fewer routed tokens are "rare" (see rare_experts.py)
    rare: str = "estimate"  # local: estimate | measured (take a rare expert's measurement as it is, 0 if unrouted)
    compute_dtype: str = "auto"  # local: products of the calibration runs (ir.interpreter.compute_dtype)
    embed_sequences: int = 4  # local: sequences of the embedding table's measured KL (a forward per bit-width)

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"sensitivity method must be one of {METHODS}, got {self.method!r}")
        if self.label_samples < 1:
            raise ValueError(f"label_samples must be >= 1, got {self.label_samples}")
        if self.nonexpert and self.method != "local":
            raise ValueError("non-expert sensitivity (nonexpert kinds) is measured by the local method only; "
                             "use method='local'")
        if self.flip_bits is not None and (self.flip_bits not in VALID_BITS or self.flip_bits >= 16):
            raise ValueError(f"flip_bits must be a quantized bit-width {VALID_BITS[:-1]}, got {self.flip_bits!r}")
        if self.rare not in rare_experts.MODES:
            raise ValueError(f"rare must be one of {rare_experts.MODES}, got {self.rare!r}")
        if self.min_tokens < 0:
            raise ValueError(f"min_tokens must be >= 0, got {self.min_tokens}")
        if self.embed_sequences < 1:
            raise ValueError(f"embed_sequences must be >= 1, got {self.embed_sequences}")
        check_compute_dtype(self.compute_dtype, "compute_dtype")
        object.__setattr__(self, "nonexpert", tuple(self.nonexpert))


class SensitivityPass(Pass):
    name = "sensitivity"
    provides = ("sensitivity", "kl", "contribution")
    needs_calibration = True
    cacheable = True  # annotations only; reused across budgets and allocators
    resumable = True  # finished layers kept in ctx.state_dir (resume.py)
    Options = SensitivityOptions
    description = "loss/KL increase per expert per bit-width, gradient contribution, gradvar features"

    def __init__(self, options=None, **kwargs) -> None:
        super().__init__(options, **kwargs)
        if self.options.gradvar:
            self.provides = (*type(self).provides, "router_grad_change", "neuron_variance")

    def environment(self, graph: Graph) -> str:
        """``compute_dtype`` as resolved here (``auto`` depends on the CPU and the checkpoint)."""
        return str(compute_dtype(graph, self.options.compute_dtype))

    def forward_rows(self, graph: Graph, ctx: PassContext) -> tuple[int, torch.dtype | None] | None:
        """The local method's forward of its sequences, if an earlier pass (profile) runs it anyway."""
        if self.options.method != "local" or ctx.calibration is None:
            return None
        return min(self.options.max_sequences, len(ctx.calibration)), compute_dtype(graph, self.options.compute_dtype)

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        o = self.options
        bits = tuple(o.bits) if o.bits else _default_bits(ctx)
        ids = ctx.calibration[: o.max_sequences]
        # measure each bit-width in the format the target emits (the graph stays as it was)
        interp = Interpreter(graph, quantize=False, formats=getattr(ctx.backend, "weight_formats", None))
        if o.method == "local":
            return self._run_local(graph, ctx, interp, ids, bits)
        fp = _reference(graph, interp, ids)
        n_pert = sum(1 for _ in graph.experts()) * len(bits)
        bar = tqdm(total=n_pert, desc="sensitivity", unit="pert", disable=not ctx.progress, leave=False)
        for layer in sorted({n.attrs["layer"] for n in graph.experts()}):
            _layer_sensitivity(graph, interp, ids, fp, layer, bits, o.chunk, bar)
            interp.clear_cache()
        bar.close()
        for node_id, value in _contribution(graph, interp, ids).items():
            graph.annotate(node_id, "contribution", value)
        if o.gradvar:
            _gradvar(graph, interp, ids, o.gradvar_bits, fp)
        return PassResult(graph, modified=True, stats={"bits": list(bits), "perturbations": n_pert,
                                                       "tokens": int(ids.numel())})


    def _run_local(self, graph: Graph, ctx: PassContext, interp: Interpreter, ids: torch.Tensor,
                   bits: tuple[int, ...]) -> PassResult:
        o = self.options
        n_layers = len(local.layer_outputs(graph))
        moe_layers = sorted({n.attrs["layer"] for n in graph.experts()})
        flips = o.flips and len(moe_layers) > 1
        items = {k: measured_bits(c) for k, c in allocatable(graph, ctx.backend, o.nonexpert, (*bits, 16)).items()}
        measured = {k: b for k, b in items.items() if graph.node(k).kind in ("lm_head", "embed")}
        n_flip = n_layers - moe_layers[0] if flips else 0
        steps = n_layers * (1 + o.label_samples + (4 if o.gradvar else 0)) + n_flip + bool(measured)
        # the clock's work units: a forward layer is one (WORK has the others, measured at OLMoE widths)
        work = (n_layers * (1 + WORK["backward"] * o.label_samples + (4 * WORK["gradvar"] if o.gradvar else 0))
                + n_flip + (WORK["measured"] * n_layers if measured else 0))
        remote = _remote(ctx, graph)
        # finished layers kept to resume an interrupted run (where the cache is on)
        state = open_state(ctx.state_dir, graph, o.label_samples, ids, remote is not None)
        resumed = state.resumed if state is not None else 0
        bar = tqdm(total=steps, desc="sensitivity (local)", unit="layer", disable=not ctx.progress, leave=False,
                   initial=resumed)
        clock = LayerClock("sensitivity", steps, resumed=resumed, work=work,
                           resumed_work=(state.resumed_forward + WORK["backward"] * state.resumed_backward
                                         if state is not None else 0))

        def ticker(units: float, label: str = ""):
            def tick() -> None:
                bar.update(1)
                clock.step(label, units)
            return tick
        tick = ticker(1.0)
        # the runs through the model (forward, backward, flip probe) multiply in ``cast``; the
        # per-expert and per-node changes they weight, and the measured KLs, stay in fp32
        cast = compute_dtype(graph, o.compute_dtype)
        run_fp = RunOptions(quantize=False, autocast=cast)
        shared = ctx.forward_share.take(ids, cast) if ctx.forward_share is not None else None
        if shared is not None:
            log.info("sensitivity: the forward of its %d sequences is the profile pass's, not run again", len(ids))
        def skip() -> None:  # a forward layer taken from the profile pass: done at no cost here
            bar.update(1)
            clock.skip(1)
        if state is not None:
            store, h_last = state.forward(interp, ids, run_fp, skip if shared is not None else tick, shared)
        elif shared is not None:
            store, h_last = shared
            for _ in range(n_layers):
                skip()
        else:
            store, h_last = local.forward_boundaries(interp, ids, run_fp, tick)
        gen = torch.Generator().manual_seed(int(ctx.seed))
        scores: dict[str, list[dict]] = {}
        layer_of = {k: graph.node(k).attrs["layer"] for k in items if "layer" in graph.node(k).attrs}
        n_seq, positions = ids.shape[0], ids.shape[0] * (ids.shape[1] - 1)
        nonexpert: dict[str, list[dict]] = {}

        by_layer = graph.experts_by_layer()
        # scored here: the expert scores take each expert's values from the backward's forward of its layer (the
        # same products on the same tokens: in fp32 its output, under autocast its gate and up products) instead of
        # computing them again; fp32 gradvar needs the intermediate values, and a worker does not get the forward's
        reuse = remote is None and not (o.gradvar and cast is None)
        pending: list = []  # remote: (label sample, layer, future) per task, in the serial order
        now = {"sample": 0, "scored": 0}  # the label sample back-propagated; pending's tasks whose scores are in
        split = {"expert_scores_s": 0.0, "expert_scores_cpu_s": 0.0}  # the part --ray sends to workers
        # the flip probe's inputs, gathered as the first backward pass goes by (local.flip_rates)
        groups = local.probe_groups(len(ids), moe_layers[:-1]) if flips else {}
        probe_bits = _probe_bits(bits, o.flip_bits)
        probes: dict[int, tuple[torch.Tensor, float]] = {}
        routes: dict[int, ops.Routing] = {}
        seq_len = ids.shape[1]

        def add(layer: int, result: dict) -> tuple[torch.Tensor, float] | None:
            """Take a layer's expert scores, in the serial order; returns its flip-probe input when new."""
            new = layer in groups and layer not in probes
            if new:
                probes[layer] = local.probe_changes(result, len(groups[layer]) * seq_len, h_last.shape[-1])
            for node_id, sc in result.items():
                sc.pop("probe", None)  # kept in probes, not with the scores
                scores.setdefault(node_id, []).append(sc)
            return probes[layer] if new else None

        def collect(block: bool) -> None:
            """Take the remote tasks' scores in the order they were submitted, those done so far (``block``:
            all); with state each layer's record is kept as its scores come."""
            while now["scored"] < len(pending):
                sample, layer, future = pending[now["scored"]]
                if not block and not ctx.executor.done([future]):
                    return
                (result,) = ctx.executor.get([future])
                probe = add(layer, result)
                if state is not None:
                    state.deliver(sample, layer, result, probe)
                now["scored"] += 1

        def at_layer(layer, seen, g):
            if layer_node(layer, "router") not in seen:
                return
            x, route = seen[layer_node(layer, "moe_norm")], seen[layer_node(layer, "router")]
            route = ops.Routing(route.weights.detach(), route.indices, route.logits.detach(), route.shape)
            probe = None
            if flips and layer not in routes:  # the first label sample
                routes[layer] = route
                probe = (groups[layer], probe_bits) if layer in groups else None
                if state is not None:
                    state.note(route=route)
            if remote is not None:  # scored by a worker while this process back-propagates further
                from ..infra.remote_tasks import layer_expert_scores

                pending.append((now["sample"], layer, ctx.executor.submit(
                    layer_expert_scores, remote, interp.formats, layer, x.detach(), route, g.detach(), bits, seq_len,
                    cast, probe)))
                return
            t0, c0 = time.perf_counter(), time.process_time()
            outputs = {n.id: seen[n.id] for n in by_layer.get(layer, []) if n.id in seen} if reuse else None
            result = local.expert_scores(graph, interp, layer, x, route, g, bits, seq_len, by_layer.get(layer, []),
                                         cast, probe, outputs)
            new = add(layer, result)
            if state is not None:  # kept with the layer when it is finished
                state.note(experts=result, probe=new)
            split["expert_scores_s"] += time.perf_counter() - t0
            split["expert_scores_cpu_s"] += time.process_time() - c0

        def after_backward(layer, values, grads, g_in):
            for node_id in (k for k, lay in layer_of.items() if lay == layer):
                resume = {i: values[i] for i in graph.inputs(node_id)}
                nonexpert.setdefault(node_id, []).append(local.perturbation_scores(
                    interp, node_id, resume, values[node_id], grads[node_id], items[node_id], n_seq, positions))
                if state is not None:
                    state.note(node=(node_id, nonexpert[node_id][-1]))

        def remote_done(layer, g_in):  # a layer back-propagated; its scores, if a task makes them, come later
            if state is not None:
                state.layer_done(layer, g_in, wait=bool(pending) and pending[-1][:2] == (now["sample"], layer))
            collect(block=False)

        done = remote_done if remote is not None else state.layer_done if state is not None else None
        watch = (lambda layer: {k for k, lay in layer_of.items() if lay == layer}) if layer_of else None
        rates: dict[int, float] = {}
        try:
            if state is not None:
                state.replay(add, routes, probes, nonexpert)
            for sample in range(o.label_samples):
                now["sample"] = sample
                start = state.begin(sample, gen) if state is not None else (n_layers - 1, None)
                if start is None:  # finished before the interruption
                    continue
                top, g = start
                if g is None:
                    g = local.head_gradient(interp, h_last, ids, "sampled", gen, cast)
                local.backward_layers(interp, store, g, run_fp, at_layer, ticker(WORK["backward"], "backward"), watch,
                                      after_backward, top, done, expert_outputs=reuse)
            collect(block=True)
            if flips:
                t0 = time.perf_counter()
                rates = local.flip_rates(interp, store, h_last, seq_len, groups, probes, routes, ticker(1.0, "flip probe"),
                                         cast)
                log.info("sensitivity: routing-flip rates per layer %s (probe %.1f s)",
                         {k: float(f"{v:.3g}") for k, v in rates.items()}, time.perf_counter() - t0)
                if len(groups) < len(moe_layers) - 1:  # deeper than the calibration set has sequences
                    rates = local.fill_rates(rates, moe_layers)
                    log.info("sensitivity: the flip probe measured %d of %d MoE layers (one calibration sequence "
                             "each) and interpolated the rest in depth", len(groups), len(moe_layers) - 1)
        finally:
            store.close()
        if measured:  # measured through the whole model: flips included
            release_free_heap()  # the backward's freed heap, before the head-sized tensors come
            t0 = time.perf_counter()
            nonexpert.update({k: [{"kl": kl}] for k, kl in local.measured_kl(interp, ids, h_last, measured,
                                                                                    o.embed_sequences, cast).items()})
            log.info("sensitivity: %s measured through the whole model in %.1f s", sorted(measured),
                     time.perf_counter() - t0)
            ticker(WORK["measured"] * n_layers, "measured KL")()
        for node_id, runs in nonexpert.items():
            _annotate_kl(graph, node_id, runs, _flip_rate(rates, graph.node(node_id).attrs.get("layer"), False))
        for node_id, runs in scores.items():
            _annotate_kl(graph, node_id, runs, _flip_rate(rates, graph.node(node_id).attrs["layer"], True))
            graph.annotate(node_id, "contribution", sum(r["contribution"] for r in runs) / len(runs))
            graph.annotate(node_id, "sensitivity_tokens", runs[0]["tokens"])
            if o.gradvar:
                graph.annotate(node_id, "neuron_variance", runs[0]["neuron_variance"])
        rare = rare_experts.price_rare(graph, {k: runs[0]["weight_error"] for k, runs in scores.items()},
                                       o.min_tokens, o.rare)
        if o.gradvar:
            tick = ticker(WORK["gradvar"], "router gradients")
            fp_g = _streamed_router_grads(graph, interp, ids, RunOptions(quantize=False, autocast=cast), tick)
            all_q = {n.id: o.gradvar_bits for n in graph.experts()}
            q_g = _streamed_router_grads(graph, interp, ids, RunOptions(quantize=False, bits_override=all_q,
                                                                        autocast=cast), tick)
            _annotate_router_change(graph, fp_g, q_g)
        bar.close()
        return PassResult(graph, modified=True, stats={
            "method": "local", "bits": list(bits),
            "compute_dtype": str(cast or torch.float32).removeprefix("torch."), **dtype_evidence(graph, o.compute_dtype),
            "label_samples": o.label_samples,
            "tokens": int(ids.numel()),
            **({"flip_rates": {str(k): v for k, v in rates.items()}, "flip_probed": sorted(groups)} if flips else {}),
            "rare_experts": rare,
            **({"remote_tasks": len(pending)} if pending else {k: round(v, 2) for k, v in split.items()}),
            **({"nonexpert_nodes": len(nonexpert)} if o.nonexpert else {}),
            **({"resumed_layers": resumed} if resumed else {})})


def _remote(ctx: PassContext, graph: Graph):
    """The graph put in the executor's object store (None: score the layers in this process)."""
    if ctx.executor is None:
        return None
    from ..infra.remote_tasks import sendable

    return ctx.executor.put(graph) if sendable(graph) else None


def _probe_bits(bits: tuple[int, ...], wanted: int | None) -> int:
    """The flip probe's bit-width: ``wanted``, else 3 or the measured width nearest to it (the flip
    rate was flat over 2-4 bits; 3 flips enough decisions to measure on a few sequences)."""
    if wanted is not None:
        return wanted
    return min(bits, key=lambda b: (abs(b - 3), b))


def _flip_rate(rates: dict[int, float], layer: int | None, expert: bool) -> float:
    """The flip rate of a node of ``layer``: an expert's output enters the residual stream after its
    own router, so the rate of its layer; an attention/shared/MLP node's before (attention) or beside
    (shared expert, dense MLP) it: the previous MoE layer's rate, whose downstream routers are this
    layer's and later ones (layer 0: its own, which misses its router; nodes outside layers: 0)."""
    if layer is None or not rates:
        return 0.0
    if expert:
        return rates.get(layer, 0.0)
    earlier = [k for k in rates if k < layer]
    return rates[max(earlier)] if earlier else rates[min(rates)]


def _annotate_kl(graph: Graph, node_id: str, runs: list[dict], flip_rate: float = 0.0) -> None:
    """Write the mean over label samples of ``{bits: KL}`` (``run["kl"]``) plus the routing-flip term
    ``flip_rate x run["norm"]`` (written alone as ``flip_kl``) as ``kl`` and ``sensitivity`` (the
    expected NLL increase under the model's own distribution is the KL)."""
    kl = {b: sum(r["kl"][b] for r in runs) / len(runs) for b in runs[0]["kl"]}
    if "norm" in runs[0] and flip_rate > 0:
        flip = {b: flip_rate * runs[0]["norm"][b] for b in kl}
        graph.annotate(node_id, "flip_kl", flip)
        kl = {b: kl[b] + flip[b] for b in kl}
    graph.annotate(node_id, "kl", kl)
    graph.annotate(node_id, "sensitivity", dict(kl))


def _streamed_router_grads(graph: Graph, interp: Interpreter, ids: torch.Tensor, opts: RunOptions,
                           tick) -> dict[int, torch.Tensor]:
    """Router-weight gradients of the true-label loss, computed layer by layer."""
    params = {r.id: interp.stored(r.params["weight"]).clone().requires_grad_(True) for r in graph.nodes("router")}
    opts.weight_override = {rid: {"weight": p} for rid, p in params.items()}
    store, h_last = local.forward_boundaries(interp, ids, opts, tick)
    try:
        g = local.head_gradient(interp, h_last, ids, "true", None)
        local.backward_layers(interp, store, g, opts, lambda *a: None, tick)
    finally:
        store.close()
    return {graph.node(rid).attrs["layer"]: p.grad for rid, p in params.items()}


def _annotate_router_change(graph: Graph, g_fp: dict, g_q: dict) -> None:
    for node in graph.experts():
        layer, e = node.attrs["layer"], node.attrs["expert"]
        ref = g_fp[layer][e]
        graph.annotate(node.id, "router_grad_change", float((g_q[layer][e] - ref).norm() / (ref.norm() + 1e-12)))


def _default_bits(ctx: PassContext) -> tuple[int, ...]:
    supported = getattr(ctx.backend, "supported_bits", None)
    if supported:
        return tuple(b for b in supported if b < 16)
    return (2, 3, 4, 8)


def _nll_kl(logits: torch.Tensor, ids: torch.Tensor, ref_logp: torch.Tensor | None) -> tuple[torch.Tensor, ...]:
    """Per sequence mean NLL ``[B]`` and mean KL(ref || logits) ``[B]`` over next-token positions."""
    logp = next_token_logprobs(logits)  # [B, T-1, V]
    nll = token_nll(logp, ids).mean(-1)
    if ref_logp is None:
        return nll, torch.zeros_like(nll)
    return nll, token_kl(ref_logp, logp).mean(-1)


def _reference(graph: Graph, interp: Interpreter, ids: torch.Tensor) -> dict:
    """Full-precision values every layer's patch needs, plus reference log-probs and NLL."""
    keep = {}

    def observe(node_id, kind, value):
        if kind in ("router", "combine") or layer_role(node_id) in ("attn_res", "moe_norm"):
            keep[node_id] = value

    with torch.no_grad():
        logits = interp.run(ids, RunOptions(quantize=False, observer=observe))["lm_head"]
    ref_logp = next_token_logprobs(logits)
    nll, _ = _nll_kl(logits, ids, None)
    keep["ref_logp"], keep["ref_nll"] = ref_logp, nll.mean()
    return keep


def _layer_sensitivity(graph: Graph, interp: Interpreter, ids: torch.Tensor, fp: dict, layer: int,
                       bits: tuple[int, ...], chunk: int, bar) -> None:
    x, routing = fp[layer_node(layer, "moe_norm")], fp[layer_node(layer, "router")]
    base = fp[layer_node(layer, "combine")].reshape(-1, x.shape[-1])  # [N, H]
    resid = fp[layer_node(layer, "attn_res")]
    experts = [n for n in graph.experts() if n.attrs["layer"] == layer]
    todo, results = [], {}
    with torch.no_grad():
        for node in experts:
            fp_out = ops.expert(x, routing, node.attrs["expert"], interp.weights(node.id, RunOptions(quantize=False)))
            for b in bits:
                if fp_out.token_idx.numel() == 0:
                    results[(node.id, b)] = (0.0, 0.0)
                    bar.update(1)
                    continue
                w = interp.weights(node.id, RunOptions(bits_override={node.id: b}))
                q_out = ops.expert(x, routing, node.attrs["expert"], w)
                scale = routing.weights[q_out.token_idx, q_out.slot, None]
                patched = base.index_add(0, q_out.token_idx, (q_out.y - fp_out.y) * scale)
                todo.append(((node.id, b), resid + patched.view_as(resid)))
        for start in range(0, len(todo), chunk):
            part = todo[start:start + chunk]
            stacked = torch.cat([value for _, value in part])  # [P*B, T, H]
            logits = interp.run(None, RunOptions(quantize=False, resume={layer_node(layer, "moe_res"): stacked}))["lm_head"]
            reps = len(part)
            nll, kl = _nll_kl(logits, ids.repeat(reps, 1), fp["ref_logp"].repeat(reps, 1, 1))
            for i, (key, _) in enumerate(part):
                sl = slice(i * len(ids), (i + 1) * len(ids))
                results[key] = (float(nll[sl].mean() - fp["ref_nll"]), float(kl[sl].mean().clamp_min(0)))
            bar.update(reps)
    for node in experts:
        graph.annotate(node.id, "sensitivity", {16: 0.0, **{b: results[(node.id, b)][0] for b in bits}})
        graph.annotate(node.id, "kl", {16: 0.0, **{b: results[(node.id, b)][1] for b in bits}})


def _loss_with_scales(graph: Graph, interp: Interpreter, ids: torch.Tensor, opts: RunOptions) -> torch.Tensor:
    return mean_nll(interp.run(ids, opts)["lm_head"], ids)


def _contribution(graph: Graph, interp: Interpreter, ids: torch.Tensor) -> dict[str, float]:
    n_exp = graph.meta["num_experts"]
    layers = sorted({n.attrs["layer"] for n in graph.experts()})
    scales = {layer: torch.ones(n_exp, requires_grad=True) for layer in layers}
    loss = _loss_with_scales(graph, interp, ids, RunOptions(quantize=False, expert_scales=scales))
    loss.backward()
    return {n.id: float(scales[n.attrs["layer"]].grad[n.attrs["expert"]].abs())
            for n in graph.experts()}


def _router_grads(graph: Graph, interp: Interpreter, ids: torch.Tensor, opts: RunOptions) -> dict[int, torch.Tensor]:
    routers = list(graph.nodes("router"))
    params = {r.attrs["layer"]: graph.weights[r.params["weight"]].float().clone().requires_grad_(True)
              for r in routers}
    opts.weight_override = {r.id: {"weight": params[r.attrs["layer"]]} for r in routers}
    _loss_with_scales(graph, interp, ids, opts).backward()
    return {layer: p.grad for layer, p in params.items()}


def _gradvar(graph: Graph, interp: Interpreter, ids: torch.Tensor, bits: int, fp: dict) -> None:
    g_fp = _router_grads(graph, interp, ids, RunOptions(quantize=False))
    all_q = {n.id: bits for n in graph.experts()}
    g_q = _router_grads(graph, interp, ids, RunOptions(quantize=False, bits_override=all_q))
    _annotate_router_change(graph, g_fp, g_q)
    for node in graph.experts():
        layer, e = node.attrs["layer"], node.attrs["expert"]
        w = interp.weights(node.id, RunOptions(quantize=False))
        x, routing = fp[layer_node(layer, "moe_norm")], fp[layer_node(layer, "router")]
        token_idx, _ = torch.where(routing.indices == e)
        with torch.no_grad():
            xt = x.reshape(-1, x.shape[-1])[token_idx]
            act = F.silu(F.linear(xt, w["gate"])) * F.linear(xt, w["up"])  # [n, I]
            var = float(act.var(dim=0).mean()) if len(token_idx) > 1 else 0.0
        graph.annotate(node.id, "neuron_variance", var)
