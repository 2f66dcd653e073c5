"""The deterministic projection onto the budget and the exchange refinement."""

import pytest
from dmpq_compile.passes.allocate import (
    AllocationProblem,
    Budget,
    InfeasibleBudgetError,
    is_feasible,
    objective_value,
    project,
    refine,
)
from hypothesis import given
from hypothesis import strategies as st
from test_alloc_problem import FAST, brute_force, make_expert, problems


def _proposal(problem, data):
    return {e.key: data.draw(st.sampled_from(problem.bits_choices)) for e in problem.experts}


@FAST
@given(problems(), st.data())
def test_projection_is_feasible_and_deterministic(problem, data):
    proposal = _proposal(problem, data)
    out = project(problem, proposal)
    assert is_feasible(problem, out)
    assert set(out.values()) <= set(problem.bits_choices)
    assert project(problem, dict(reversed(list(proposal.items())))) == out  # independent of key order
    assert project(problem, proposal) == out


@FAST
@given(problems(), st.data())
def test_refine_never_worsens_and_stays_feasible(problem, data):
    projected = project(problem, _proposal(problem, data))
    refined = refine(problem, projected)
    assert is_feasible(problem, refined)
    assert objective_value(problem, refined) <= objective_value(problem, projected) + 1e-12
    assert objective_value(problem, refined) >= brute_force(problem)[0] - 1e-9
    assert refine(problem, projected) == refined


def test_projection_downgrades_least_sensitive_per_saving_first():
    bits = (4, 8)
    sens = [{4: 1.0, 8: 0.0}, {4: 0.1, 8: 0.0}, {4: 0.5, 8: 0.0}]
    ex = tuple(make_expert(i, bits, sens=s) for i, s in enumerate(sens))
    p = AllocationProblem(ex, bits, Budget("bits", 20 / 3))  # room for one expert at 4 bits
    assert project(p, {e.key: 8 for e in ex}) == {"L0.E0": 8, "L0.E1": 4, "L0.E2": 8}


def test_projection_spends_leftover_on_best_gain_per_cost():
    bits = (4, 8)
    sens = [{4: 1.0, 8: 0.0}, {4: 0.1, 8: 0.0}, {4: 0.5, 8: 0.0}]
    ex = tuple(make_expert(i, bits, sens=s) for i, s in enumerate(sens))
    p = AllocationProblem(ex, bits, Budget("bits", 16 / 3))  # room for one upgrade
    assert project(p, {e.key: 4 for e in ex}) == {"L0.E0": 8, "L0.E1": 4, "L0.E2": 4}


def test_ties_are_broken_by_key():
    bits = (4, 8)
    ex = tuple(make_expert(i, bits, sens={4: 1.0, 8: 0.0}, key=k) for i, k in enumerate(["b", "a", "c"]))
    p = AllocationProblem(ex, bits, Budget("bits", 16 / 3))
    assert project(p, {"a": 4, "b": 4, "c": 4}) == {"a": 8, "b": 4, "c": 4}
    p = AllocationProblem(ex, bits, Budget("bits", 20 / 3))
    assert project(p, {"a": 8, "b": 8, "c": 8}) == {"a": 4, "b": 8, "c": 8}


def test_refine_finds_an_exchange_the_greedy_misses():
    bits = (4, 8)
    # greedy upgrades E1 (best gain per cost) and then cannot afford E0's larger, more valuable upgrade
    ex = (make_expert(0, bits, n_params=2048, sens={4: 3.0, 8: 0.0}),
          make_expert(1, bits, n_params=1024, sens={4: 1.6, 8: 0.0}))
    p = AllocationProblem(ex, bits, Budget("bytes", 2048 + 512))  # E0 at 8 bits + E1 at 4 bits
    projected = project(p, {"L0.E0": 4, "L0.E1": 4})
    assert projected == {"L0.E0": 4, "L0.E1": 8}
    assert refine(p, projected) == {"L0.E0": 8, "L0.E1": 4}


def test_projection_errors():
    bits = (4, 8)
    p = AllocationProblem((make_expert(0, bits),), bits, Budget("bits", 3))
    with pytest.raises(InfeasibleBudgetError, match="smallest feasible budget is 4.00 average bits"):
        project(p, {"L0.E0": 8})
    p = AllocationProblem((make_expert(0, bits),), bits, Budget("bits", 8))
    with pytest.raises(ValueError, match="bits outside bits_choices"):
        project(p, {"L0.E0": 5})
    with pytest.raises(ValueError, match="project\\(\\) it first"):
        refine(AllocationProblem(p.experts, bits, Budget("bits", 4)), {"L0.E0": 8})
