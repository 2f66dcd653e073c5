"""Deterministic projection of any allocation onto the budget, and exchange refinement.

:func:`project` (used on every RL proposal) runs two greedy phases on the additive objective
(:func:`~.problem.build_tables`; with the default weights that is the sum of sensitivities):

1. **Downgrade** while over budget: among all moves of one expert to a cheaper bit-width, apply
   the one with the smallest objective increase per unit of budget saved.
2. **Upgrade** with what is left: among all moves of one expert to a bit-width with a lower
   objective (normally more bits) that still fit, apply the one with the largest objective
   decrease per unit of budget spent (moves that cost nothing first), until none fits.

Ties are broken by the larger saving / gain, then by expert key, then by bit-width, so the
result depends only on the input. :func:`refine` then does a best-improvement local search:
repeatedly apply the single move or pair of moves (on two experts, e.g. upgrade one and pay for
it by downgrading another) that lowers the objective most while staying feasible. With
``kicks`` it then escapes such 2-exchange optima by forcing a promising upgrade (one expert's
move with the largest objective decrease, even if it breaks the budget), repairing the budget
with the downgrade phase while that expert stays fixed, and searching again; the first kick
that ends better is kept (a deterministic ruin-and-recreate step), until no kick helps.
"""

from __future__ import annotations

import heapq
import logging
from collections.abc import Mapping

import numpy as np

from .problem import (
    FEASIBILITY_RTOL,
    Allocation,
    AllocationProblem,
    InfeasibleBudgetError,
    ProblemTables,
    build_tables,
    fits,
)

logger = logging.getLogger(__name__)

_IMPROVE_TOL = 1e-12


def project(problem: AllocationProblem, allocation: Mapping[str, int],
            tables: ProblemTables | None = None) -> Allocation:
    """Make ``allocation`` feasible (downgrade phase) and spend the leftover budget (upgrade phase).

    Args:
        problem: The allocation problem.
        allocation: Any ``key -> bits`` over the problem's experts using ``bits_choices``.
        tables: Pre-built :func:`build_tables` of ``problem`` (saves time in loops).

    Returns:
        A feasible allocation.

    Raises:
        InfeasibleBudgetError: If no allocation meets the budget.
        ValueError: If ``allocation`` misses experts or uses bits outside ``bits_choices``.
    """
    t = tables if tables is not None else build_tables(problem)
    idx = project_indices(t, t.index(allocation), problem)
    return t.allocation(idx)


def project_indices(t: ProblemTables, idx: np.ndarray,
                    problem: AllocationProblem | None = None) -> np.ndarray:
    """:func:`project` on column indices (``t.bits[idx[i]]`` is expert ``i``'s bits)."""
    idx = np.asarray(idx, dtype=np.int64).copy()
    usage, obj = t.usage.tolist(), t.objective.tolist()
    used = float(t.usage[np.arange(len(idx)), idx].sum())
    if not fits(used, t.capacity):
        used = _downgrade(t, idx, used, usage, obj)
        if used is None:
            if problem is None:
                raise ValueError(f"budget {t.capacity} is infeasible for these experts")
            raise InfeasibleBudgetError(problem, problem.budget.fixed + float(t.usage.min(axis=1).sum()))
    _upgrade(t, idx, used, usage, obj)
    return idx


def _best_down(i: int, j: int, key: str, usage: list, obj: list) -> tuple | None:
    best = None
    for k in range(len(usage[i])):
        saved = usage[i][j] - usage[i][k]
        if saved <= 0:
            continue
        cand = ((obj[i][k] - obj[i][j]) / saved, -saved, key, k, i, j)
        if best is None or cand < best:
            best = cand
    return best


def _downgrade(t: ProblemTables, idx: np.ndarray, used: float, usage: list, obj: list,
               frozen: int = -1) -> float | None:
    """Downgrade phase in place (expert ``frozen`` untouched); the new usage, or None if stuck."""
    heap = [m for i, key in enumerate(t.keys)
            if i != frozen and (m := _best_down(i, int(idx[i]), key, usage, obj))]
    heapq.heapify(heap)
    while not fits(used, t.capacity):
        if not heap:
            return None
        _, _, key, k, i, j = heapq.heappop(heap)
        if idx[i] != j:
            continue
        used -= usage[i][j] - usage[i][k]
        idx[i] = k
        if (m := _best_down(i, k, key, usage, obj)) is not None:
            heapq.heappush(heap, m)
    return used


