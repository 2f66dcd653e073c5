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
    n, m = q.shape
    dp = np.zeros(cells + 1)
    choice = np.zeros((n, cells + 1), dtype=np.int8 if m < 128 else np.int16)
    for i in range(n):
        new = np.full(cells + 1, np.inf)
        arg = choice[i]
        for j in range(m):
            qj = int(q[i, j])
            if qj > cells:
                continue
            cand = np.full(cells + 1, np.inf)
            cand[qj:] = dp[: cells + 1 - qj] + v[i, j]
            better = cand < new
            new[better] = cand[better]
            arg[better] = j
        dp = new
    idx = np.zeros(n, dtype=np.int64)
    c = cells
    for i in range(n - 1, -1, -1):
        idx[i] = int(choice[i, c])
        c -= int(q[i, idx[i]])
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
    base = t.raw_usage.min(axis=1)
    extra = t.raw_usage - base[:, None]
    cap = problem.capacity
    cap_raw = t.usage_scale * (cap + FEASIBILITY_RTOL * max(1.0, abs(cap)))
    cap_extra = max(0.0, cap_raw - float(base.sum()))
    integral = problem.budget.kind in ("bits", "bytes", "stored-bits")
    g, exact = _grid(extra, cap_extra, integral, max_cells, latency_cells)
    q = np.ceil(extra / g - (0.0 if not exact else 1e-9)).astype(np.int64)
    cells = math.floor(cap_extra / g + (1e-9 if exact else 0.0))
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
    rows = np.arange(len(idx))
    used = float(t.usage[rows, idx].sum())
    if not fits(used, problem.capacity):
        raise RuntimeError(f"internal error: DP allocation uses {problem.budget.describe(problem.budget.fixed + used)} > "
                           f"{problem.budget.describe()}; please report this with the problem")
    value = float(t.objective[rows, idx].sum())
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
