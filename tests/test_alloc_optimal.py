"""The DP optimum of the multiple-choice knapsack against brute force."""

import numpy as np
import pytest
from dmpq_compile.passes.allocate import (
    ObjectiveWeights,
    OptimalAllocator,
    is_feasible,
    objective_value,
    solve,
)
from hypothesis import given
from test_alloc_problem import FAST, brute_force, problems, random_problem, with_budget


@FAST
@given(problems(max_experts=6))
def test_dp_equals_brute_force(problem):
    value, _ = brute_force(problem)
    sol = solve(problem)
    assert is_feasible(problem, sol.allocation)
    if sol.exact:
        assert sol.objective == pytest.approx(value, rel=1e-9, abs=1e-9)
    else:  # latency: a grid solution, never better than the optimum and close to it
        assert value - 1e-9 <= sol.objective <= value + 0.02 * abs(value) + 1e-9


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
def test_latency_dp_close_to_brute_force(seed):
    problem = random_problem(seed, n=7, kind="latency", frac=0.35)
    value, _ = brute_force(problem)
    sol = solve(problem)
    assert not sol.exact and is_feasible(problem, sol.allocation)
    assert value - 1e-12 <= sol.objective <= value * 1.001 + 1e-12


def test_coarse_grid_fallback_stays_feasible():
    problem = random_problem(5, n=8, kind="bytes", frac=0.5)
    exact = solve(problem)
    coarse = solve(problem, max_cells=50)
    assert exact.exact and not coarse.exact
    assert is_feasible(problem, coarse.allocation)
    assert coarse.objective >= exact.objective - 1e-12


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
