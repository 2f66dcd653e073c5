"""Allocators at full-model scale (1024 experts), the search allocator, time limits and size guards."""

import logging
import time

import numpy as np
import pytest
import torch
from dmpq_compile.passes.allocate import (
    AllocationEnv,
    Budget,
    RLAllocator,
    SearchAllocator,
    budget_usage,
    get_allocator,
    is_feasible,
    objective_value,
    solve,
)
from dmpq_compile.passes.allocate.synthetic import synthetic_problem
from test_alloc_problem import random_problem

from dmpq_compile.compiler import CompileConfig
from dmpq_compile.ir.weights import WeightStore

# OLMoE-1B-7B: 16 layers x 64 experts, top-8, bits the ort-cpu target offers
FULL = {"n_layers": 16, "n_experts": 64, "top_k": 8, "bits": (2, 4, 8, 16)}


def test_synthetic_problem_has_the_shape_and_is_seeded():
    p = synthetic_problem(**FULL, seed=3)
    assert len(p.experts) == 1024 and p.bits_choices == (2, 4, 8, 16)
    per_layer = np.zeros(16)
    for e in p.experts:
        per_layer[e.layer] += e.freq
        assert e.sens(16) == 0.0 and e.sens(2) > 0
    assert np.allclose(per_layer, 8.0, atol=0.05)  # each layer routes top-8
    assert synthetic_problem(**FULL, seed=3) == p and synthetic_problem(**FULL, seed=4) != p


def test_default_allocator_on_1024_experts_meets_the_budget_quickly():
    name = CompileConfig().allocate.allocator
    problem = synthetic_problem(**FULL, budget=Budget("bits", 3.5))
    options = {"progress": False} if name == "rl" else {}
    t0 = time.perf_counter()
    allocation = get_allocator(name, **options).allocate(problem)
    seconds = time.perf_counter() - t0
    assert set(allocation) == {e.key for e in problem.experts}
    assert set(allocation.values()) <= set(problem.bits_choices)
    assert is_feasible(problem, allocation) and budget_usage(problem, allocation) <= 3.5 + 1e-9
    assert seconds < 20, f"default allocator {name!r} took {seconds:.1f} s on 1024 experts"


def test_search_reaches_the_optimum_on_1024_experts():
    problem = synthetic_problem(**FULL, budget=Budget("bits", 3.0), seed=1)
    result = SearchAllocator(proposals=4, per_round=4, refine_top=1, seed=0).search(problem)
    assert is_feasible(problem, result.allocation)
    assert result.proposals == 4 and result.refinements == 1 and not result.stopped_early
    assert result.table_objective <= 1.001 * solve(problem).objective


def test_env_evaluate_is_the_terminal_step_of_the_same_proposal():
    problem = random_problem(2, n=7, frac=0.3)
    env = AllocationEnv(problem)
    actions = [3, 0, 2, 1, 3, 3, 0]
    env.reset(seed=0)
    for a in actions:
        *_, info = env.step(a)
    again = AllocationEnv(problem).evaluate(np.array(actions))
    assert again["allocation"] == info["allocation"] and again["objective"] == pytest.approx(info["objective"])
    with pytest.raises(ValueError, match="proposal must be 7 column indices"):
        env.evaluate(np.array([0, 1]))


def test_time_limit_stops_rl_and_search_after_one_round(caplog):
    problem = random_problem(3, n=10, frac=0.4)
    with caplog.at_level(logging.WARNING):
        rl = RLAllocator(episodes=64, n_envs=4, progress=False, time_limit_s=0.0).train(problem)
        search = SearchAllocator(proposals=64, per_round=4, time_limit_s=0.0).search(problem)
    assert rl.stopped_early and rl.proposals == 5  # 4 sampled + 1 greedy roll-out
    assert search.stopped_early and search.proposals == 4
    assert is_feasible(problem, rl.allocation) and is_feasible(problem, search.allocation)
    assert caplog.text.count("time limit of 0 s reached") == 2


def test_search_is_seeded_and_no_worse_than_its_proposals():
    problem = random_problem(5, n=12, kind="latency", frac=0.3)
    a, b = (SearchAllocator(proposals=16, seed=7).search(problem) for _ in range(2))
    assert a.allocation == b.allocation and a.history == b.history
    assert a.table_objective == pytest.approx(objective_value(problem, a.allocation))
    assert a.table_objective <= min(h["mean_objective"] for h in a.history) + 1e-12
    with pytest.raises(ValueError, match="proposals, per_round and measure_every must be >= 1"):
        SearchAllocator(proposals=0)


def test_measurements_are_off_above_the_size_limit(monkeypatch, caplog):
    from dmpq_compile.passes.allocate import measure as allocate_measure
    from dmpq_compile.passes.allocate.base import AllocateOptions, allocator_call_options
    from dmpq_compile.passes.infra.base import PassContext

    class BigGraph:
        def __init__(self):
            self.weights = WeightStore({"w": torch.zeros(16)})
            self.meta = {}

    monkeypatch.setattr(allocate_measure, "MEASURE_MAX_PARAMS", 15)
    with caplog.at_level(logging.WARNING):
        opts = allocator_call_options(AllocateOptions(allocator="rl"), PassContext(progress=False), BigGraph())
    assert "accuracy_fn" not in opts and opts["seed"] == 0
    assert "using the proxy objective only" in caplog.text


def test_interpreter_accuracy_cache_is_bounded(monkeypatch, tiny_dirs, calib_ids):
    from dmpq_compile.passes.allocate import measure as allocate_measure

    from dmpq_compile.frontend import load

    graph = load(tiny_dirs("mixtral"))
    monkeypatch.setattr(allocate_measure, "CACHE_ENTRIES", 2)
    fn = allocate_measure.interpreter_accuracy_fn(graph, calib_ids("mixtral"), 2)
    keys = [n.id for n in graph.experts()]
    allocs = [{k: b for k in keys} for b in (2, 4, 8)]
    first = fn(allocs[0])
    for a in allocs[1:]:
        fn(a)
    cache = next(c.cell_contents for c in fn.__closure__ if isinstance(c.cell_contents, dict))
    assert len(cache) == 2 and fn(allocs[0]) == pytest.approx(first)  # evicted, then measured again
