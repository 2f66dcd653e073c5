"""``quantize``: quantize and pack every expert's weights at its assigned bits, and the non-expert
linear weights (attention, shared experts, dense MLPs, lm_head) the ``precision`` pass gave bits.

Writes, per quantized node, the packed codes, scales and zero points into the weight store and
a ``quant`` annotation (spec + keys; see :mod:`dmpq_compile.quant.stored`). Methods: ``rtn``
(round to nearest), ``hqq`` (half-quadratic zero/scale optimisation) and ``gptq`` (Hessian-aware
rounding from calibration activations: of the tokens routed to each expert, of every token for
attention q/k/v (the attention's input) and o (the attention context), shared experts, dense
MLPs and the lm_head (the final norm's output); the embedding table, a lookup and not a product,
falls back to ``rtn`` under ``gptq``, logged and named in its spec).

Format: each bit-width is quantized in the weight format the target declares for it
(``ctx.backend.weight_formats``, recorded in ``graph.meta``; group-wise asymmetric at
``group_size`` where nothing is declared), the format sensitivity measured and the backend
emits. HQQ only optimises zero points: a symmetric format has none, so those experts fall back
to ``rtn`` (logged) and their spec names ``rtn``, the method that made their codes.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..ir.graph import NONEXPERT_QUANTIZABLE_KINDS, QUANT_ROLES, Graph, layer_node
from ..ir.interpreter import Interpreter, RunOptions
from ..ir.stream import embed, layer_outputs, run_layer
from ..ir.weights import index_safetensors
from ..quant import QuantSpec, quantize
from ..quant.formats import WeightFormat, declare_target_formats, declared_format
from ..quant.rtn import QuantizedTensor
from ..quant.spec import DEFAULT_GROUP_SIZE
from ..quant.stored import store_quantized
from .infra.base import Pass, PassContext, PassResult
from .infra.layer_clock import LayerClock
from .quantize_resume import QuantizeState, open_state

log = logging.getLogger(__name__)
METHODS = ("rtn", "hqq", "gptq")


@dataclass(frozen=True)
class QuantizeOptions:
    method: str = "rtn"
    group_size: int = DEFAULT_GROUP_SIZE
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
    resumable = True  # finished layers kept in ctx.state_dir (quantize_resume.py); not cacheable: writes weights

    def __init__(self, options=None, **kwargs) -> None:
        super().__init__(options, **kwargs)
        self.needs_calibration = self.options.method == "gptq"

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        """Quantize layer by layer; with ``ctx.work_dir`` each finished layer's codes go to disk.

        Memory holds one layer's weights (and, for gptq, its activations and one node's
        Hessians at a time), never the model's codes; time is linear in the number of quantized
        weights. With ``ctx.state_dir`` (the pass cache on) the finished layers are kept there and a
        rerun after an interruption loads them instead of quantizing them again
        (:mod:`.quantize_resume`).
        """
        o = self.options
        graph.meta["group_size"] = o.group_size
        declare_target_formats(graph.meta, ctx.backend)  # the stored codes' formats, for every later reader
        nodes = [n for n in graph.experts() if n.ann["bits"] < 16]
        # non-expert linear weights GPTQ rounds along with their layer (the lm_head after the last)
        others = [n for n in graph.nodes() if n.kind in NONEXPERT_QUANTIZABLE_KINDS and n.kind != "embed"
                  and n.ann.get("bits", 16) < 16] if o.method == "gptq" else []
        layers = sorted({n.attrs["layer"] for n in nodes} | {_layer(n) for n in others if _layer(n) is not None})
        remote = 0

        by_layer: dict = {}
        for n in nodes:
            by_layer.setdefault(n.attrs["layer"], []).append(n)
        # the units the pass finishes, in order, and their nodes (what the partial state keeps)
        units = {f"L{layer}": [n.id for n in by_layer.get(layer, []) + [m for m in others if _layer(m) == layer]]
                 for layer in layers}
        if any(_layer(n) is None for n in others):
            units["head"] = [n.id for n in others if _layer(n) is None]
        n_steps = len(units)  # layers (and the lm_head under gptq): the clock's steps
        units.update({n.id: [n.id] for n in self._nonexpert_nodes(graph, {n.id for n in others})})
        remotely = o.method != "gptq" and _remote_ok(ctx, graph)
        ids = ctx.calibration[: o.max_sequences] if o.method == "gptq" else None
        state = open_state(
            ctx.state_dir, ctx.work_dir, graph, units, o.group_size,
            boundary=0 if ids is None else ids.numel() * int(graph.meta.get("hidden_size") or 0) * 4)
        # finished before an interruption: not counted as this run's work in the bar and the ETA
        steps = set(list(units)[:n_steps])
        ready = [u for u in (state.ready if state is not None else ()) if u in steps]
        bar = tqdm(total=len(nodes), desc=f"quantize ({o.method})", unit="expert", disable=not ctx.progress,
                   leave=False, initial=sum(len(by_layer.get(int(u[1:]), [])) for u in ready if u != "head"))
        clock = LayerClock("quantize", n_steps, resumed=len(ready))

        def finish(layer: int | None, hessians_of: Callable[[object], dict]) -> None:
            name = "head" if layer is None else f"L{layer}"
            if state is not None and state.apply(name, graph):  # finished before the interruption
                return
            keys = []
            for node in by_layer.get(layer, []):
                keys += self.quantize_node(graph, node, hessians_of(node))
                bar.update(1)
            for node in (n for n in others if _layer(n) == layer):
                keys += self.quantize_node(graph, node, hessians_of(node))
            if keys and not (state is not None and state.save(name, graph, keys)) and ctx.work_dir is not None:
                graph.weights.spill(keys, Path(ctx.work_dir) / f"quantized-{name}.safetensors")
            clock.step(name)

        if o.method == "gptq":
            _stream_hessians(graph, ids, set(layers), finish, others, state)
        elif remotely:
            remote = self._run_remote(graph, ctx, layers, by_layer, bar, clock, state)
        else:
            for layer in layers:
                finish(layer, lambda node: {})
        bar.close()
        for node in graph.experts():  # kept experts carry an explicit "no quantization" record
            if node.ann["bits"] == 16:
                graph.annotate(node.id, "quant", {"spec": QuantSpec(bits=16).to_dict(), "tensors": {}})
        others = others + self._quantize_nonexpert(graph, ctx, {n.id for n in others}, state)
        stats = {"quantized_experts": len(nodes), "methods": _methods_used(graph, nodes, o.method),
                 **({"remote_tasks": remote} if remote else {})}
        if others:
            stats["quantized_nonexpert"] = len(others)
            stats["nonexpert_methods"] = _methods_used(graph, others, o.method)
        if state is not None:
            state.finish(graph)
            if state.resumed:
                stats["resumed_units"] = state.resumed
        return PassResult(graph, modified=bool(nodes or others), stats=stats)

    def _run_remote(self, graph: Graph, ctx: PassContext, layers: list[int], by_layer: dict, bar, clock,
                    state: QuantizeState | None) -> int:
        """RTN/HQQ of each layer's experts as executor tasks (``compile --ray``); returns how many were
        submitted. Every task writes the file the serial loop would spill that layer's codes to; the
        tensors and annotations are put in the graph here, in layer order, so the graph ends up exactly
        as after the serial loop. With ``state`` (partial state, :mod:`.quantize_resume`) the layers an
        interrupted run finished are loaded from it, not submitted, and each task's file carries its
        unit's header and is moved into the state folder as soon as the task is done, whatever the
        order, so that an interruption keeps every layer finished so far."""
        from .infra.remote_tasks import layer_quantize

        todo = [layer for layer in layers if state is None or f"L{layer}" not in state.ready]
        remote = ctx.executor.put(graph) if todo else None
        path = {layer: Path(ctx.work_dir) / f"quantized-L{layer}.safetensors" for layer in todo}
        waiting = [(layer, ctx.executor.submit(layer_quantize, remote, self.options, [n.id for n in by_layer[layer]],
                                               str(path[layer]), None if state is None else (state.folder.name, f"L{layer}")))
                   for layer in todo]
        arrived: dict[int, tuple] = {}
        for layer in layers:
            if layer not in path:  # finished before the interruption
                state.apply(f"L{layer}", graph)
                continue
            while layer not in arrived:  # keep whatever is done meanwhile
                done = set(ctx.executor.done([f for _, f in waiting], block=True))
                for (la, f), result in zip([w for i, w in enumerate(waiting) if i in done],
                                           ctx.executor.get([f for i, (_, f) in enumerate(waiting) if i in done])):
                    keys, anns = result
                    where = state.keep(f"L{la}", path[la]) if state is not None and keys else path[la]
                    arrived[la] = (where, keys, anns)
                waiting = [w for i, w in enumerate(waiting) if i not in done]
            where, keys, anns = arrived.pop(layer)
            refs = index_safetensors(where) if keys else {}
            for key in keys:  # in the order the serial pass adds them
                if key in graph.weights:  # as store_quantized replaces them
                    graph.weights.remove(key)
                graph.weights.add_ref(key, refs[key])
            for node_id, ann in anns.items():
                graph.annotate(node_id, "group_size", ann["group_size"])
                graph.annotate(node_id, "quant", ann["quant"])
                bar.update(1)
            clock.step(f"L{layer}")
        return len(todo)

    @staticmethod
    def _nonexpert_nodes(graph: Graph, done: set[str]) -> list:
        """The non-expert nodes with bits that :meth:`_quantize_nonexpert` quantizes (not in ``done``)."""
        return [n for n in graph.nodes() if n.kind in NONEXPERT_QUANTIZABLE_KINDS and n.ann.get("bits", 16) < 16
                and n.id not in done]

    def _quantize_nonexpert(self, graph: Graph, ctx: PassContext, done: set[str], state=None) -> list:
        """Quantize the non-expert nodes the ``precision`` pass gave bits that ``run`` did not
        (``done``: GPTQ-rounded with their layer), one node at a time: all of them under rtn and
        hqq, the embedding table under gptq (a lookup has no input Hessian: rtn, logged)."""
        nodes = self._nonexpert_nodes(graph, done)
        if nodes and self.options.method == "gptq":
            log.warning("gptq: the embedding table is quantized with rtn (a row lookup has no input Hessian); "
                        "its spec says so")
        for node in nodes:
            if state is not None and state.apply(node.id, graph):  # finished before the interruption
                continue
            keys = self.quantize_node(graph, node, {}, nonexpert_method(self.options.method))
            if keys and not (state is not None and state.save(node.id, graph, keys)) and ctx.work_dir is not None:
                graph.weights.spill(keys, Path(ctx.work_dir) / f"quantized-{node.id}.safetensors")
        return [graph.node(n.id) for n in nodes]

    def quantize_node(self, graph: Graph, node, hessians: dict, method: str | None = None) -> list[str]:
        fmt = declared_format(graph.meta, node.ann["bits"])
        spec = fmt.spec(self.options.group_size, method_for(fmt, method or self.options.method))
        tensors = {}
        for roles in _shared_hessian_groups(node, spec, hessians):
            # RTN takes the weights as stored (its native path widens a bf16 row at a time); the others fp32
            ws = [w if spec.method == "rtn" else w.float() for w in (graph.weights[node.params[r]] for r in roles)]
            if len(roles) == 1:
                parts = [_quantize_one(ws[0], spec, hessians.get((node.id, roles[0])))]
            else:  # GPTQ's rows are independent given H: one run over the stacked rows, then split
                parts = _split_rows(_quantize_one(torch.cat(ws), spec, hessians[(node.id, roles[0])]),
                                    [w.shape[0] for w in ws])
            del ws
            for role, qt in zip(roles, parts):
                tensors[role] = store_quantized(graph.weights, f"{node.id}.{role}", qt)
        graph.annotate(node.id, "group_size", self.options.group_size)
        graph.annotate(node.id, "quant", {"spec": spec.to_dict(), "tensors": tensors})
        return [t[k] for t in tensors.values() for k in ("q", "scale", "zero")]


def _remote_ok(ctx: PassContext, graph: Graph) -> bool:
    """Whether the experts' RTN/HQQ runs as executor tasks: an executor, a scratch folder the tasks
    write their layers' codes to, and a graph that can be sent (weights on disk)."""
    if ctx.executor is None or ctx.work_dir is None:
        return False
    from .infra.remote_tasks import sendable

    return sendable(graph)


