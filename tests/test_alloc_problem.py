"""Allocation problem model: validation, budget definitions, feasibility and errors.

Also home of the problem factories shared by the other ``test_alloc_*`` modules.
"""

import itertools
import math

import numpy as np
import pytest
from dmpq_compile.passes.allocate import (
    AllocationProblem,
    Budget,
    ExpertCost,
    ExpertInfo,
    InfeasibleBudgetError,
    ObjectiveWeights,
    budget_usage,
    build_tables,
    is_feasible,
    min_feasible_budget,
    objective_value,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

KINDS = ("bits", "bytes", "latency", "stored-bits")
BITS_SETS = ((2, 4, 8, 16), (4, 8, 16), (2, 3, 4, 8), (8,))
FAST = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def make_expert(i, bits, n_params=1024, freq=0.5, sens=None, extra_bytes=0, decode=None, **kw):
    """An expert whose costs grow with bits: bytes ~ n_params*bits/8, decode_ms ~ bits."""
    sens = sens if sens is not None else {b: 16.0 / b - 1.0 for b in bits}
    cost = {b: ExpertCost(decode_ms=(decode or 0.01) * b, prefill_ms=0.05 * b,
                          bytes=n_params * b // 8 + extra_bytes, energy_mj=0.02 * b) for b in bits}
    kw.setdefault("stored_bytes", {b: c.bytes + n_params // 16 for b, c in cost.items()})  # + scales
    return ExpertInfo(key=kw.pop("key", f"L{i // 4}.E{i % 4}"), layer=i // 4, expert=i % 4, n_params=n_params,
                      freq=freq, mass=freq / 2, sensitivity=sens, cost=cost, **kw)


def make_budget(kind, value, experts, like=None):
    """A budget of ``kind``; stored bits get a fixed part (weights outside the experts, 0.9 bits
    per weight of the model) and a model 30 % larger than its experts."""
    if kind != "stored-bits":
        return Budget(kind, value)
    if like is not None and like.kind == kind:
        return Budget(kind, value, fixed=like.fixed, params=like.params)
    return Budget(kind, value, fixed=0.9, params=int(1.3 * sum(e.n_params for e in experts)))


def with_budget(problem, value, kind=None):
    """The same problem with another budget."""
    budget = make_budget(kind or problem.budget.kind, value, problem.experts, problem.budget)
    return AllocationProblem(problem.experts, problem.bits_choices, budget, problem.weights)


def budget_between(problem, frac):
    """Budget at ``frac`` of the way from the smallest feasible one to the all-highest-bits usage."""
    lo = min_feasible_budget(problem)
    hi = budget_usage(problem, {e.key: problem.bits_choices[-1] for e in problem.experts})
    return with_budget(problem, lo + frac * (hi - lo))


@st.composite
def problems(draw, kind=None, bits=None, max_experts=6, equal=False, frac=None, weights=None):
    """Random small problems; sensitivities may be non-monotone in bits, costs are not equal."""
    kind = kind or draw(st.sampled_from(KINDS))
    bits = bits or draw(st.sampled_from(BITS_SETS))
    n = draw(st.integers(1, max_experts))
    sens_value = st.floats(0.0, 10.0, allow_nan=False)
    experts = []
    for i in range(n):
        sens = {b: draw(sens_value) for b in bits}
        experts.append(make_expert(
            i, bits, n_params=1024 if equal else 64 * draw(st.integers(1, 40)),
            freq=1.0 if equal else draw(st.floats(0.0, 1.0)), sens=sens,
            extra_bytes=0 if equal else draw(st.integers(0, 100)),
            decode=None if equal else draw(st.floats(0.001, 1.0)),
            router_grad_change=draw(st.floats(0.0, 1.0)), neuron_variance=draw(st.floats(0.0, 1.0))))
    problem = AllocationProblem(tuple(experts), bits, make_budget(kind, 0.0, experts), weights or ObjectiveWeights())
    return budget_between(problem, draw(st.floats(0.0, 1.2)) if frac is None else frac)


def random_problem(seed, n=12, kind="bits", frac=0.4, bits=(2, 4, 8, 16)):
    """A seeded numpy-random problem with decreasing sensitivities of varied steepness."""
    rng = np.random.default_rng(seed)
    experts = []
    for i in range(n):
        scale = rng.lognormal(0, 1)
        sens = {b: float(scale * rng.exponential(1.0) * (2.0 / b) ** rng.uniform(1, 4)) for b in bits}
        sens[bits[-1]] = 0.0
        experts.append(make_expert(
            i, bits, n_params=256 * int(rng.integers(1, 8)), freq=float(rng.uniform(0.05, 1)), sens=sens,
            extra_bytes=int(rng.integers(0, 64)), decode=float(rng.uniform(0.005, 0.05)),
            router_grad_change=float(rng.random()), neuron_variance=float(rng.random())))
    problem = AllocationProblem(tuple(experts), bits, make_budget(kind, 0.0, experts))
    return budget_between(problem, frac)


def brute_force(problem):
    """Least objective over all feasible allocations (by enumeration) and its allocation."""
    t = build_tables(problem)
    n, m = t.usage.shape
    combos = np.array(list(itertools.product(range(m), repeat=n)))
    rows = np.arange(n)
    usage = t.usage[rows, combos].sum(axis=1)
    obj = t.objective[rows, combos].sum(axis=1)
    tol = 1e-9 * max(1.0, abs(problem.budget.value))
    obj = np.where(usage <= problem.capacity + tol, obj, np.inf)
    k = int(np.argmin(obj))
    return float(obj[k]), t.allocation(combos[k])


# ---------------------------------------------------------------------------------------- tests


def test_budget_definitions():
    bits = (4, 8, 16)
    ex = (make_expert(0, bits, n_params=100, freq=0.5), make_expert(1, bits, n_params=300, freq=0.25))
    alloc = {"L0.E0": 4, "L0.E1": 8}
    p = AllocationProblem(ex, bits, Budget("bits", 16))
    assert budget_usage(p, alloc) == pytest.approx((100 * 4 + 300 * 8) / 400)
    p = with_budget(p, 1e9, "bytes")
    assert budget_usage(p, alloc) == 100 * 4 // 8 + 300 * 8 // 8
    p = with_budget(p, 1e9, "latency")
    assert budget_usage(p, alloc) == pytest.approx(0.5 * 0.04 + 0.25 * 0.08)


def test_min_feasible_budget_is_all_lowest_bits_for_growing_costs():
    bits = (2, 4, 8, 16)
    p = AllocationProblem(tuple(make_expert(i, bits, n_params=64 * (i + 1)) for i in range(5)), bits,
                          Budget("bytes", 1e9))
    assert min_feasible_budget(p) == budget_usage(p, {e.key: 2 for e in p.experts})
    assert is_feasible(with_budget(p, min_feasible_budget(p)), {e.key: 2 for e in p.experts})
    assert not is_feasible(with_budget(p, min_feasible_budget(p) - 1), {e.key: 2 for e in p.experts})


def test_infeasible_error_message_names_budget_smallest_and_unit():
    bits = (2, 4, 8, 16)
    p = AllocationProblem(tuple(make_expert(i, bits) for i in range(3)), bits, Budget("bits", 1.5))
    from dmpq_compile.passes.allocate import check_feasible

    with pytest.raises(InfeasibleBudgetError) as err:
        check_feasible(p)
    msg = str(err.value)
    assert "budget 1.50 average bits is infeasible for bits (2, 4, 8, 16)" in msg
    assert "smallest feasible budget is 2.00 average bits" in msg
    assert err.value.smallest == pytest.approx(2.0) and err.value.asked == 1.5


def test_validation_errors_say_what_to_fix():
    bits = (4, 8, 16)
    e = make_expert(0, bits)
    with pytest.raises(ValueError, match="duplicate expert keys"):
        AllocationProblem((e, e), bits, Budget("bits", 8))
    with pytest.raises(ValueError, match="unknown budget kind 'flops'"):
        Budget("flops", 1.0)
    with pytest.raises(ValueError, match="freq must be in"):
        make_expert(0, bits, freq=1.5)
    no_cost = ExpertInfo("L0.E0", 0, 0, 10, 0.5, 0.1, {4: 1.0, 8: 0.1})
    AllocationProblem((no_cost,), bits, Budget("bits", 8))  # the bits budget needs no cost table
    with pytest.raises(ValueError, match=r"no backend cost for bits \[4, 8, 16\].*cost-table pass"):
        AllocationProblem((no_cost,), bits, Budget("latency", 8))
    p = AllocationProblem((make_expert(0, bits, sens={4: 1.0}),), bits, Budget("bits", 8))
    with pytest.raises(ValueError, match="no sensitivity for 8 bits.*sensitivity pass"):
        build_tables(p)
    with pytest.raises(ValueError, match="bits outside bits_choices"):
        budget_usage(AllocationProblem((e,), bits, Budget("bits", 8)), {"L0.E0": 3})
    with pytest.raises(ValueError, match="missing"):
        budget_usage(AllocationProblem((e,), bits, Budget("bits", 8)), {})


def test_sixteen_bits_sensitivity_defaults_to_zero_and_inputs_are_frozen():
    e = make_expert(0, (4, 16), sens={4: 2.0})
    assert e.sens(16) == 0.0
    with pytest.raises(TypeError):
        e.sensitivity[4] = 0.0  # read-only mapping


def test_objective_weights_add_normalised_costs():
    bits = (4, 16)
    ex = tuple(make_expert(i, bits, sens={4: 1.0, 16: 0.0}) for i in range(2))
    w = ObjectiveWeights(w_acc=1.0, w_lat=2.0, w_mem=1.0)
    p = AllocationProblem(ex, bits, Budget("bits", 16), w)
    assert objective_value(p, {"L0.E0": 16, "L0.E1": 16}) == pytest.approx(3.0)  # 2 * 1 + 1 * 1
    assert objective_value(p, {"L0.E0": 4, "L0.E1": 4}) == pytest.approx(2 + 3 * 0.25)


@FAST
@given(problems())
def test_min_feasible_budget_is_the_least_usage(problem):
    t = build_tables(problem, with_objective=False)
    assert min_feasible_budget(problem) == pytest.approx(problem.budget.fixed + float(t.usage.min(axis=1).sum()))
    assert math.isfinite(min_feasible_budget(problem))
