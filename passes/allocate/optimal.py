"""Exact optimum of the additive model: a multiple-choice knapsack solved by dynamic programming.

Minimise ``sum_i objective_i[b_i]`` (with the default weights: ``sum_i sensitivity_i[b_i]``)
subject to the budget. Each expert is a class of items (one per bit-width) and exactly one
item is taken from every class.

Discretisation. Every expert's usage is split into its cheapest option (always paid) plus an
*extra* ``>= 0`` per bit-width; the DP runs over the extra budget
``capacity - sum_i cheapest_i`` on a grid of cell size ``g``, with each extra rounded **up** to
whole cells, so any DP solution is feasible on the exact values.

* ``bits`` and ``bytes`` budgets: usages are integers (``n_params * bits``, bytes) and ``g`` is
  the gcd of all extras, so every usage is an integral multiple of the grid and the DP is
  **exact**, provided the extra budget spans at most ``max_cells`` cells (with equally sized
  experts it spans about ``n_experts * (avg_bits - min_bits) / gcd(bits)`` cells).
* ``latency`` budget (real-valued), or an integral grid that would be too large: ``g`` is the
  extra budget divided by ``latency_cells`` / ``max_cells``. The result is then feasible and at
  least as good as the exact optimum for the budget reduced by ``n_experts * g``. It is then
  polished on the exact values (greedy upgrade with the leftover budget, then the exchange
  local search of :mod:`.projection`) and compared with the equally polished greedy projection
  of the all-highest-bits allocation; the better one is kept and its feasibility verified on
  the exact values. ``Solution.exact`` says which case applied.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from .problem import (
    FEASIBILITY_RTOL,
    Allocation,
    AllocationProblem,
    ProblemTables,
    build_tables,
    check_feasible,
    fits,
)
from .projection import project_indices, refine_indices

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Solution:
    """Result of :func:`solve`: the allocation, its objective and whether it is provably optimal."""

    allocation: Allocation
    objective: float
    exact: bool
    grid: float
    cells: int


def _grid(extra: np.ndarray, cap_extra: float, integral: bool, max_cells: int,
          latency_cells: int) -> tuple[float, bool]:
    """Cell size and whether the grid is exact (all extras integral multiples of it)."""
    if integral:
        ints = np.rint(extra).astype(np.int64).ravel()
        g = int(np.gcd.reduce(ints[ints > 0])) if (ints > 0).any() else 1
        if cap_extra / g <= max_cells:
            return float(g), True
        logger.info("exact DP grid would need %.3g cells (> max_cells=%d): using a coarse grid; "
                    "the result is feasible but may miss the optimum slightly", cap_extra / g, max_cells)
        return cap_extra / max_cells, False
    return (cap_extra / latency_cells if cap_extra > 0 else 1.0), False


def _dp(q: np.ndarray, v: np.ndarray, cells: int) -> np.ndarray:
    """Multiple-choice knapsack DP; returns the chosen column per expert.

    ``dp[c]`` is the least objective of the experts so far using at most ``c`` cells. Ties go
    to the lower column (fewer bits) for determinism.
    """
    _, choice = _dp_rows(q, v, np.zeros(cells + 1))
    idx, _ = _backtrack(q, choice, cells)
    return idx


def _dp_rows(q: np.ndarray, v: np.ndarray, dp: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Extend the DP vector ``dp`` (``cells + 1`` entries) by the rows of ``q`` / ``v``; returns the new
    vector and the chosen column per row and cell. O(rows x columns x cells) time."""
    n, m = q.shape
    cells = len(dp) - 1
    choice = np.zeros((n, cells + 1), dtype=np.int8 if m < 128 else np.int16)
    for i in range(n):
        new = np.full(cells + 1, np.inf)
        arg = choice[i]
        for j in range(m):
            qj = int(q[i, j])
            if qj > cells or not np.isfinite(v[i, j]):
                continue
            cand = np.full(cells + 1, np.inf)
            cand[qj:] = dp[: cells + 1 - qj] + v[i, j]
            better = cand < new
            new[better] = cand[better]
            arg[better] = j
        dp = new
    return dp, choice