def _methods_used(graph: Graph, nodes: list, asked: str) -> dict[str, int]:
    """How many nodes each method quantized; logs the bit-widths whose format made ``asked``
    fall back (:func:`method_for`; not the embedding table's RTN under gptq, logged apart)."""
    methods: dict[str, int] = {}
    for node in nodes:
        used = node.ann["quant"]["spec"]["method"]
        methods[used] = methods.get(used, 0) + 1
    fell_back = {n.ann["bits"] for n in nodes if n.ann["quant"]["spec"]["method"] != asked
                 and method_for(declared_format(graph.meta, n.ann["bits"]), asked) != asked}
    for bits in sorted(fell_back):
        log.warning("%s cannot produce the target's %s weights (no zero point to optimise): those weights "
                    "are quantized with rtn, and their spec says so", asked,
                    declared_format(graph.meta, bits).describe())
    return methods


def nonexpert_method(method: str) -> str:
    """The method non-expert weights quantized outside the Hessian stream (the embedding table
    under gptq, everything under rtn/hqq) get: ``method``, or ``rtn`` for ``gptq``."""
    return "rtn" if method == "gptq" else method


def _layer(node) -> int | None:
    """The decoder layer of a non-expert node (None for the lm_head)."""
    layer = node.attrs.get("layer")
    return None if layer is None else int(layer)


