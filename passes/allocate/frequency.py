"""Frequency-based allocation: rarely used experts get fewer bits.

Every expert starts at its cheapest bit-width (the lowest one when costs grow with bits). Then,
one bit-width level at a time, the expert with the highest ``priority / step_cost`` whose next
level still fits the budget is upgraded, until no upgrade fits. ``priority`` is the routing
frequency ``freq``; ``step_cost = n_params * (next_bits - bits)`` is the size the upgrade adds,
a cost independent of the budget kind, so frequency still matters under a latency budget (where
the budget usage itself is proportional to ``freq``). Ties go to the higher priority, then the
smaller key. An expert whose next level does not fit is not considered again.

With equally sized experts and a ``bits`` budget (or equal byte costs and a ``bytes`` budget)
this keeps ``bits`` non-decreasing in ``freq``; under a latency budget a frequent expert's
upgrade costs more, so a rarer expert may take the last bit of budget.
"""

from __future__ import annotations

import heapq
import logging
from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from .problem import Allocation, AllocationProblem, build_tables, check_feasible, fits

logger = logging.getLogger(__name__)


def greedy_by_priority(problem: AllocationProblem, priority: np.ndarray) -> Allocation:
    """Greedy level-by-level upgrades by ``priority / step_cost`` (module docstring).

    Args:
        problem: The allocation problem.
        priority: One non-negative score per expert, in ``problem.experts`` order; higher
            scores get bits first.

    Returns:
        A feasible allocation.

    Raises:
        InfeasibleBudgetError: If no allocation meets the budget.
    """
    check_feasible(problem)
    t = build_tables(problem, with_objective=False)
    if len(priority) != len(t.keys) or not np.all(np.isfinite(priority)):
        raise ValueError(f"need one finite priority per expert ({len(t.keys)}), got {len(priority)}")
    idx = np.argmin(t.usage, axis=1)
    used = float(t.usage[np.arange(len(idx)), idx].sum())
    n_params = [e.n_params for e in problem.experts]
    bits, usage, m = t.bits.tolist(), t.usage.tolist(), len(t.bits)

    def entry(i: int) -> tuple | None:
        j = int(idx[i])
        if j + 1 >= m:
            return None
        ratio = float(priority[i]) / (n_params[i] * (bits[j + 1] - bits[j]))
        return (-ratio, -float(priority[i]), t.keys[i], i, j)

    heap = [e for i in range(len(idx)) if (e := entry(i)) is not None]
    heapq.heapify(heap)
    while heap:
        *_, i, j = heapq.heappop(heap)
        inc = usage[i][j + 1] - usage[i][j]
        if not fits(used + inc, problem.capacity):
            continue
        used += inc
        idx[i] = j + 1
        if (e := entry(i)) is not None:
            heapq.heappush(heap, e)
    return t.allocation(idx)


@dataclass(frozen=True)
class FrequencyAllocator:
    """Upgrade experts greedily by routing frequency per unit of added size."""

    name: ClassVar[str] = "frequency"
    needs: ClassVar[tuple[str, ...]] = ()
    measures: ClassVar[bool] = False
    places_nonexperts: ClassVar[bool] = False
    summary: ClassVar[str] = "routing frequency"

    def allocate(self, problem: AllocationProblem) -> Allocation:
        """Return the frequency-greedy allocation (module docstring)."""
        freq = np.array([e.freq for e in problem.experts], dtype=np.float64)
        return greedy_by_priority(problem, freq)
