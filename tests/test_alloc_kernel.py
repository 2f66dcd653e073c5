"""The allocator's latency term under ``--dispatch kernel`` (passes/allocate/fusion.py ``kernel_tables``).

One ``ai.dmpq.MixedMoE`` per layer takes every expert whose width it runs: each costs ``freq *
kernel_decode_ms`` and the layer pays the node's fixed part once if it holds any; 16-bit experts run per
expert. Checked on hand-set rows (the value), against brute force (the exact optimum), and through the
objective that ``search`` and ``rl`` score with.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from dmpq_compile.passes.allocate import AllocationProblem, Budget, ExpertCost, ExpertInfo, ObjectiveWeights
from dmpq_compile.passes.allocate.optimal import solve
from dmpq_compile.passes.allocate.problem import (
    budget_usage,
    build_tables,
    min_feasible_budget,
    objective_value,
)
from dmpq_compile.passes.allocate.rl_env import AllocationEnv
from dmpq_compile.passes.allocate.search import SearchAllocator

BITS = (2, 4, 8, 16)
KERNEL = (2, 4, 8)


def _row(decode, idle=0.0, kernel=None, fixed=0.0, fused=None, group=0.0):
    return ExpertCost(decode_ms=decode, prefill_ms=decode, bytes=100, energy_mj=0.0, idle_decode_ms=idle,
                      kernel_decode_ms=kernel, kernel_prefill_ms=kernel, kernel_fixed_decode_ms=fixed,
                      fused_decode_ms=fused, fused_prefill_ms=fused, group_decode_ms=group)


def _hand_problem(budget, dispatch, w_lat=0.0):
    """2 layers x 3 experts; bits 4 and 16; the node's fixed part 0.5 (layer 0) and 0.7 (layer 1, measured
    0.6 at one width and 0.7 at the other: the layer takes the larger)."""
    freq = [0.5, 0.3, 0.2]
    experts = []
    for layer, fixed in ((0, (0.5, 0.5)), (1, (0.6, 0.7))):
        for e in range(3):
            cost = {4: _row(1.0 + e, idle=0.1, kernel=0.4 + 0.1 * e, fixed=fixed[e % 2], fused=0.6, group=0.3),
                    16: _row(4.0, idle=0.2)}
            experts.append(ExpertInfo(key=f"L{layer}.E{e}", layer=layer, expert=e, n_params=100, freq=freq[e],
                                      mass=0.0, sensitivity={4: 0.01 * (e + 1), 16: 0.0}, cost=cost))
    return AllocationProblem(tuple(experts), (4, 16), budget, ObjectiveWeights(w_acc=1.0, w_lat=w_lat),
                             dispatch=dispatch)


def test_kernel_latency_counts_one_fixed_part_per_layer():
    p = _hand_problem(Budget("latency", 100.0), "kernel")
    alloc = {"L0.E0": 4, "L0.E1": 4, "L0.E2": 16, "L1.E0": 16, "L1.E1": 16, "L1.E2": 16}
    layer0 = 0.5 + 0.5 * 0.4 + 0.3 * 0.5 + (0.2 * 4.0 + 0.2)  # one fixed part, two experts in the node, one alone
    layer1 = sum(f * 4.0 + 0.2 for f in (0.5, 0.3, 0.2))  # no expert in the node: no fixed part
    assert budget_usage(p, alloc) == pytest.approx(layer0 + layer1)
    one = dict(alloc, **{"L1.E1": 4})  # a single expert in layer 1's node pays its whole fixed part (0.7)
    assert budget_usage(p, one) == pytest.approx(layer0 + layer1 - (0.3 * 4.0 + 0.2) + 0.7 + 0.3 * 0.5)
    every = {e.key: 4 for e in p.experts}
    assert budget_usage(p, every) == pytest.approx(0.5 + 0.7 + 2 * (0.5 * 0.4 + 0.3 * 0.5 + 0.2 * 0.6))
    # the objective's latency term is the same cost over the all-16-bit reference
    q = _hand_problem(Budget("bits", 16.0), "kernel", w_lat=2.0)
    ref = 2 * sum(f * 4.0 + 0.2 for f in (0.5, 0.3, 0.2))
    sens = sum(e.sens(alloc[e.key]) for e in q.experts)
    assert objective_value(q, alloc) == pytest.approx(sens + 2.0 * (layer0 + layer1) / ref)


def test_the_dispatch_decides_the_layout_priced():
    alloc = {"L0.E0": 4, "L0.E1": 4, "L0.E2": 16, "L1.E0": 16, "L1.E1": 16, "L1.E2": 16}
    per_expert = sum(e.cost[alloc[e.key]].latency(e.freq) for e in _hand_problem(Budget("latency", 1.0), "fused").experts)
    assert budget_usage(_hand_problem(Budget("latency", 100.0), "gather-if"), alloc) == pytest.approx(per_expert)
    fused = 0.3 + 0.5 * 0.6 + 0.3 * 0.6 + (0.2 * 4.0 + 0.2) + sum(f * 4.0 + 0.2 for f in (0.5, 0.3, 0.2))
    assert budget_usage(_hand_problem(Budget("latency", 100.0), "fused"), alloc) == pytest.approx(fused)
    with pytest.raises(ValueError, match="unknown dispatch"):
        _hand_problem(Budget("latency", 1.0), "qmoe")


def _random_problem(seed, budget, w_lat, layers=2, per_layer=3, bits=BITS):
    rng = np.random.default_rng(seed)
    experts = []
    for layer in range(layers):
        freq = rng.dirichlet(np.ones(per_layer)) * min(2, per_layer)
        fixed = rng.uniform(0.2, 3.0)
        for e in range(per_layer):
            cost = {}
            for b in bits:
                d = b * (1 + 0.2 * rng.random())
                joins = b in KERNEL and not (layer == 1 and e == 0)  # one expert whose shape the node does not take
                cost[b] = _row(d, idle=0.05 * rng.random(), kernel=d * rng.uniform(0.3, 1.3) if joins else None,
                               fixed=fixed * rng.uniform(0.8, 1.0) if joins else 0.0)
            sens = {b: float(rng.random() * 2.0 ** -b) for b in bits if b != 16}
            experts.append(ExpertInfo(key=f"L{layer}.E{e}", layer=layer, expert=e, n_params=100,
                                      freq=min(1.0, freq[e]), mass=0.0, sensitivity=sens, cost=cost))
    return AllocationProblem(tuple(experts), bits, budget, ObjectiveWeights(w_acc=1.0, w_lat=w_lat), dispatch="kernel")


def _brute(problem):
    """The least objective over every allocation within the budget (the tables' true value and use, which
    test_tables_give_the_kernel_layouts_cost_for_every_allocation checks against the layout written out)."""
    t = build_tables(problem)
    cap = problem.capacity * (1 + 1e-9) + 1e-12
    best = (np.inf, None)
    for combo in itertools.product(range(len(t.bits)), repeat=len(t.keys)):
        idx = np.array(combo)
        if t.used(idx) <= cap:
            v = t.value(idx)
            if v < best[0] - 1e-12:
                best = (v, t.allocation(idx))
    return best


def _true_latency(problem, alloc):
    """The kernel layout's cost written out directly (not through the tables)."""
    total = 0.0
    for layer in sorted({e.layer for e in problem.experts}):
        node = False
        for e in problem.experts:
            if e.layer != layer:
                continue
            c = e.cost[alloc[e.key]]
            if c.kernel_decode_ms is not None:
                node = True
                total += e.freq * c.kernel_decode_ms
            else:
                total += c.latency(e.freq)
        if node:
            total += max(c.kernel_fixed_decode_ms for e in problem.experts if e.layer == layer
                         for c in e.cost.values() if c.kernel_decode_ms is not None)
    return total