def method_for(fmt: WeightFormat, method: str) -> str:
    """The method that can produce ``fmt``'s codes: ``method``, or ``rtn`` for ``hqq`` on a
    symmetric format (HQQ optimises zero points; the format has none)."""
    return "rtn" if method == "hqq" and fmt.symmetric else method


def _shared_hessian_groups(node, spec: QuantSpec, hessians: dict) -> list[tuple[str, ...]]:
    """``node``'s quantized roles in order, grouped for one GPTQ run each: roles whose weights
    have the same input width and read the same Hessian tensor (an expert's gate and up, the
    attention's q, k and v) form one group; every other role, and every role under another
    method, is its own group. Stacking rows gives the codes of separate runs (GPTQ treats rows
    independently given H) at one factorisation and one column loop instead of several: an
    OLMoE-width expert takes 0.84x the time of one run per role (``benchmarks/bench_gptq.py``)."""
    roles = QUANT_ROLES[node.kind]
    if spec.method != "gptq":
        return [(r,) for r in roles]
    groups: list[list[str]] = []
    for role in roles:
        h = hessians.get((node.id, role))
        group = next((g for g in groups if h is not None and hessians.get((node.id, g[0])) is h), None)
        if group is None:
            groups.append([role])
        else:
            group.append(role)
    return [tuple(g) for g in groups]