def _backtrack(q: np.ndarray, choice: np.ndarray, c: int) -> tuple[np.ndarray, int]:
    """Columns of the rows of ``choice`` ending at cell ``c``, and the cell before the first row."""
    n = len(choice)
    idx = np.zeros(n, dtype=np.int64)
    for i in range(n - 1, -1, -1):
        idx[i] = int(choice[i, c])
        c -= int(q[i, idx[i]])
    return idx, c


def _fused_dp(t: ProblemTables, extra_raw: np.ndarray, g: float, exact: bool, cells: int) -> np.ndarray:
    """The DP with fused-dispatch groups (:mod:`.fusion`): exact for the true cost, not the additive bound.

    Rows that never fuse go first, as in :func:`_dp`. Then each layer with fusable experts is one
    stage: for every set ``M`` of widths that run fused there (``2^f`` sets for ``f`` fusable widths),
    the layer's experts at a width in ``M`` take their fused objective and use (less their saving),
    and the stage pays ``M``'s fixed parts; the stage keeps, per cell, the best ``M``. Since fixed
    parts are >= 0, a set with a width whose group saves less than its fixed part never beats the
    same set without it, so the stage's value is the true ``min(0, fixed - savings)`` cost. Time:
    ``2^f + 1`` times the plain DP over the layer's rows; memory: one DP vector per layer plus one
    layer's choices.
    """
    fz = t.fusion
    rows = np.arange(len(fz.layer))
    masks = fz.masks()

    def cells_of(raw: np.ndarray) -> np.ndarray:
        return np.ceil(raw / g - (1e-9 if exact else 0.0)).astype(np.int64)

    def stage(members: np.ndarray, layer: int, mask: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray, int, float]:
        v = t.objective[members].copy()
        raw = extra_raw[members].copy()
        for j in mask:
            v[:, j] -= fz.saving_obj[members, j]
            raw[:, j] -= fz.saving_use[members, j] * t.usage_scale
        fixed_q = int(cells_of(np.array([sum(fz.fixed_use[layer, j] for j in mask) * t.usage_scale]))[0])
        return cells_of(np.maximum(raw, 0.0)), v, fixed_q, float(sum(fz.fixed_obj[layer, j] for j in mask))

    free = rows[fz.layer < 0]
    q_free = cells_of(extra_raw[free])
    dp, free_choice = _dp_rows(q_free, t.objective[free], np.zeros(cells + 1))
    stages = []
    for layer in range(fz.layers):
        members = rows[fz.layer == layer]
        best, best_mask = np.full(cells + 1, np.inf), np.zeros(cells + 1, dtype=np.int64)
        for k, mask in enumerate(masks):
            q, v, fixed_q, fixed_v = stage(members, layer, mask)
            h, _ = _dp_rows(q, v, dp)
            cand = np.full(cells + 1, np.inf)
            if fixed_q <= cells:
                cand[fixed_q:] = h[: cells + 1 - fixed_q] + fixed_v
            better = cand < best
            best[better], best_mask[better] = cand[better], k
        stages.append((members, dp, best_mask))
        dp = best
    if not np.isfinite(dp[cells]):
        raise RuntimeError("internal error: the fused-dispatch DP found no feasible allocation for a feasible "
                           "budget; please report this with the problem")
    idx = np.zeros(len(rows), dtype=np.int64)
    c = cells
    for layer in range(fz.layers - 1, -1, -1):
        members, before, best_mask = stages[layer]
        mask = masks[int(best_mask[c])]
        q, v, fixed_q, _ = stage(members, layer, mask)
        _, choice = _dp_rows(q, v, before)
        idx[members], c = _backtrack(q, choice, c - fixed_q)
    idx[free], _ = _backtrack(q_free, free_choice, c)
    return idx


