"""The DP optimum of the multiple-choice knapsack against brute force."""

import numpy as np
import pytest
from dmpq_compile.passes.allocate import (
    AllocationProblem,
    ObjectiveWeights,
    OptimalAllocator,
    is_feasible,
    objective_value,
    solve,
)
from hypothesis import given
from test_alloc_problem import (
    FAST,
    brute_force,
    budget_between,
    make_budget,
    make_expert,
    problems,
    random_problem,
    with_budget,
)


@FAST
@given(problems(max_experts=6))
def test_dp_equals_brute_force(problem):
    value, _ = brute_force(problem)
    sol = solve(problem)
    assert is_feasible(problem, sol.allocation)
    assert sol.exact  # every kind, latency budgets included: the core DP needs no grid
    assert sol.objective == pytest.approx(value, rel=1e-9, abs=1e-9)
    assert sol.lower_bound == sol.objective


@FAST
@given(problems(kind="bits"))
def test_dp_is_exact_for_bits_budgets(problem):
    sol = solve(problem)
    assert sol.exact
    assert sol.objective == pytest.approx(brute_force(problem)[0], rel=1e-9, abs=1e-9)


@FAST
@given(problems(kind="bytes", weights=ObjectiveWeights(w_acc=1.0, w_lat=0.5, w_mem=0.5, w_eng=0.2)))
def test_dp_is_exact_with_cost_weights(problem):
    sol = solve(problem)
    assert sol.exact
    assert sol.objective == pytest.approx(brute_force(problem)[0], rel=1e-9, abs=1e-9)


@pytest.mark.parametrize("seed", range(4))
def test_latency_budget_is_exact(seed):
    """The core DP works on exact (real-valued) uses: a latency budget needs no grid."""
    problem = random_problem(seed, n=7, kind="latency", frac=0.35)
    value, _ = brute_force(problem)
    sol = solve(problem)
    assert sol.exact and is_feasible(problem, sol.allocation)
    assert sol.objective == pytest.approx(value, rel=1e-9, abs=1e-12)
    # the grid DP it replaced: feasible, bounded below by the proven bound, never better
    grid = solve(problem, max_states=1)
    if not grid.exact:
        assert grid.lower_bound <= value + 1e-12 and grid.objective >= value - 1e-12


def test_coarse_grid_fallback_stays_feasible_and_bounded():
    """Forced onto the coarse grid (max_states=1 stops the core DP), the result is feasible and its lower
    bound is a true lower bound on the optimum."""
    for seed in range(6):
        problem = random_problem(seed, n=8, kind="bytes", frac=0.5)
        value, _ = brute_force(problem)
        exact = solve(problem)
        coarse = solve(problem, max_cells=50, max_states=1)
        assert exact.exact and exact.objective == pytest.approx(value, rel=1e-9, abs=1e-12)
        assert is_feasible(problem, coarse.allocation)
        assert coarse.objective >= exact.objective - 1e-12
        assert coarse.lower_bound <= value + 1e-12
        assert coarse.exact or coarse.gap >= -1e-12