def _best_up(i: int, j: int, key: str, usage: list, obj: list, used: float, cap: float) -> tuple | None:
    best = None
    for k in range(len(usage[i])):
        gain, inc = obj[i][j] - obj[i][k], usage[i][k] - usage[i][j]
        if gain <= 0 or not fits(used + inc, cap):
            continue
        ratio = gain / inc if inc > 0 else float("inf")
        cand = (-ratio, -gain, key, k, i, j, inc)
        if best is None or cand < best:
            best = cand
    return best


def _upgrade(t: ProblemTables, idx: np.ndarray, used: float, usage: list, obj: list) -> float:
    cap = t.capacity

    def build() -> list:
        h = [m for i, key in enumerate(t.keys) if (m := _best_up(i, int(idx[i]), key, usage, obj, used, cap))]
        heapq.heapify(h)
        return h

    heap = build()
    while heap:
        _, _, key, k, i, j, inc = heapq.heappop(heap)
        if idx[i] != j:
            continue
        if not fits(used + inc, cap):  # slack shrank since this entry was pushed: re-evaluate
            if (m := _best_up(i, j, key, usage, obj, used, cap)) is not None:
                heapq.heappush(heap, m)
            continue
        used += inc
        idx[i] = k
        if inc < 0:  # a move that frees budget can make dropped moves fit again
            heap = build()
        elif (m := _best_up(i, k, key, usage, obj, used, cap)) is not None:
            heapq.heappush(heap, m)
    return used


def refine(problem: AllocationProblem, allocation: Mapping[str, int],
           tables: ProblemTables | None = None, max_rounds: int = 1000, kicks: int = 0) -> Allocation:
    """Exchange local search from a feasible ``allocation`` (module docstring).

    Args:
        problem: The allocation problem.
        allocation: A feasible allocation (e.g. the output of :func:`project`).
        tables: Pre-built :func:`build_tables` of ``problem``.
        max_rounds: Upper bound on applied exchanges (and on accepted kicks).
        kicks: If > 0, after the exchange search converges, try forcing each of the ``kicks``
            most improving single moves (even over budget), repair the budget around it with
            the downgrade phase, upgrade, and search again; accept the first that improves and
            repeat (module docstring).

    Returns:
        A feasible allocation whose objective is no worse than ``allocation``'s.
    """
    t = tables if tables is not None else build_tables(problem)
    idx = t.index(allocation)
    used = float(t.usage[np.arange(len(idx)), idx].sum())
    if not fits(used, t.capacity):
        raise ValueError("refine needs a feasible allocation: project() it first")
    return t.allocation(refine_indices(t, idx, max_rounds, kicks))


