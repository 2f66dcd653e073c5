"""The allocator's fused-dispatch cost model (passes/allocate/fusion.py) and its exact DP."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from dmpq_compile.passes.allocate import AllocationProblem, Budget, ExpertCost, ExpertInfo, ObjectiveWeights
from dmpq_compile.passes.allocate.fusion import fused_subset
from dmpq_compile.passes.allocate.optimal import solve
from dmpq_compile.passes.allocate.problem import (
    budget_usage,
    build_tables,
    min_feasible_budget,
    objective_value,
)

BITS = (2, 4, 8)
FUSED = (4, 8)


def _cost(bits: int, rng: np.random.Generator, fixed: float) -> ExpertCost:
    d = bits * (1 + 0.2 * rng.random())
    fused = (d * rng.uniform(0.3, 1.2), d) if bits in FUSED else (None, None)
    return ExpertCost(decode_ms=d, prefill_ms=d, bytes=bits * 100, energy_mj=0.0, idle_decode_ms=0.05 * rng.random(),
                      fused_decode_ms=fused[0], fused_prefill_ms=fused[1],
                      group_decode_ms=fixed * rng.uniform(0.5, 1.0) if bits in FUSED else 0.0)


def _problem(seed: int, budget: Budget, w_lat: float, fixed: float, layers: int = 2, per_layer: int = 3,
             ) -> AllocationProblem:
    rng = np.random.default_rng(seed)
    experts = []
    for layer in range(layers):
        freq = rng.dirichlet(np.ones(per_layer)) * min(2, per_layer)
        for e in range(per_layer):
            sens = {b: float(rng.random() * 2.0 ** -b) for b in BITS}
            experts.append(ExpertInfo(key=f"L{layer}.E{e}", layer=layer, expert=e, n_params=100, freq=min(1.0, freq[e]),
                                      mass=0.0, sensitivity=sens, cost={b: _cost(b, rng, fixed) for b in BITS}))
    return AllocationProblem(tuple(experts), BITS, budget, ObjectiveWeights(w_acc=1.0, w_lat=w_lat))


def _brute(problem: AllocationProblem) -> tuple[float, dict[str, int]]:
    best = (np.inf, {})
    keys = [e.key for e in problem.experts]
    for combo in itertools.product(problem.bits_choices, repeat=len(keys)):
        alloc = dict(zip(keys, combo))
        if budget_usage(problem, alloc) <= problem.budget.value + 1e-9:
            v = objective_value(problem, alloc)
            if v < best[0] - 1e-12:
                best = (v, alloc)
    return best


def test_fused_subset_rule():
    # one expert that saves, one that would cost more inside the op
    mask, alone, chosen = fused_subset([0.5, 0.5], [2.0, 2.0], [0.1, 0.1], [1.0, 2.5], group=0.2)
    assert mask.tolist() == [True, False]
    assert alone == pytest.approx(2.2) and chosen == pytest.approx(0.2 + 0.5 + 1.1)
    # a fixed part larger than the savings: every expert alone
    mask, alone, chosen = fused_subset([0.1], [1.0], [0.0], [0.5], group=1.0)
    assert not mask.any() and chosen == alone


def test_true_cost_is_the_lowered_layout():
    """objective_value's latency term equals the per-layer sum of fused_subset's chosen costs."""
    p = _problem(3, Budget("bits", 16.0), w_lat=1.0, fixed=2.0)
    alloc = {e.key: 4 for e in p.experts}
    t = build_tables(p)
    total = 0.0
    for layer in (0, 1):
        ex = [e for e in p.experts if e.layer == layer]
        c = [e.cost[4] for e in ex]
        _, _, chosen = fused_subset([e.freq for e in ex], [x.decode_ms for x in c], [x.idle_decode_ms for x in c],
                                    [x.fused_decode_ms for x in c], max(x.group_decode_ms for x in c))
        total += chosen
    ref = sum(e.cost[8].latency(e.freq) for e in p.experts)
    sens = sum(e.sens(4) for e in p.experts)
    assert objective_value(p, alloc) == pytest.approx(sens + total / ref)
    assert t.fusion is not None


@pytest.mark.parametrize("seed", range(6))
def test_exact_dp_with_group_term_in_objective(seed):
    p = _problem(seed, Budget("bits", 4.0 + seed % 3), w_lat=0.5 + seed, fixed=3.0)
    value, _ = _brute(p)
    for sol in (solve(p), solve(p, max_states=1)):  # the fused core DP, and the grid DP it falls back to
        assert sol.exact
        assert sol.objective == pytest.approx(value, rel=1e-9, abs=1e-12)
        assert objective_value(p, sol.allocation) == pytest.approx(value, rel=1e-9, abs=1e-12)


@pytest.mark.parametrize("seed", range(6))
def test_latency_budget_counts_fixed_parts(seed):
    p0 = _problem(seed, Budget("latency", 1e9), w_lat=0.0, fixed=1.5)
    lo = min_feasible_budget(p0)
    additive_lo = float(build_tables(p0, with_objective=False).usage.min(axis=1).sum())
    assert lo <= additive_lo + 1e-12
    cap = lo + (additive_lo * 3 - lo) * 0.3
    p = _problem(seed, Budget("latency", cap), w_lat=0.0, fixed=1.5)
    value, _ = _brute(p)
    sol = solve(p)  # the fused core DP works on exact uses: a real-valued budget is exact too
    assert sol.exact and budget_usage(p, sol.allocation) <= cap * (1 + 1e-9)
    assert sol.objective == pytest.approx(value, rel=1e-9, abs=1e-12)
    sol = solve(p, latency_cells=200_000, max_states=1)
    assert budget_usage(p, sol.allocation) <= cap * (1 + 1e-9)
    # the grid DP (the fallback) runs on a grid: within the loss of one cell per expert and stage
    assert sol.objective <= value + 0.05 * abs(value) + 1e-9
    # and reports a proven lower bound (the fused Lagrangian dual) below the true optimum
    assert sol.exact or sol.lower_bound <= value + 1e-9 * max(1.0, abs(value))


def test_fused_coarse_grid_reports_a_true_lower_bound():
    """A bits budget with the group term, the core DP stopped (max_states=1) and a grid too small for the
    gcd: where that is inexact, its lower bound is below the optimum."""
    inexact = 0
    for seed in range(4):
        p = _problem(seed, Budget("bits", 4.0 + seed % 3), w_lat=0.5 + seed, fixed=3.0)
        value, _ = _brute(p)
        sol = solve(p, max_cells=3, max_states=1)
        tol = 1e-9 * max(1.0, abs(value))
        if sol.exact:  # the core DP needed no list longer than 1
            assert sol.objective == pytest.approx(value, rel=1e-9, abs=1e-12)
            continue
        inexact += 1
        assert sol.lower_bound <= value + tol <= sol.objective + 2 * tol
        assert sol.gap >= 0
    assert inexact


@pytest.mark.parametrize("seed", range(4))
def test_fused_core_dp_agrees_with_the_exact_grid_dp(seed):
    """4 layers x 12 experts, the group term in the objective, a bits budget the gcd grid covers: the fused
    core DP and the old exact route agree."""
    p = _problem(seed, Budget("bits", 3.0 + seed), w_lat=0.5 + 2 * seed, fixed=2.0, layers=4, per_layer=12)
    core, grid = solve(p), solve(p, max_states=1)
    assert core.exact and grid.exact
    assert core.objective == pytest.approx(grid.objective, rel=1e-9, abs=1e-12)


@pytest.mark.parametrize("seed", range(4))
def test_fused_core_dp_with_rows_that_never_fuse(seed):
    """Some experts without a fused cost (rows outside every stage) next to fusing layers: brute force agrees,
    under a latency budget and under a bits budget with the group term."""
    import dataclasses

    for budget, w_lat in ((Budget("latency", 1e9), 0.0), (Budget("bits", 4.0 + seed % 3), 1.0 + seed)):
        p = _problem(seed, budget, w_lat=w_lat, fixed=2.0, layers=2, per_layer=3)
        experts = list(p.experts)
        for i in (seed % 3, 3 + (seed + 1) % 3):
            experts[i] = dataclasses.replace(experts[i], cost={b: dataclasses.replace(
                c, fused_decode_ms=None, fused_prefill_ms=None, group_decode_ms=0.0) for b, c in experts[i].cost.items()})
        p = dataclasses.replace(p, experts=tuple(experts))
        assert (build_tables(p).fusion.layer < 0).sum() == 2
        if budget.kind == "latency":
            lo = min_feasible_budget(p)
            hi = budget_usage(p, {e.key: 8 for e in p.experts})
            p = dataclasses.replace(p, budget=Budget("latency", lo + 0.4 * (hi - lo)))
        value, _ = _brute(p)
        sol = solve(p)
        assert sol.exact
        assert sol.objective == pytest.approx(value, rel=1e-9, abs=1e-12)


def test_no_fusion_without_latency():
    p = _problem(1, Budget("bits", 4.0), w_lat=0.0, fixed=1.0)
    assert build_tables(p).fusion is None