def solve(problem: AllocationProblem, max_cells: int = 100_000, latency_cells: int = 50_000) -> Solution:
    """Solve the multiple-choice knapsack (module docstring).

    Args:
        problem: The allocation problem (needs every sensitivity).
        max_cells: Largest exact integer grid before falling back to a coarse one.
        latency_cells: Grid cells for real-valued (latency) budgets.

    Returns:
        The :class:`Solution`.

    Raises:
        InfeasibleBudgetError: If no allocation meets the budget.
    """
    check_feasible(problem)
    t = build_tables(problem)
    lowest = t.raw_usage if t.fusion is None else t.raw_usage - t.fusion.saving_use * t.usage_scale
    base = lowest.min(axis=1)
    extra = t.raw_usage - base[:, None]
    cap = problem.capacity
    cap_raw = t.usage_scale * (cap + FEASIBILITY_RTOL * max(1.0, abs(cap)))
    cap_extra = max(0.0, cap_raw - float(base.sum()))
    integral = problem.budget.kind in ("bits", "bytes", "stored-bits")
    g, exact = _grid(extra, cap_extra, integral, max_cells, latency_cells)
    q = np.ceil(extra / g - (0.0 if not exact else 1e-9)).astype(np.int64)
    cells = math.floor(cap_extra / g + (1e-9 if exact else 0.0))
    if t.fusion is not None:  # the additive polish below would optimise the per-expert bound, not the cost
        return _finish(problem, t, _fused_dp(t, extra, g, exact, cells), exact, g, cells)
    idx = _dp(q, t.objective, cells)
    if not exact:
        idx = _polish(problem, t, idx)
    return _finish(problem, t, idx, exact, g, cells)


def _polish(problem: AllocationProblem, t: ProblemTables, idx: np.ndarray) -> np.ndarray:
    """Inexact grid: refine the DP result on exact values; keep it or the refined greedy if better."""
    rows = np.arange(len(idx))
    dp = refine_indices(t, project_indices(t, idx, problem), kicks=8)
    top = np.full(len(idx), len(t.bits) - 1)
    greedy = refine_indices(t, project_indices(t, top, problem), kicks=8)
    return greedy if t.objective[rows, greedy].sum() < t.objective[rows, dp].sum() else dp


def _finish(problem: AllocationProblem, t: ProblemTables, idx: np.ndarray, exact: bool, g: float,
            cells: int) -> Solution:
    used = t.used(idx)
    if not fits(used, problem.capacity):
        raise RuntimeError(f"internal error: DP allocation uses {problem.budget.describe(problem.budget.fixed + used)} > "
                           f"{problem.budget.describe()}; please report this with the problem")
    value = t.value(idx)
    logger.debug("optimal: objective %.6g, %d cells of %.4g (exact=%s)", value, cells, g, exact)
    return Solution(t.allocation(idx), value, exact, g, cells)


@dataclass(frozen=True)
class OptimalAllocator:
    """Exact (or, for latency budgets, grid-bounded) optimum of the additive objective.

    Attributes:
        max_cells: Largest exact integer DP grid before a coarse one is used.
        latency_cells: DP grid cells for latency budgets.
    """

    name: ClassVar[str] = "optimal"
    needs: ClassVar[tuple[str, ...]] = ("sensitivity",)
    measures: ClassVar[bool] = False
    places_nonexperts: ClassVar[bool] = True
    summary: ClassVar[str] = ("exact optimum of the additive sensitivity + cost objective, dynamic "
                              "programming")
    max_cells: int = 100_000
    latency_cells: int = 50_000

    def __post_init__(self) -> None:
        if self.max_cells < 1 or self.latency_cells < 1:
            raise ValueError(f"max_cells and latency_cells must be >= 1, got {self.max_cells}, "
                             f"{self.latency_cells}")

    def allocate(self, problem: AllocationProblem) -> Allocation:
        """Return the DP optimum; see :func:`solve`."""
        return solve(problem, self.max_cells, self.latency_cells).allocation