@pytest.mark.parametrize("seed", range(4))
def test_tables_give_the_kernel_layouts_cost_for_every_allocation(seed):
    p = _random_problem(seed, Budget("latency", 1e9), w_lat=0.0, per_layer=2)
    t = build_tables(p, with_objective=False)
    for combo in itertools.product(range(len(BITS)), repeat=len(p.experts)):
        idx = np.array(combo)
        assert t.used(idx) == pytest.approx(_true_latency(p, t.allocation(idx)), rel=1e-12)
        assert t.used(idx) <= float(t.usage[np.arange(len(idx)), idx].sum()) + 1e-12  # the additive tables bound it


@pytest.mark.parametrize("seed", range(5))
def test_exact_optimum_under_the_kernel_term_is_brute_force(seed):
    p = _random_problem(seed, Budget("bits", 4.0 + seed % 3), w_lat=0.5 + seed)
    value, _ = _brute(p)
    for sol in (solve(p), solve(p, max_states=1)):  # the core DP, and the grid DP it falls back to
        assert sol.exact
        assert sol.objective == pytest.approx(value, rel=1e-9, abs=1e-12)
        assert objective_value(p, sol.allocation) == pytest.approx(value, rel=1e-9, abs=1e-12)


@pytest.mark.parametrize("seed", range(5))
def test_exact_optimum_under_a_kernel_latency_budget_is_brute_force(seed):
    p0 = _random_problem(seed, Budget("latency", 1e9), w_lat=0.0)
    lo = min_feasible_budget(p0)
    t0 = build_tables(p0, with_objective=False)
    assert lo == pytest.approx(min(t0.used(np.array(c)) for c in itertools.product(range(len(BITS)), repeat=len(t0.keys))))
    p = _random_problem(seed, Budget("latency", lo * (1.2 + 0.3 * seed)), w_lat=0.3 * seed)
    value, _ = _brute(p)
    sol = solve(p)
    assert sol.exact and budget_usage(p, sol.allocation) <= p.budget.value * (1 + 1e-9)
    assert sol.objective == pytest.approx(value, rel=1e-9, abs=1e-12)


def test_search_and_rl_score_the_same_objective():
    p = _random_problem(7, Budget("bits", 5.0), w_lat=3.0)
    result = SearchAllocator(proposals=16, per_round=8, seed=0).search(p)
    assert result.table_objective == pytest.approx(objective_value(p, result.allocation))
    env = AllocationEnv(p, measure_every=10**9)
    t = build_tables(p)
    info = env.evaluate(np.zeros(len(p.experts), dtype=np.int64))
    sens = float(t.sens[np.arange(len(p.experts)), info["indices"]].sum())
    assert info["objective"] == pytest.approx(t.value(info["indices"]))
    assert info["cost"] == pytest.approx(t.value(info["indices"]) - sens)


def test_the_compile_passes_its_dispatch_to_the_allocate_pass():
    from dmpq_compile.passes.allocate.base import AllocateOptions, AllocatePass
    from dmpq_compile.passes.infra.base import PassError

    from dmpq_compile.config import CompileConfig, EmitConfig
    from dmpq_compile.pipeline import step

    assert step("allocate").options(CompileConfig(emit=EmitConfig(dispatch="kernel")))["dispatch"] == "kernel"
    assert "dispatch" not in step("allocate").options(CompileConfig())  # the pass's default: the emitter's, fused
    assert AllocateOptions().dispatch == "fused"
    with pytest.raises(PassError, match="dispatch must be one of"):
        AllocatePass(AllocateOptions(dispatch="qmoe"))
