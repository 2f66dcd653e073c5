"""Every allocator honours every budget kind and only uses bits_choices; per-allocator behaviour."""

import numpy as np
import pytest
from dmpq_compile.passes.allocate import (
    ALLOCATORS,
    AllocationProblem,
    Budget,
    FrequencyAllocator,
    GradVarAllocator,
    InfeasibleBudgetError,
    UniformAllocator,
    budget_usage,
    get_allocator,
    gradvar_scores,
    is_feasible,
    min_feasible_budget,
    objective_value,
)
from hypothesis import given
from hypothesis import strategies as st
from test_alloc_problem import FAST, KINDS, make_expert, problems, random_problem, with_budget

QUICK_OPTIONS = {"rl": {"episodes": 8, "n_envs": 4, "progress": False}}


def _check(problem, allocation):
    assert set(allocation) == {e.key for e in problem.experts}
    assert set(allocation.values()) <= set(problem.bits_choices)
    assert is_feasible(problem, allocation), (budget_usage(problem, allocation), problem.budget)


@FAST
@given(problems(), st.sampled_from(["uniform", "frequency", "optimal", "gradvar"]))
def test_allocators_respect_budget_and_bits(problem, name):
    _check(problem, get_allocator(name).allocate(problem))


@pytest.mark.parametrize("kind", KINDS)
def test_rl_respects_budget_and_bits(kind):
    for seed in range(3):
        problem = random_problem(seed, n=5, kind=kind, frac=0.3 * seed)
        _check(problem, get_allocator("rl", **QUICK_OPTIONS["rl"]).allocate(problem))


@pytest.mark.parametrize("name", sorted(ALLOCATORS))
@pytest.mark.parametrize("kind", KINDS)
def test_infeasible_budget_raises_with_smallest_value(name, kind):
    problem = random_problem(0, n=4, kind=kind)
    smallest = min_feasible_budget(problem)
    tight = with_budget(problem, smallest * 0.9 - 1e-6)
    with pytest.raises(InfeasibleBudgetError) as err:
        get_allocator(name, **QUICK_OPTIONS.get(name, {})).allocate(tight)
    assert err.value.smallest == pytest.approx(smallest)
    assert tight.budget.describe(smallest) in str(err.value)
    _check(with_budget(problem, smallest), get_allocator(name, **QUICK_OPTIONS.get(name, {})).allocate(
        with_budget(problem, smallest)))


def test_uniform_picks_largest_fitting_width():
    bits = (2, 4, 8, 16)
    p = AllocationProblem(tuple(make_expert(i, bits) for i in range(4)), bits, Budget("bits", 7.9))
    assert set(UniformAllocator().allocate(p).values()) == {4}
    assert set(UniformAllocator().allocate(with_budget(p, 16)).values()) == {16}


@FAST
@given(problems(kind="bits", equal=True), st.lists(st.floats(0.0, 1.0), min_size=6, max_size=6))
def test_frequency_gives_more_bits_to_more_frequent_experts(problem, freqs):
    n = len(problem.experts)
    experts = tuple(make_expert(i, problem.bits_choices, freq=f) for i, f in zip(range(n), freqs))
    for kind in ("bits", "bytes"):
        p = AllocationProblem(experts, problem.bits_choices, Budget(kind, 0))
        p = with_budget(p, min_feasible_budget(p) * (1 + 2 * freqs[0]))
        alloc = FrequencyAllocator().allocate(p)
        _check(p, alloc)
        for a in p.experts:
            for b in p.experts:
                if a.freq > b.freq:
                    assert alloc[a.key] >= alloc[b.key], (a.freq, b.freq, alloc)


def test_frequency_spends_the_budget_on_frequent_experts_first():
    bits = (2, 4, 8)
    ex = tuple(make_expert(i, bits, freq=f) for i, f in enumerate([0.9, 0.1, 0.3]))
    p = AllocationProblem(ex, bits, Budget("bits", 4.0))
    assert FrequencyAllocator().allocate(p) == {"L0.E0": 8, "L0.E1": 2, "L0.E2": 2}


def test_gradvar_scores_and_allocation():
    bits = (2, 4, 8)
    # E0: stable router + high variance (best), E2: unstable + low variance (worst)
    feats = [(0.1, 5.0), (0.5, 1.0), (0.9, 0.5)]
    ex = tuple(make_expert(i, bits, router_grad_change=g, neuron_variance=v)
               for i, (g, v) in enumerate(feats))
    p = AllocationProblem(ex, bits, Budget("bits", 4.0))
    assert np.allclose(gradvar_scores(p), [1.0, 0.5, 0.0])
    alloc = GradVarAllocator().allocate(p)
    assert alloc["L0.E0"] >= alloc["L0.E1"] >= alloc["L0.E2"] and alloc["L0.E0"] == 8


def test_gradvar_missing_features_error():
    p = AllocationProblem((make_expert(0, (4, 8)), make_expert(1, (4, 8), neuron_variance=1.0)), (4, 8),
                          Budget("bits", 8))
    with pytest.raises(ValueError, match=r"needs router_grad_change and neuron_variance.*2 lack them"):
        GradVarAllocator().allocate(p)


def test_registry_and_errors():
    assert set(ALLOCATORS) == {"uniform", "frequency", "optimal", "gradvar", "search", "rl"}
    with pytest.raises(ValueError, match=r"unknown allocator 'best'; valid names: \['frequency', 'gradvar'"):
        get_allocator("best")
    with pytest.raises(ValueError, match=r"does not accept options \['episode'\]; it accepts"):
        get_allocator("rl", episode=3)
    assert get_allocator("optimal", max_cells=10).max_cells == 10


def test_optimal_beats_heuristics_on_a_realistic_problem():
    p = random_problem(3, n=24, frac=0.3)
    names = ("uniform", "frequency", "gradvar", "optimal")
    values = {n: objective_value(p, get_allocator(n).allocate(p)) for n in names}
    assert values["optimal"] <= min(values.values()) + 1e-12


def test_average_ranks_handles_ties():
    import numpy as np
    from dmpq_compile.passes.allocate.gradvar import average_ranks

    assert average_ranks(np.array([3.0, 1.0, 3.0, 2.0])).tolist() == [3.5, 1.0, 3.5, 2.0]
    assert average_ranks(np.array([5.0])).tolist() == [1.0]
