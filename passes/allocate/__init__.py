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

from ...registry import PluginError, Registry
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

# the built-in allocators; others come from register_allocator() or the entry-point group
# dmpq_compile.allocators (each names a class with the attributes of the Allocator protocol)
ALLOCATORS: dict[str, type] = {
    cls.name: cls
    for cls in (OptimalAllocator, SearchAllocator, RLAllocator, GradVarAllocator, FrequencyAllocator,
                UniformAllocator)
}
_REGISTRY = Registry("allocator", "dmpq_compile.allocators", "allocate")
for _cls in ALLOCATORS.values():
    _REGISTRY.register(_cls)
_DECLARED = ("name", "needs", "measures", "places_nonexperts", "summary")


def register_allocator(cls: type, origin: str = "built-in") -> type:
    """Make ``cls`` available to the ``allocate`` pass, the compile driver and ``--allocator``.

    ``cls`` declares, as class attributes, ``name``, ``needs`` (annotations it reads beyond
    ``freq``; ``"sensitivity"`` stands for the chosen metric's), ``measures`` (takes
    ``accuracy_fn`` / ``hardware_fn`` callbacks), ``places_nonexperts`` (can place non-expert
    weights under ``--nonexpert-bits auto``) and ``summary`` (one phrase for ``--help``).

    Raises:
        PluginError: A declaration is missing, or the name is taken by another class.
    """
    missing = [a for a in _DECLARED if not hasattr(cls, a)]
    if missing or not callable(getattr(cls, "allocate", None)):
        raise PluginError(f"allocator class {cls!r} lacks {missing or ['allocate']}; see the Allocator protocol "
                          "in dmpq_compile.passes.allocate.problem")
    return _REGISTRY.register(cls, origin)


def allocators() -> dict[str, type]:
    """Every registered allocator (built-ins, registered ones and plugins) by name.

    Raises:
        PluginError: A plugin's class lacks one of the declarations :func:`register_allocator` names.
    """
    found = {name: cls for name, cls, _ in _REGISTRY.items()}
    for name, cls in found.items():
        missing = [a for a in _DECLARED if not hasattr(cls, a)]
        if missing:
            raise PluginError(f"allocator {name!r} ({cls!r}) lacks the declarations {missing}; see the Allocator "
                              "protocol in dmpq_compile.passes.allocate.problem")
    return found


def allocator_class(name: str) -> type:
    """The class registered as ``name``.

    Raises:
        ValueError: If ``name`` is unknown (the message lists the registered names).
    """
    found = allocators()
    if name not in found:
        raise ValueError(f"unknown allocator {name!r}; valid names: {sorted(found)}")
    return found[name]


def get_allocator(name: str, **options: Any) -> Allocator:
    """Build the allocator registered as ``name`` with keyword ``options``.

    Raises:
        ValueError: If ``name`` is unknown or an option is not accepted by that allocator.
    """
    cls = allocator_class(name)
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
    "UniformAllocator", "allocator_class", "allocators", "budget_usage", "build_tables", "check_feasible",
    "get_allocator", "gradvar_scores",
    "greedy_by_priority", "is_feasible", "min_feasible_budget", "objective_value", "project", "refine", "register_allocator",
    "solve",
]