def _split_rows(qt: QuantizedTensor, rows: list[int]) -> list[QuantizedTensor]:
    """A :class:`QuantizedTensor` of stacked weights split back into one per weight (by rows)."""
    out, start = [], 0
    for n in rows:
        rows_of = slice(start, start + n)  # copies: a view would keep the stacked tensors alive
        out.append(QuantizedTensor(q=qt.q[rows_of].clone(), scale=qt.scale[rows_of].clone(),
                                   zero=qt.zero[rows_of].clone(), spec=qt.spec, shape=(n, *qt.shape[1:])))
        start += n
    return out


def _quantize_one(w: torch.Tensor, spec: QuantSpec, hessian: torch.Tensor | None):
    if spec.method == "rtn":
        return quantize(w, spec)
    if spec.method == "hqq":
        from ..quant.hqq import hqq_quantize

        return hqq_quantize(w, spec)
    from ..quant.gptq import gptq_quantize

    return gptq_quantize(w, hessian, spec)


def _stream_hessians(graph: Graph, ids: torch.Tensor, layers: set[int],
                     finish: Callable[[int | None, Callable[[object], dict]], None],
                     others: list | None = None, state: QuantizeState | None = None) -> None:
    """Run the full-precision model layer-major and hand each layer in ``layers`` a function that
    computes one node's Hessians ``H = X^T X / n`` from the layer's recorded activations: an
    expert's over its routed calibration tokens, a non-expert node's in ``others`` over every
    token (:func:`_nonexpert_hessians`). An ``lm_head`` among ``others`` is handed over last,
    with layer None. Computed per node when asked, so memory holds one node's Hessians, not the
    layer's (64 experts' at OLMoE widths are 1.3 GB; a Mixtral-width expert's down_proj alone
    reads a 14336^2 Hessian, 0.8 GB).

    With ``state`` (partial state of an interrupted run) the forward starts at the newest kept
    residual stream at or before the first unfinished layer (the layers before it are handed over
    first, and loaded from the state by ``finish``), and keeps the stream entering the next layer
    after each layer it hands over. The stream is the full-precision model's, so where it starts
    changes nothing in it."""
    interp = Interpreter(graph, quantize=False)
    others = others or []
    inputs = {graph.inputs(n.id)[0]: n for n in others}
    seen: dict = {}

    def observe(node_id, kind, value):
        if node_id.endswith(".moe_norm") or kind == "router" or node_id in inputs:
            seen[node_id] = value

    opts = RunOptions(quantize=False, observer=observe)
    outs = layer_outputs(graph)
    heads = [(inp, n) for inp, n in inputs.items() if _layer(n) is None]
    start, h = 0, None
    if state is not None:
        todo = [la for la in sorted(layers) if f"L{la}" not in state.ready]
        first = todo[0] if todo else len(outs) if heads and "head" not in state.ready else None
        if first is None:  # every unit finished: nothing to run
            for layer in sorted(layers):
                finish(layer, lambda node: {})
            if heads:
                finish(None, lambda node: {})
            return
        kept = state.boundary(first, (*ids.shape, int(graph.meta["hidden_size"])))
        if kept is not None:
            start, h = kept
            for layer in sorted(la for la in layers if la < start):
                finish(layer, lambda node: {})
    with torch.no_grad():
        if h is None:
            h = embed(interp, ids, opts)
        for layer in range(start, len(outs)):
            seen.clear()
            h = run_layer(interp, layer, h, opts)
            if layer in layers:
                finish(layer, lambda node, layer=layer: _node_hessians(graph, interp, layer, node, seen))
                if state is not None and (layer + 1 < len(outs) or heads):
                    state.keep_boundary(layer + 1, h)
        if heads:
            if state is not None and "head" in state.ready:
                finish(None, lambda node: {})
                return
            run = RunOptions(quantize=False, resume={outs[-1]: h})
            values = interp.run(None, run, outputs=tuple(inp for inp, _ in heads))
            finish(None, lambda node: _nonexpert_hessians(interp, node, values[graph.inputs(node.id)[0]]))