def _deltas(t: ProblemTables, idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Objective and usage change of moving each expert to each column, ``[n, m]`` each."""
    rows = np.arange(len(idx))
    return t.objective - t.objective[rows, idx][:, None], t.usage - t.usage[rows, idx][:, None]


def _moves(t: ProblemTables, idx: np.ndarray) -> tuple[np.ndarray, ...]:
    """All single-expert moves away from ``idx``: (expert, new column, d_obj, d_usage)."""
    n, m = t.usage.shape
    rows = np.arange(n)
    d_obj, d_use = _deltas(t, idx)
    keep = np.ones((n, m), dtype=bool)
    keep[rows, idx] = False
    ei, cols = np.nonzero(keep)
    return ei, cols, d_obj[ei, cols], d_use[ei, cols]


def _prefix_argmin(values: np.ndarray) -> np.ndarray:
    """Index of the first minimum of ``values[: k + 1]`` for every ``k``."""
    running = np.minimum.accumulate(values)
    new_min = np.empty(len(values), dtype=bool)
    new_min[0] = True
    new_min[1:] = values[1:] < running[:-1]
    return np.maximum.accumulate(np.where(new_min, np.arange(len(values)), 0))


def _best_pair(ei: np.ndarray, d_obj: np.ndarray, d_use: np.ndarray, limit: float) -> tuple[float, int, int]:
    """Best feasible pair (objective change, move a, move b) of moves on two experts, a improving.

    For each improving move ``a`` the partner is the lowest-``d_obj`` move with
    ``d_usage <= limit - d_usage[a]`` (prefix minimum over the moves sorted by ``d_usage``); when
    that move is on ``a``'s own expert the best one on another expert is searched directly.
    """
    imp = np.nonzero(d_obj < 0)[0]
    order = np.argsort(d_use, kind="stable")
    prefix = order[_prefix_argmin(d_obj[order])]
    pos = np.searchsorted(d_use[order], limit - d_use[imp], side="right") - 1
    imp, pos = imp[pos >= 0], pos[pos >= 0]
    partner = prefix[pos]
    for k in np.nonzero(ei[partner] == ei[imp])[0]:
        allowed = (ei != ei[imp[k]]) & (d_use <= limit - d_use[imp[k]])
        partner[k] = int(np.argmin(np.where(allowed, d_obj, np.inf))) if allowed.any() else -1
    imp, partner = imp[partner >= 0], partner[partner >= 0]
    if imp.size == 0:
        return 0.0, -1, -1
    total = d_obj[imp] + d_obj[partner]
    k = int(np.argmin(total))
    return float(total[k]), int(imp[k]), int(partner[k])


def _best_exchange(t: ProblemTables, idx: np.ndarray, used: float) -> tuple[float, list]:
    """The feasible single move or pair of moves (on two experts) with the lowest objective change."""
    ei, cols, d_obj, d_use = _moves(t, idx)
    limit = t.capacity + FEASIBILITY_RTOL * max(1.0, abs(t.capacity)) - used
    best, moves = 0.0, []
    single = np.where(d_use <= limit, d_obj, np.inf)
    if single.size and single.min() < best:
        a = int(np.argmin(single))
        best, moves = float(single[a]), [(int(ei[a]), int(cols[a]))]
    if single.size:
        total, a, b = _best_pair(ei, d_obj, d_use, limit)
        if a >= 0 and total < best:
            best, moves = total, [(int(ei[a]), int(cols[a])), (int(ei[b]), int(cols[b]))]
    return best, moves


def _descend(t: ProblemTables, idx: np.ndarray, max_rounds: int) -> np.ndarray:
    """Apply the best exchange until none improves (in place)."""
    rows = np.arange(len(idx))
    for _ in range(max_rounds):
        used = float(t.usage[rows, idx].sum())
        total = float(t.objective[rows, idx].sum())
        delta, moves = _best_exchange(t, idx, used)
        if not moves or delta >= -_IMPROVE_TOL * max(1.0, abs(total)):
            break
        for i, k in moves:
            idx[i] = k
    return idx


def _kick(t: ProblemTables, idx: np.ndarray, kicks: int, max_rounds: int) -> np.ndarray | None:
    """Force one of the ``kicks`` most improving single moves, repair around it, descend again.

    Returns the first result better than ``idx``, or None.
    """
    rows = np.arange(len(idx))
    d_obj, _ = _deltas(t, idx)
    total = float(t.objective[rows, idx].sum())
    ei, cols = np.nonzero(d_obj < 0)
    order = np.lexsort((cols, ei, d_obj[ei, cols]))[:kicks]
    usage, obj = t.usage.tolist(), t.objective.tolist()
    for i, k in zip(ei[order].tolist(), cols[order].tolist()):
        start = idx.copy()
        start[i] = k
        used = _downgrade(t, start, float(t.usage[rows, start].sum()), usage, obj, frozen=i)
        if used is None:
            continue
        _upgrade(t, start, used, usage, obj)
        cand = _descend(t, start, max_rounds)
        if float(t.objective[rows, cand].sum()) < total - _IMPROVE_TOL * max(1.0, abs(total)):
            return cand
    return None


def refine_indices(t: ProblemTables, idx: np.ndarray, max_rounds: int = 1000, kicks: int = 0) -> np.ndarray:
    """:func:`refine` on column indices."""
    idx = _descend(t, np.asarray(idx, dtype=np.int64).copy(), max_rounds)
    for _ in range(max_rounds if kicks > 0 else 0):
        better = _kick(t, idx, kicks, max_rounds)
        if better is None:
            break
        idx = better
    return idx
