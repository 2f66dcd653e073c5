"""Per-expert bit-width allocators.

Pure algorithms over an :class:`AllocationProblem` (experts with profiling features and cost
table rows, the backend's bit-widths, a budget and objective weights); they know nothing about
the graph IR. Every allocator returns ``{expert key: bits}`` using only ``bits_choices`` and
within the budget, or raises :class:`InfeasibleBudgetError`.

Example::

    allocator = get_allocator("optimal")
    bits = allocator.allocate(problem)
"""

from __future__ import annotations

import inspect
from typing import Any

from .frequency import FrequencyAllocator, greedy_by_priority
from .gradvar import GradVarAllocator, gradvar_scores
from .optimal import OptimalAllocator, Solution, solve
from .problem import (
    Allocation,
    AllocationProblem,
    Allocator,
    Budget,
    ExpertCost,
    ExpertInfo,
    InfeasibleBudgetError,
    ObjectiveWeights,
    budget_usage,
    build_tables,
    check_feasible,
    is_feasible,
    min_feasible_budget,
    objective_value,
)
from .projection import project, refine
from .rl import RLAllocator, RLResult
from .rl_agent import PPOAgent, PPOConfig
from .rl_env import AllocationEnv, Calibration
from .search import BestTracker, SearchAllocator, SearchResult
from .uniform import UniformAllocator

ALLOCATORS: dict[str, type] = {
    cls.name: cls
    for cls in (UniformAllocator, FrequencyAllocator, OptimalAllocator, GradVarAllocator, SearchAllocator,
                RLAllocator)
}


def get_allocator(name: str, **options: Any) -> Allocator:
    """Build the allocator registered as ``name`` with keyword ``options``.

    Raises:
        ValueError: If ``name`` is unknown or an option is not accepted by that allocator.
    """
    cls = ALLOCATORS.get(name)
    if cls is None:
        raise ValueError(f"unknown allocator {name!r}; valid names: {sorted(ALLOCATORS)}")
    accepted = [p for p in inspect.signature(cls).parameters]
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        raise ValueError(f"allocator {name!r} does not accept options {unknown}; "
                         f"it accepts {accepted or 'none'}")
    return cls(**options)


__all__ = [
    "ALLOCATORS", "Allocation", "AllocationEnv", "AllocationProblem", "Allocator", "BestTracker", "Budget",
    "Calibration",
    "ExpertCost", "ExpertInfo", "FrequencyAllocator", "GradVarAllocator", "InfeasibleBudgetError",
    "ObjectiveWeights", "OptimalAllocator", "PPOAgent", "PPOConfig", "RLAllocator", "RLResult", "SearchAllocator",
    "SearchResult", "Solution",
    "UniformAllocator", "budget_usage", "build_tables", "check_feasible", "get_allocator", "gradvar_scores",
    "greedy_by_priority", "is_feasible", "min_feasible_budget", "objective_value", "project", "refine",
    "solve",
]