def _gram(x: torch.Tensor) -> torch.Tensor:
    """``X^T X / n`` over the rows of ``x`` flattened to ``[n, features]``."""
    x = x.reshape(-1, x.shape[-1]).float()
    return x.T @ x / max(1, len(x))


def _nonexpert_hessians(interp: Interpreter, node, x: torch.Tensor) -> dict[tuple[str, str], torch.Tensor]:
    """Input Hessians of a non-expert node's linear weights, from its input ``x`` (every token):
    attention q/k/v read ``x`` and o the attention context (the same attention with an identity
    output projection); a shared expert or MLP's gate/up read ``x`` and down the gated product;
    the lm_head reads ``x``."""
    from ..ir import ops

    w = interp.weights(node.id, RunOptions(quantize=False))
    h = _gram(x)
    if node.kind == "attention":
        context = ops.attention_context(x, w, node.attrs)
        return {(node.id, "q"): h, (node.id, "k"): h, (node.id, "v"): h, (node.id, "o"): _gram(context)}
    if node.kind in ("shared_expert", "mlp"):
        return _swiglu_hessians(node.id, x, w, h)
    return {(node.id, role): h for role in QUANT_ROLES[node.kind]}


def _swiglu_hessians(node_id: str, x: torch.Tensor, w: dict, h: torch.Tensor | None = None
                     ) -> dict[tuple[str, str], torch.Tensor]:
    """gate/up read ``x`` (whose Gram ``h`` may be given), down the gated product ``silu(x Wg) * x Wu``."""
    h = _gram(x) if h is None else h
    mid = F.silu(F.linear(x, w["gate"])) * F.linear(x, w["up"])
    return {(node_id, "gate"): h, (node_id, "up"): h, (node_id, "down"): _gram(mid)}


def _node_hessians(graph: Graph, interp: Interpreter, layer: int, node, acts: dict
                   ) -> dict[tuple[str, str], torch.Tensor]:
    """One node's Hessians from the layer's recorded activations ``acts``: an expert's from the
    MoE input of the tokens routed to it, a non-expert node's from its own input."""
    if node.kind != "expert":
        return _nonexpert_hessians(interp, node, acts[graph.inputs(node.id)[0]])
    x = acts[layer_node(layer, "moe_norm")].reshape(-1, graph.meta["hidden_size"])
    token_idx, _ = torch.where(acts[layer_node(layer, "router")].indices == node.attrs["expert"])
    return _swiglu_hessians(node.id, x[token_idx], interp.weights(node.id, RunOptions(quantize=False)))