def _odd_problem(seed, n, bits=(2, 4, 8, 16), kind="stored-bits", frac=0.4):
    """Items of unequal, odd stored sizes (like non-expert nodes among equal experts): a bad grid gcd."""
    rng = np.random.default_rng(seed)
    experts = []
    for i in range(n):
        size = int(rng.integers(3, 40)) * 64 if i % 3 else 1024  # a third of equal-size "experts"
        odd = {b: size * b // 8 + (int(rng.integers(0, 97)) if i % 3 else 0) for b in bits}
        scale = rng.lognormal(0, 1)
        sens = {b: float(scale * rng.exponential(1.0) * (2.0 / b) ** rng.uniform(1, 4)) for b in bits}
        experts.append(make_expert(i, bits, n_params=size, sens=sens, stored_bytes=odd, key=f"item{i}"))
    problem = AllocationProblem(tuple(experts), bits, make_budget(kind, 0.0, experts))
    return budget_between(problem, frac)


@pytest.mark.parametrize("seed", range(8))
def test_odd_sizes_exact_against_brute_force(seed):
    problem = _odd_problem(seed, n=7, frac=0.15 + 0.1 * seed)
    value, _ = brute_force(problem)
    sol = solve(problem)
    assert sol.exact and is_feasible(problem, sol.allocation)
    assert sol.objective == pytest.approx(value, rel=1e-9, abs=1e-12)


@pytest.mark.parametrize("seed", range(4))
def test_odd_sizes_exact_against_the_gcd_grid_dp(seed):
    """On 120 items the old exact route (the gcd grid, given enough cells) and the core DP agree."""
    problem = _odd_problem(100 + seed, n=120, frac=0.2 + 0.2 * seed)
    grid = solve(problem, max_cells=50_000_000, max_states=1)
    sol = solve(problem)
    assert grid.exact and sol.exact
    assert sol.objective == pytest.approx(grid.objective, rel=1e-9, abs=1e-12)


def test_unbreakable_core_reports_a_proven_gap():
    """Objective proportional to use (subset-sum-like): every option has reduced cost 0, the Pareto lists
    cannot shrink, and a small ``max_states`` makes the solver fall back with a true lower bound."""
    bits = (2, 4, 8)
    rng = np.random.default_rng(7)
    experts = []
    for i in range(10):
        size = int(rng.integers(50, 500))
        stored = {b: size * b + int(rng.integers(0, 7)) for b in bits}
        experts.append(make_expert(i, bits, n_params=size, sens={b: -1e-3 * stored[b] + 10 for b in bits},
                                   stored_bytes=stored, key=f"x{i}"))
    problem = budget_between(AllocationProblem(tuple(experts), bits, make_budget("stored-bits", 0.0, experts)), 0.5)
    value, _ = brute_force(problem)
    sol = solve(problem, max_cells=30, max_states=8)
    assert not sol.exact and is_feasible(problem, sol.allocation)
    assert sol.lower_bound <= value + 1e-12 <= sol.objective + 2e-12
    assert solve(problem).exact and solve(problem).objective == pytest.approx(value, rel=1e-9, abs=1e-12)


def test_optimal_on_a_larger_problem_is_fast_and_feasible():
    problem = random_problem(1, n=256, kind="bits", frac=0.3)
    alloc = OptimalAllocator().allocate(problem)
    assert is_feasible(problem, alloc)
    # a single-expert improvement never exists at the optimum
    base = objective_value(problem, alloc)
    for e in problem.experts[:32]:
        for b in problem.bits_choices:
            cand = dict(alloc, **{e.key: b})
            if is_feasible(problem, cand):
                assert objective_value(problem, cand) >= base - 1e-9


def test_budget_at_the_minimum_gives_lowest_bits():
    problem = random_problem(2, n=6, kind="bits", frac=0.0)
    assert set(OptimalAllocator().allocate(problem).values()) == {2}
    problem = with_budget(problem, 16.0)
    assert set(OptimalAllocator().allocate(problem).values()) == {16}
    assert np.isclose(solve(problem).objective, 0.0)


def test_olmoe_shape_with_nonexpert_items_is_exact_in_seconds():
    """1024 equal experts + 18 odd-size non-expert items under a stored-bits budget (the ort-cpu sizes): the
    gcd grid would need over a million cells (the old solver went coarse and said "may miss the optimum
    slightly"); the core DP proves the optimum, and beats the coarse grid DP where that misses it."""
    import time

    from dmpq_compile.backends import get_backend
    from dmpq_compile.passes.allocate.optimal import _grid
    from dmpq_compile.passes.allocate.problem import FEASIBILITY_RTOL, build_tables
    from dmpq_compile.passes.allocate.synthetic import stored_bits_problem

    problem = stored_bits_problem(weight_bytes=get_backend("ort-cpu").weight_bytes, budget_bits=5.5)
    assert len(problem.experts) == 1042
    t = build_tables(problem)
    base = t.raw_usage.min(axis=1)
    cap_extra = t.usage_scale * problem.capacity * (1 + FEASIBILITY_RTOL) - base.sum()
    assert not _grid(t.raw_usage - base[:, None], cap_extra, True, 100_000, 50_000)[1]  # old route: coarse
    start = time.perf_counter()
    sol = solve(problem)
    assert time.perf_counter() - start < 10.0
    assert sol.exact and sol.gap == 0.0 and is_feasible(problem, sol.allocation)
    coarse = solve(problem, max_states=1)
    assert not coarse.exact and coarse.lower_bound <= sol.objective + 1e-12
    assert sol.objective < coarse.objective - 1e-9
