"""The bit-allocation problem: experts, bit-width choices, a budget and an objective.

Budget definitions (``Budget.kind``):

* ``"bits"``: average weight bit-width weighted by parameter count,
  ``sum_i n_params_i * b_i / sum_i n_params_i``; unit "average bits".
* ``"bytes"``: total expert weight bytes, ``sum_i cost_i[b_i].bytes``; unit "bytes".
* ``"latency"``: expected per-token decode latency of the experts,
  ``sum_i (freq_i * cost_i[b_i].decode_ms + cost_i[b_i].idle_decode_ms)``; ``freq_i`` is the
  fraction of tokens routed to expert ``i`` (so the ``freq`` of one layer sums to top-k); unit
  "ms per token". That is per-expert dispatch; the layout priced is the one the compile emits
  (``AllocationProblem.dispatch``, :data:`DISPATCHES`). ``fused`` (the default): where the target
  fuses a layer's experts of one width into one op, the layer's groups pay the op's fixed part once
  and their experts the fused cost; ``kernel``: the experts the layer's one kernel node takes cost
  ``freq_i * kernel_decode_ms`` and the layer pays the node's fixed part once if it holds any
  (:mod:`.fusion`). Neither is a per-expert sum, so :class:`ProblemTables` carries it as a correction
  (``fusion``). ``gather-if``, ``gather`` and ``dense`` are priced as per-expert dispatch (the cost
  table measures ``gather-if``'s).
* ``"stored-bits"``: stored bits per weight of the whole model,
  ``(fixed_bytes + sum_i stored_bytes_i[b_i]) * 8 / params``: every weight as the target stores
  it (codes, scales, zero points, float tensors) over every parameter, experts or not. What the
  experts' bits do not change (non-expert weights at the ``precision`` policy's bits, norms,
  embedding) is ``Budget.fixed`` (already in stored bits per weight); ``Budget.params`` is the
  model's parameter count and ``ExpertInfo.stored_bytes`` each expert's bytes per bit-width.
  Unit "stored bits per weight".

Every kind is ``fixed + sum_i usage_i[b_i]`` (``fixed`` is 0 except for stored bits), so the
allocators see the per-expert part against ``AllocationProblem.capacity = value - fixed``.

Objective (minimised): ``sum_i w_acc * sensitivity_i[b_i] + w_lat * L + w_mem * M + w_eng * E``
with the cost terms normalised by the all-highest-bits allocation (``max(bits_choices)``,
normally 16): ``L = sum freq*decode_ms / ref``, ``M = sum bytes / ref``,
``E = sum freq*energy_mj / ref``. Every term but the fused-dispatch correction of ``L`` is a per-expert
sum, laid out by :func:`build_tables` as an ``experts x bits`` matrix; the correction depends on
which widths each layer uses (:class:`~.fusion.FusionTables`, exact in :mod:`.optimal`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import ClassVar, Literal, Protocol

import numpy as np

from .fusion import FusionTables, fusion_tables, kernel_fixed, kernel_tables

Allocation = dict[str, int]
BudgetKind = Literal["bits", "bytes", "latency", "stored-bits"]
BUDGET_KINDS: tuple[str, ...] = ("bits", "bytes", "latency", "stored-bits")
BUDGET_UNITS = {"bits": "average bits", "bytes": "bytes", "latency": "ms per token",
                "stored-bits": "stored bits per weight"}
FEASIBILITY_RTOL = 1e-9
DISPATCHES = ("fused", "kernel", "gather-if", "gather", "dense")
"""Expert dispatches the latency term can price (ort-cpu's ``--dispatch``); see the module docstring."""
DEFAULT_DISPATCH = "fused"


def _frozen_map(obj: object, name: str, value: Mapping) -> None:
    object.__setattr__(obj, name, MappingProxyType(dict(value)))


def _require_finite_nonnegative(obj: object, prefix: str, names: tuple[str, ...]) -> None:
    """Raise ``ValueError`` naming the first of ``obj``'s fields ``names`` that is not finite and >= 0."""
    for name in names:
        v = getattr(obj, name)
        if not (math.isfinite(v) and v >= 0):
            raise ValueError(f"{prefix}{name} must be finite and >= 0, got {v}")


@dataclass(frozen=True)
class ExpertCost:
    """Cost of one expert at one bit-width, from the backend's cost table (the fields of
    :class:`dmpq_compile.backends.base.ExpertCostRow`; ``fused_*`` None where the width cannot run
    in the target's fused MoE op, see :mod:`.fusion`)."""

    decode_ms: float
    prefill_ms: float
    bytes: int
    energy_mj: float
    idle_decode_ms: float = 0.0
    idle_prefill_ms: float = 0.0
    fused_decode_ms: float | None = None
    fused_prefill_ms: float | None = None
    group_decode_ms: float = 0.0
    group_prefill_ms: float = 0.0
    kernel_decode_ms: float | None = None
    kernel_prefill_ms: float | None = None
    kernel_fixed_decode_ms: float = 0.0
    kernel_fixed_prefill_ms: float = 0.0

    def __post_init__(self) -> None:
        _require_finite_nonnegative(self, "ExpertCost.", ("decode_ms", "prefill_ms", "bytes", "energy_mj",
                                                          "idle_decode_ms", "idle_prefill_ms", "group_decode_ms",
                                                          "group_prefill_ms", "kernel_fixed_decode_ms",
                                                          "kernel_fixed_prefill_ms"))
        for op in ("fused", "kernel"):
            if (getattr(self, f"{op}_decode_ms") is None) != (getattr(self, f"{op}_prefill_ms") is None):
                raise ValueError(f"ExpertCost: give both {op}_decode_ms and {op}_prefill_ms, or neither")
            if getattr(self, f"{op}_decode_ms") is not None:
                _require_finite_nonnegative(self, "ExpertCost.", (f"{op}_decode_ms", f"{op}_prefill_ms"))

    def latency(self, freq: float) -> float:
        """Mean per-token decode cost under per-expert dispatch of an expert routed ``freq`` of tokens."""
        return freq * self.decode_ms + self.idle_decode_ms


@dataclass(frozen=True)
class ExpertInfo:
    """Everything the allocators know about one expert (see the module docstring for units)."""

    key: str
    layer: int
    expert: int
    n_params: int
    freq: float
    mass: float
    sensitivity: Mapping[int, float]
    kl: Mapping[int, float] = field(default_factory=dict)
    contribution: float = 0.0
    router_grad_change: float | None = None
    neuron_variance: float | None = None
    cost: Mapping[int, ExpertCost] = field(default_factory=dict)
    stored_bytes: Mapping[int, int] = field(default_factory=dict)  # bytes the target stores, per bits

    def __post_init__(self) -> None:
        for name in ("sensitivity", "kl", "cost", "stored_bytes"):
            _frozen_map(self, name, getattr(self, name))
        if self.n_params <= 0:
            raise ValueError(f"expert {self.key!r}: n_params must be > 0, got {self.n_params}")
        if not (math.isfinite(self.freq) and 0.0 <= self.freq <= 1.0):
            raise ValueError(f"expert {self.key!r}: freq must be in [0, 1], got {self.freq}")
        bad = {b: s for b, s in self.sensitivity.items() if not math.isfinite(s)}
        if bad:
            raise ValueError(f"expert {self.key!r}: sensitivity values must be finite, got {bad}")

    def sens(self, bits: int) -> float:
        """Loss increase at ``bits`` (16 bits defaults to 0)."""
        if bits in self.sensitivity:
            return float(self.sensitivity[bits])
        if bits == 16:
            return 0.0
        raise ValueError(f"expert {self.key!r} has no sensitivity for {bits} bits (has "
                         f"{sorted(self.sensitivity)}): run the sensitivity pass for these bits "
                         "or drop them from bits_choices")


@dataclass(frozen=True)
class Budget:
    """A resource limit; see the module docstring for the kinds.

    ``fixed`` (budget units) is the usage no allocation changes and ``params`` the parameter
    count stored bits are averaged over; both are only for ``"stored-bits"``.
    """

    kind: BudgetKind
    value: float
    fixed: float = 0.0
    params: int = 0

    def __post_init__(self) -> None:
        if self.kind not in BUDGET_KINDS:
            raise ValueError(f"unknown budget kind {self.kind!r}; use one of {BUDGET_KINDS}")
        if not math.isfinite(self.value):
            raise ValueError(f"budget value must be finite, got {self.value}")
        if not (math.isfinite(self.fixed) and self.fixed >= 0):
            raise ValueError(f"budget fixed usage must be finite and >= 0, got {self.fixed}")
        if self.kind != "stored-bits" and (self.fixed or self.params):
            raise ValueError(f"only a stored-bits budget has fixed usage and a parameter count, not {self.kind!r}")

    def describe(self, value: float | None = None) -> str:
        """Format ``value`` (default: this budget's value) with its unit."""
        v = self.value if value is None else value
        text = f"{v:.0f}" if self.kind == "bytes" else f"{v:.2f}" if self.kind in ("bits", "stored-bits") \
            else f"{v:.4g}"
        return f"{text} {BUDGET_UNITS[self.kind]}"


@dataclass(frozen=True)
class ObjectiveWeights:
    """Weights of accuracy, latency, memory and energy in the objective."""

    w_acc: float = 1.0
    w_lat: float = 0.0
    w_mem: float = 0.0
    w_eng: float = 0.0

    def __post_init__(self) -> None:
        _require_finite_nonnegative(self, "objective weight ", ("w_acc", "w_lat", "w_mem", "w_eng"))


@dataclass(frozen=True)
class AllocationProblem:
    """Experts, the backend's bit-widths, a budget and objective weights."""

    experts: tuple[ExpertInfo, ...]
    bits_choices: tuple[int, ...]
    budget: Budget
    weights: ObjectiveWeights = ObjectiveWeights()
    dispatch: str = DEFAULT_DISPATCH  # the expert layout the latency term prices (module docstring)

    def __post_init__(self) -> None:
        if self.dispatch not in DISPATCHES:
            raise ValueError(f"unknown dispatch {self.dispatch!r}; the latency term prices {DISPATCHES}")
        object.__setattr__(self, "experts", tuple(self.experts))
        choices = tuple(self.bits_choices)
        if not choices or any(isinstance(b, bool) or not isinstance(b, int) or b <= 0 for b in choices):
            raise ValueError(f"bits_choices must be non-empty positive ints, got {choices}")
        object.__setattr__(self, "bits_choices", tuple(sorted(set(choices))))
        if not self.experts:
            raise ValueError("AllocationProblem has no experts: nothing to allocate")
        keys = [e.key for e in self.experts]
        dupes = sorted({k for k in keys if keys.count(k) > 1})
        if dupes:
            raise ValueError(f"duplicate expert keys {dupes[:5]}: every expert needs a unique key")
        if self.needs_costs:
            self._check_costs()
        if self.budget.kind == "stored-bits":
            self._check_stored_bytes()

    @property
    def capacity(self) -> float:
        """What the experts' own usage may add up to: the budget less its fixed part."""
        return self.budget.value - self.budget.fixed

    @property
    def needs_costs(self) -> bool:
        """Whether the budget or the objective reads the backend cost table."""
        w = self.weights
        return self.budget.kind in ("bytes", "latency") or max(w.w_lat, w.w_mem, w.w_eng) > 0

    def _check_stored_bytes(self) -> None:
        if self.budget.params <= 0:
            raise ValueError("a stored-bits budget needs the model's parameter count (Budget.params > 0)")
        for e in self.experts:
            missing = [b for b in self.bits_choices if b not in e.stored_bytes]
            if missing:
                raise ValueError(f"expert {e.key!r} has no stored bytes for bits {missing}, needed by the "
                                 "stored-bits budget: build the problem with the target backend")

    def _check_costs(self) -> None:
        for e in self.experts:
            missing = [b for b in self.bits_choices if b not in e.cost]
            if missing:
                raise ValueError(
                    f"expert {e.key!r} has no backend cost for bits {missing}, needed by the "
                    f"{self.budget.kind!r} budget / cost weights: run the cost-table pass for the "
                    "backend or restrict bits_choices to the bit-widths it supports")


class Allocator(Protocol):
    """What every allocator implements, and what it declares as class attributes.

    ``needs``: the annotations it reads beyond ``freq`` (``"sensitivity"`` stands for the chosen
    metric's, per-expert KL or NLL increase), so the driver runs the passes that provide them;
    ``measures``: it takes ``accuracy_fn`` / ``hardware_fn`` callbacks that measure whole
    allocations; ``places_nonexperts``: it reads only the additive objective and the budget, so
    non-expert items (``--nonexpert-bits auto``) can be among its experts; ``summary``: one
    phrase for ``--allocator``'s help.
    """

    name: ClassVar[str]
    needs: ClassVar[tuple[str, ...]]
    measures: ClassVar[bool]
    places_nonexperts: ClassVar[bool]
    summary: ClassVar[str]

    def allocate(self, problem: AllocationProblem) -> Allocation:
        """Return ``key -> bits`` for every expert, within the budget, bits from ``bits_choices``."""
        ...


class InfeasibleBudgetError(ValueError):
    """The budget is below the smallest one any allocation can meet."""

    def __init__(self, problem: AllocationProblem, smallest: float, what: str = "") -> None:
        b = problem.budget
        self.asked = b.value
        self.smallest = smallest
        super().__init__(
            f"budget {b.describe()} is infeasible for bits {problem.bits_choices}{what}: the smallest "
            f"feasible budget is {b.describe(smallest)}; raise the budget or add lower bit-widths")


@dataclass(frozen=True)
class ProblemTables:
    """Per-expert x per-bits matrices (rows follow ``problem.experts``, columns ``bits``).

    ``usage`` is in budget units and sums over experts to :func:`budget_usage` less the budget's
    fixed part; ``capacity`` is :attr:`AllocationProblem.capacity`; ``raw_usage`` is
    ``usage * usage_scale`` (integers for the bits budget: ``n_params * bits``); ``objective`` is
    ``None`` unless built with ``with_objective``. ``fusion`` (None when the target fuses nothing
    or latency plays no part) corrects both for the layers' fused groups: :meth:`value` and
    :meth:`used` give an allocation's true objective and use; the additive tables alone price every
    expert under per-expert dispatch, an upper bound.
    """

    keys: tuple[str, ...]
    bits: np.ndarray
    usage: np.ndarray
    raw_usage: np.ndarray
    usage_scale: float
    capacity: float
    sens: np.ndarray | None
    objective: np.ndarray | None
    fusion: FusionTables | None = None

    def value(self, idx: np.ndarray) -> float:
        """Objective of the allocation ``idx`` (column per expert), fused dispatch included."""
        return float(self.objective[np.arange(len(idx)), idx].sum()) + self.fused(idx)

    def fused(self, idx: np.ndarray) -> float:
        """The (<= 0) fused-dispatch correction of the objective of ``idx`` (0 without ``fusion``)."""
        return self.fusion.correction(idx) if self.fusion is not None else 0.0

    def used(self, idx: np.ndarray) -> float:
        """Budget use (less the fixed part) of the allocation ``idx``, fused dispatch included."""
        u = float(self.usage[np.arange(len(idx)), idx].sum())
        return u + self.fusion.correction(idx, usage=True) if self.fusion is not None else u

    def index(self, allocation: Mapping[str, int]) -> np.ndarray:
        """Column index of each expert's bits in ``allocation``."""
        check_allocation_keys(self.keys, allocation)
        col = {int(b): j for j, b in enumerate(self.bits)}
        bad = {k: allocation[k] for k in self.keys if allocation[k] not in col}
        if bad:
            raise ValueError(f"allocation uses bits outside bits_choices {tuple(col)}: "
                             f"{dict(list(bad.items())[:5])}")
        return np.array([col[allocation[k]] for k in self.keys], dtype=np.int64)

    def allocation(self, idx: np.ndarray) -> Allocation:
        """Allocation dict from column indices."""
        return {k: int(self.bits[j]) for k, j in zip(self.keys, idx)}


def check_allocation_keys(keys: tuple[str, ...], allocation: Mapping[str, int]) -> None:
    """Raise ``ValueError`` unless ``allocation`` has exactly the experts ``keys``."""
    missing = [k for k in keys if k not in allocation]
    extra = sorted(set(allocation) - set(keys))
    if missing or extra:
        raise ValueError(f"allocation does not match the problem's experts: missing {missing[:5]}, "
                         f"unknown {extra[:5]}")


def _raw_usage(problem: AllocationProblem) -> tuple[np.ndarray, float]:
    kind = problem.budget.kind
    ex, bits = problem.experts, problem.bits_choices
    if kind == "bits":
        raw = np.array([[e.n_params * b for b in bits] for e in ex], dtype=np.float64)
        return raw, float(sum(e.n_params for e in ex))
    if kind == "bytes":
        return np.array([[e.cost[b].bytes for b in bits] for e in ex], dtype=np.float64), 1.0
    if kind == "stored-bits":
        return np.array([[8 * e.stored_bytes[b] for b in bits] for e in ex], dtype=np.float64), \
            float(problem.budget.params)
    return latency_matrix(problem), 1.0


def _kernel_matrices(problem: AllocationProblem) -> tuple[np.ndarray, np.ndarray]:
    """``(kernel, fixed_row)``: each expert's routed cost inside the layer's kernel node per bits (NaN where it
    does not join) and its view of the node's fixed part (:func:`.fusion.kernel_fixed`)."""
    ex, bits = problem.experts, problem.bits_choices
    kernel = np.array([[np.nan if e.cost[b].kernel_decode_ms is None else e.cost[b].kernel_decode_ms for b in bits]
                       for e in ex], dtype=np.float64)
    fixed = np.array([[e.cost[b].kernel_fixed_decode_ms for b in bits] for e in ex], dtype=np.float64)
    return kernel, kernel_fixed([e.layer for e in ex], kernel, fixed)


def latency_matrix(problem: AllocationProblem) -> np.ndarray:
    """Per-expert x per-bits decode latency (ms per token) of the additive tables: per-expert dispatch
    (``freq * decode_ms + idle_decode_ms``), except under the ``kernel`` dispatch, where an expert the layer's
    node takes costs ``freq * kernel_decode_ms`` plus the node's whole fixed part (an upper bound that
    :func:`.fusion.kernel_tables` corrects to one fixed part per layer)."""
    ex, bits = problem.experts, problem.bits_choices
    m = np.array([[e.cost[b].latency(e.freq) for b in bits] for e in ex], dtype=np.float64)
    if problem.dispatch != "kernel" or not ex or not any(e.cost for e in ex):
        return m
    kernel, fixed_row = _kernel_matrices(problem)
    freq = np.array([e.freq for e in ex])
    return np.where(np.isnan(kernel), m, freq[:, None] * np.nan_to_num(kernel) + fixed_row[:, None])


COST_METRICS = ("latency_ms", "bytes", "energy_mj")


def cost_terms(problem: AllocationProblem) -> dict[str, tuple[float, np.ndarray, float]]:
    """The weighted cost terms of the objective, by metric (:data:`COST_METRICS`).

    Returns:
        ``metric -> (weight, per-expert x per-bits value / reference, reference)`` for every
        metric with a positive weight that is not zero everywhere; the reference is the metric's
        all-highest-bits total (latency and energy are ``freq``-weighted per-token values).
    """
    w, ex, bits = problem.weights, problem.experts, problem.bits_choices
    metrics = {"latency_ms": (w.w_lat, None),
               "bytes": (w.w_mem, lambda e, b: float(e.cost[b].bytes)),
               "energy_mj": (w.w_eng, lambda e, b: e.freq * e.cost[b].energy_mj)}
    terms = {}
    for name, (weight, fn) in metrics.items():
        if weight == 0:
            continue
        m = latency_matrix(problem) if fn is None else np.array([[fn(e, b) for b in bits] for e in ex],
                                                                dtype=np.float64)
        if not m.any():  # e.g. no expert is ever routed to: the term is zero for every allocation
            continue
        ref = float(m[:, -1].sum())
        if ref <= 0:
            raise ValueError(f"cannot normalise the {name} term: its all-{bits[-1]}-bit total is {ref}; "
                             "check the backend cost table or set its weight to 0")
        terms[name] = (weight, m / ref, ref)
    return terms


def build_tables(problem: AllocationProblem, with_objective: bool = True) -> ProblemTables:
    """Lay the problem out as matrices; ``with_objective`` needs every sensitivity."""
    raw, scale = _raw_usage(problem)
    sens = obj = None
    terms = cost_terms(problem)
    if with_objective:
        sens = np.array([[e.sens(b) for b in problem.bits_choices] for e in problem.experts])
        obj = problem.weights.w_acc * sens + sum((w * m for w, m, _ in terms.values()), np.zeros_like(sens))
    return ProblemTables(keys=tuple(e.key for e in problem.experts),
                         bits=np.array(problem.bits_choices, dtype=np.int64), usage=raw / scale,
                         raw_usage=raw, usage_scale=scale, capacity=float(problem.capacity),
                         sens=sens, objective=obj, fusion=_fusion(problem, terms))


def _fusion(problem: AllocationProblem, terms: dict[str, tuple[float, np.ndarray, float]]) -> FusionTables | None:
    """The correction of the dispatch's layout (fused or kernel) when latency is in the objective or the budget,
    else None."""
    lat = terms.get("latency_ms")
    obj_scale = lat[0] / lat[2] if lat is not None else 0.0
    use_scale = 1.0 if problem.budget.kind == "latency" else 0.0
    if not (obj_scale or use_scale) or problem.dispatch not in ("fused", "kernel"):
        return None
    ex, bits = problem.experts, problem.bits_choices
    if problem.dispatch == "kernel":
        kernel, fixed_row = _kernel_matrices(problem)
        return kernel_tables([e.layer for e in ex], kernel, fixed_row, obj_scale, use_scale)
    if not any(e.cost[b].fused_decode_ms is not None for e in ex for b in bits):
        return None

    def matrix(fn) -> np.ndarray:
        return np.array([[fn(e.cost[b]) for b in bits] for e in ex], dtype=np.float64)

    return fusion_tables([e.layer for e in ex], np.array([e.freq for e in ex]), matrix(lambda c: c.decode_ms),
                         matrix(lambda c: c.idle_decode_ms),
                         matrix(lambda c: np.nan if c.fused_decode_ms is None else c.fused_decode_ms),
                         matrix(lambda c: c.group_decode_ms), obj_scale, use_scale)


def fits(usage: float, capacity: float) -> bool:
    """``usage <= capacity`` up to a relative tolerance of :data:`FEASIBILITY_RTOL`."""
    return usage <= capacity + FEASIBILITY_RTOL * max(1.0, abs(capacity))


def budget_usage(problem: AllocationProblem, allocation: Mapping[str, int]) -> float:
    """Resource ``allocation`` uses, in the budget's unit (the fixed part included)."""
    t = build_tables(problem, with_objective=False)
    return problem.budget.fixed + t.used(t.index(allocation))


def is_feasible(problem: AllocationProblem, allocation: Mapping[str, int]) -> bool:
    """Whether ``allocation`` uses only ``bits_choices`` and meets the budget."""
    return fits(budget_usage(problem, allocation), problem.budget.value)


def min_feasible_budget(problem: AllocationProblem) -> float:
    """Smallest budget any allocation meets: each expert at its cheapest bit-width.

    With costs that grow with bits (the usual case) that is every expert at the lowest bits. With
    fused dispatch in a latency budget, each layer also takes its best set of fused widths.
    """
    t = build_tables(problem, with_objective=False)
    if t.fusion is None or not t.fusion.saving_use.any():
        return problem.budget.fixed + float(t.usage.min(axis=1).sum())
    return problem.budget.fixed + t.fusion.least_use(t.usage)


def check_feasible(problem: AllocationProblem) -> None:
    """Raise :class:`InfeasibleBudgetError` if no allocation meets the budget."""
    smallest = min_feasible_budget(problem)
    if not fits(smallest, problem.budget.value):
        raise InfeasibleBudgetError(problem, smallest)


def objective_value(problem: AllocationProblem, allocation: Mapping[str, int]) -> float:
    """The additive objective (module docstring) of ``allocation``; lower is better."""
    t = build_tables(problem)
    return t.value(t.index(allocation))
