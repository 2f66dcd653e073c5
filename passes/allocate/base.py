"""``allocate``: choose every expert's bit-width with one of the allocators under a budget.

The pass only translates between the IR and the allocators' problem description
(:mod:`dmpq_compile.passes.allocate`): annotations in, ``bits`` out.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Any

from ...ir.graph import QUANT_ROLES, Graph
from ...quant.spec import DEFAULT_GROUP_SIZE
from ..infra.base import Pass, PassContext, PassError, PassResult
from . import allocator_class, allocators, get_allocator
from .problem import (
    DEFAULT_DISPATCH,
    DISPATCHES,
    AllocationProblem,
    Budget,
    ExpertCost,
    ExpertInfo,
    ObjectiveWeights,
    budget_usage,
    check_feasible,
)

log = logging.getLogger(__name__)

# KL is the default metric ("sensitivity" in an allocator's needs) because it measured better:
# on samples/mixtral-tiny the exact optimum of the KL model gave lower test perplexity than that
# of the NLL model at 2.5, 3 and 3.5 average bits (43.33/43.26/43.13 vs 43.52/43.41/43.30); NLL
# increases of single experts are small and noisy (often negative).
DEFAULT_ALLOCATOR = "optimal"  # won the allocator ablation (docs/allocators.md)
DEFAULT_CODE_BITS = 4.0  # a code-bits budget (--budget-code-bits) given without a value


@dataclass(frozen=True)
class AllocateOptions:
    allocator: str = DEFAULT_ALLOCATOR
    budget_kind: str = "bits"  # bits (experts' code bits) | stored-bits (whole model) | bytes | latency
    budget: float = DEFAULT_CODE_BITS
    w_acc: float = 1.0
    w_lat: float = 0.0
    w_mem: float = 0.0
    w_eng: float = 0.0
    bits: tuple[int, ...] | None = None  # default: the backend's supported bits, else (2, 3, 4, 8, 16)
    allocator_options: dict[str, Any] = field(default_factory=dict)
    metric: str = "kl"  # what "accuracy loss" means for optimal/rl: per-expert "kl" or "nll" increase
    rl_measure_sequences: int = 8  # rl/search: calibration sequences for measured accuracy (0: proxy only)
    rl_hardware: bool = False  # rl/search: also time emitted artifacts every measure_every proposals
    nonexpert: tuple[str, ...] = ()  # non-expert kinds allocated with the experts (--nonexpert-bits auto)
    dispatch: str = DEFAULT_DISPATCH  # the expert layout the latency term prices: the emitter's (--dispatch)


class AllocatePass(Pass):
    name = "allocate"
    requires = ("freq",)
    provides = ("bits",)
    Options = AllocateOptions
    description = "bit assignment per expert under a budget, by a registered allocator (optimal, search, ...)"

    def __init__(self, options=None, **kwargs) -> None:
        super().__init__(options, **kwargs)
        o = self.options
        try:
            cls = allocator_class(o.allocator)
        except ValueError as e:
            raise PassError(str(e)) from None
        if o.metric not in ("kl", "nll"):
            raise PassError(f"metric must be 'kl' or 'nll', got {o.metric!r}")
        if o.dispatch not in DISPATCHES:
            raise PassError(f"dispatch must be one of {DISPATCHES} (the layout the latency term prices), "
                            f"got {o.dispatch!r}")
        extra = tuple("kl" if k == "sensitivity" and o.metric == "kl" else k for k in cls.needs)
        needs_cost = o.budget_kind in ("bytes", "latency") or max(o.w_lat, o.w_mem, o.w_eng) > 0
        self.requires = ("freq", *extra, *(("cost",) if needs_cost else ()))
        self.needs_calibration = cls.measures and o.rl_measure_sequences > 0
        if o.nonexpert:
            check_nonexpert_allocation(o.allocator, o.budget_kind, max(o.w_lat, o.w_mem, o.w_eng) > 0)

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        problem = build_problem(graph, self.options, ctx)
        check_feasible(problem)
        allocator = get_allocator(self.options.allocator, **allocator_call_options(self.options, ctx, graph))
        allocation = allocator.allocate(problem)
        columns = nonexpert_items(graph, self.options, ctx)
        for node_id, bits in allocation.items():
            graph.annotate(node_id, "bits", int(columns[node_id][bits] if node_id in columns else bits))
        used = budget_usage(problem, allocation)
        log.info("allocate %s: budget %s, used %s", self.options.allocator, problem.budget.describe(),
                 problem.budget.describe(used))
        stats = {"allocator": self.options.allocator, "budget": problem.budget.describe(),
                 "used": problem.budget.describe(used)}
        if problem.needs_costs:
            stats["dispatch"] = problem.dispatch  # the layout the latency and cost terms priced
        if columns:
            stats["nonexpert"] = {k: graph.node(k).ann["bits"] for k in columns}
            log.info("allocate: non-expert bits %s", stats["nonexpert"])
        if self.options.w_eng > 0:
            stats["energy_source"] = _energy_label()
            log.info("allocate: energy term from %s", stats["energy_source"])
        return PassResult(graph, modified=True, stats=stats)


def _energy_label() -> str:
    """What the energy term of the objective rests on, for logs and reports."""
    from .measure import energy_source

    source = energy_source()
    if source == "analytical":
        return "analytical model (cost table energy_mj; no RAPL or NVML counter on this machine)"
    return (f"analytical model (cost table energy_mj); a {source.upper()} counter exists here but the cost "
            "tables do not read it yet")


def allocator_call_options(o: AllocateOptions, ctx: PassContext, graph: Graph) -> dict[str, Any]:
    opts = dict(o.allocator_options)
    if not allocator_class(o.allocator).measures:
        return opts
    from .measure import MEASURE_MAX_PARAMS, artifact_hardware_fn, interpreter_accuracy_fn

    opts.setdefault("seed", ctx.seed)
    if o.allocator == "rl":
        opts.setdefault("progress", ctx.progress)
    wants = o.rl_measure_sequences > 0 or o.rl_hardware
    n_params = sum(math.prod(graph.weights.shape(k)) for k in graph.weights) if wants else 0  # shapes: no reads
    if n_params > MEASURE_MAX_PARAMS:
        log.warning("allocate %s: the model has %.3g parameters (> %.3g): whole-model measurements through the "
                    "interpreter or emitted artifacts are off at this size; using the proxy objective only "
                    "(sum of per-expert sensitivities and cost-table costs)", o.allocator, n_params,
                    MEASURE_MAX_PARAMS)
        return opts
    if wants:  # measurements fake-quantize (and the hardware callback quantizes) in the target's formats
        from ...quant.formats import declare_target_formats

        declare_target_formats(graph.meta, ctx.backend)
    if o.rl_measure_sequences > 0:
        opts.setdefault("accuracy_fn", interpreter_accuracy_fn(graph, ctx.calibration, o.rl_measure_sequences,
                                                               o.metric))
    if o.rl_hardware:
        if ctx.backend is None or ctx.open_artifact is None:
            raise PassError("rl_hardware needs a target backend and the driver's open_artifact "
                            "(PassContext) to emit and time artifacts")
        opts.setdefault("hardware_fn", artifact_hardware_fn(graph, ctx.backend, ctx.open_artifact))
    return opts


def bits_choices(o: AllocateOptions, ctx: PassContext) -> tuple[int, ...]:
    supported = tuple(getattr(ctx.backend, "supported_bits", ()) or (2, 3, 4, 8, 16))
    if o.bits is None:
        return supported
    bad = [b for b in o.bits if b not in supported]
    if bad:
        raise PassError(f"bits {bad} are not supported by target {getattr(ctx.backend, 'name', None)!r} "
                        f"(supported: {supported})")
    return tuple(o.bits)


def check_nonexpert_allocation(allocator: str, budget_kind: str, cost_terms: bool) -> None:
    """Refuse settings under which non-expert nodes cannot be allocated (``--nonexpert-bits auto``)."""
    placing = tuple(n for n, cls in allocators().items() if cls.places_nonexperts)
    if allocator not in placing:
        raise PassError(f"--nonexpert-bits auto places non-expert weights with allocators {placing}, "
                        f"not {allocator!r} (it reads router features or measures experts only); choose one of "
                        "them or give the non-expert bits as a policy (e.g. --nonexpert-bits 4,lm_head=8)")
    if budget_kind != "stored-bits":
        raise PassError("--nonexpert-bits auto needs a whole-model budget: --budget-bits (stored bits per weight); "
                        f"a {budget_kind!r} budget counts experts only")
    if cost_terms:
        raise PassError("--nonexpert-bits auto has no cost table for non-expert nodes: set --w-lat, --w-mem and "
                        "--w-eng to 0, or give the non-expert bits as a policy")


def nonexpert_items(graph: Graph, o: AllocateOptions, ctx: PassContext) -> dict[str, dict[int, int]]:
    """The non-expert nodes the allocator places, each with ``{column: bits}`` (``precision.allocatable``)."""
    if not o.nonexpert:
        return {}
    from ..precision import allocatable

    return allocatable(graph, ctx.backend, o.nonexpert, bits_choices(o, ctx))


def build_problem(graph: Graph, o: AllocateOptions, ctx: PassContext) -> AllocationProblem:
    target = getattr(ctx.backend, "name", None)
    choices = bits_choices(o, ctx)
    columns = nonexpert_items(graph, o, ctx)
    budget, stored = Budget(o.budget_kind, o.budget), {}
    if o.budget_kind == "stored-bits":
        budget, stored = stored_bits_budget(graph, ctx.backend, o.budget, choices, items=columns)
    experts = []
    for node in graph.experts():
        cost = node.ann.get("cost", {}).get(target, {}) if target else {}
        experts.append(ExpertInfo(
            key=node.id, layer=node.attrs["layer"], expert=node.attrs["expert"],
            n_params=_matrix_params(graph, node),
            freq=float(node.ann["freq"]), mass=float(node.ann.get("mass", 0.0)),
            sensitivity=dict(node.ann.get(o.metric if o.metric == "kl" else "sensitivity", {})),
            kl=dict(node.ann.get("kl", {})),
            contribution=float(node.ann.get("contribution", 0.0)),
            router_grad_change=node.ann.get("router_grad_change"),
            neuron_variance=node.ann.get("neuron_variance"),
            cost={int(b): ExpertCost(**row) for b, row in cost.items()},
            stored_bytes=stored.get(node.id, {}),
        ))
    for node_id, col in columns.items():
        node = graph.node(node_id)
        kl = {int(b): float(v) for b, v in node.ann.get("kl", {}).items()}
        missing = sorted({b for b in col.values() if b not in kl and b < 16})
        if missing:
            raise PassError(f"allocate: non-expert node {node_id} has no sensitivity for bits {missing}; run the "
                            "sensitivity pass with the same non-expert kinds (nonexpert=...) before allocate")
        per_column = {c: kl.get(b, 0.0) for c, b in col.items()}
        experts.append(ExpertInfo(
            key=node_id, layer=int(node.attrs.get("layer", -1)), expert=-1,
            n_params=_matrix_params(graph, node),
            freq=1.0, mass=1.0, sensitivity=per_column, kl=per_column, stored_bytes=stored.get(node_id, {})))
    return AllocationProblem(tuple(experts), choices, budget, ObjectiveWeights(o.w_acc, o.w_lat, o.w_mem, o.w_eng),
                             dispatch=o.dispatch)


def _matrix_params(graph: Graph, node: Any) -> int:
    """Parameters of the weight matrices whose bits the allocator sets (``QUANT_ROLES`` of the kind)."""
    return sum(math.prod(graph.weights.shape(node.params[r])) for r in QUANT_ROLES[node.kind])


def stored_bits_budget(graph: Graph, backend: Any, value: float, choices: tuple[int, ...],
                       nonexpert_bits: int | None = None, kinds: dict[str, int] | None = None,
                       items: dict[str, dict[int, int]] | None = None
                       ) -> tuple[Budget, dict[str, dict[int, int]]]:
    """The stored-bits budget of ``graph`` on ``backend`` and each allocated node's stored bytes
    per bits column: every routed expert, and the non-expert ``items`` (``{node id: {column:
    bits}}``, :func:`~.precision.allocatable`).

    The fixed part is every other weight as ``backend`` stores it, at the bits the ``precision``
    pass gave (or ``nonexpert_bits`` and the per-kind ``kinds`` for the nodes it would give them
    to, for an estimate before the pass ran); the parameter count is every weight's, tied ones
    once. Shapes only: nothing is read.
    """
    from ..infra.storage import node_stored_bytes, param_count, stored_weight_bytes
    from ..precision import policy_bits

    if backend is None:
        raise PassError("a stored-bits budget (--budget-bits) needs a target whose storage is known (--target); "
                        "use --budget-code-bits without one")
    gs = int(graph.meta.get("group_size", DEFAULT_GROUP_SIZE))
    override = policy_bits(graph, nonexpert_bits, backend, kinds) if nonexpert_bits is not None else None
    try:
        per_node = stored_weight_bytes(graph, backend, gs, override)
    except NotImplementedError as e:
        raise PassError(f"{e}: a stored-bits budget (--budget-bits) cannot be met there; use --budget-code-bits") \
            from None
    columns = {n.id: {b: b for b in choices} for n in graph.experts()} | dict(items or {})
    fixed = sum(b for k, b in per_node.items() if k not in columns)
    params = param_count(graph)
    stored = node_stored_bytes(graph, backend, columns, gs)
    return Budget("stored-bits", value, fixed=8 * fixed / params, params=params), stored
