"""Uniform allocation: the largest single bit-width that fits the budget, for every expert."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import ClassVar

from .problem import Allocation, AllocationProblem, InfeasibleBudgetError, build_tables, check_feasible, fits

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class UniformAllocator:
    """Every expert gets the same bit-width: the largest one whose total usage fits the budget."""

    name: ClassVar[str] = "uniform"
    needs: ClassVar[tuple[str, ...]] = ()
    measures: ClassVar[bool] = False
    places_nonexperts: ClassVar[bool] = True
    summary: ClassVar[str] = "one bit-width for all"

    def allocate(self, problem: AllocationProblem) -> Allocation:
        """Return ``{key: b}`` for the largest ``b`` in ``bits_choices`` that fits.

        Raises:
            InfeasibleBudgetError: If no allocation fits, or (only possible when a lower
                bit-width costs more than a higher one) no single bit-width fits.
        """
        check_feasible(problem)
        t = build_tables(problem, with_objective=False)
        totals = t.usage.sum(axis=0)
        fitting = [int(b) for b, total in zip(t.bits, totals) if fits(float(total), problem.capacity)]
        if not fitting:
            raise InfeasibleBudgetError(problem, problem.budget.fixed + float(totals.min()),
                                        " with one bit-width for all experts")
        bits = max(fitting)
        logger.debug("uniform: %d bits for %d experts", bits, len(t.keys))
        return {k: bits for k in t.keys}
