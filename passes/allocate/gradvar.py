"""Router-gradient-change / intra-neuron-variance allocation.

Experts whose router gradients change least during calibration (stable, important routing) and
whose intermediate neurons have high variance (a wide activation range that quantization noise
hurts) get more bits. The score is a rank combination in ``[0, 1]``::

    stable_i = 1 - (rank(router_grad_change)_i - 1) / (n - 1)   # lowest change -> 1
    spread_i = (rank(neuron_variance)_i - 1) / (n - 1)          # highest variance -> 1
    score_i  = (stable_i + spread_i) / 2

with average ranks for ties (``n == 1`` gives score 1). Bits are then given by the greedy
level-by-level upgrade of :func:`.frequency.greedy_by_priority` with ``score`` as priority.
Ranks make the rule insensitive to the very different scales of the two features.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from .frequency import greedy_by_priority
from .problem import Allocation, AllocationProblem

logger = logging.getLogger(__name__)


def gradvar_scores(problem: AllocationProblem) -> np.ndarray:
    """Rank-combination score per expert (module docstring), in ``problem.experts`` order.

    Raises:
        ValueError: If an expert lacks ``router_grad_change`` or ``neuron_variance``.
    """
    missing = [e.key for e in problem.experts if e.router_grad_change is None or e.neuron_variance is None]
    if missing:
        raise ValueError(
            f"the gradvar allocator needs router_grad_change and neuron_variance for every expert; "
            f"{len(missing)} lack them (e.g. {missing[:5]}): run the gradvar profiling pass that writes "
            "these annotations, or choose another allocator (e.g. 'optimal' or 'frequency')")
    rgc = np.array([e.router_grad_change for e in problem.experts], dtype=np.float64)
    var = np.array([e.neuron_variance for e in problem.experts], dtype=np.float64)
    n = len(rgc)
    if n == 1:
        return np.ones(1)
    stable = 1.0 - (average_ranks(rgc) - 1.0) / (n - 1)
    spread = (average_ranks(var) - 1.0) / (n - 1)
    return (stable + spread) / 2.0


@dataclass(frozen=True)
class GradVarAllocator:
    """More bits to experts with stable router gradients and high neuron variance."""

    name: ClassVar[str] = "gradvar"
    needs: ClassVar[tuple[str, ...]] = ("router_grad_change", "neuron_variance")
    measures: ClassVar[bool] = False
    places_nonexperts: ClassVar[bool] = False
    summary: ClassVar[str] = "router gradient / neuron variance ranks"

    def allocate(self, problem: AllocationProblem) -> Allocation:
        """Return the gradvar-greedy allocation (module docstring)."""
        scores = gradvar_scores(problem)
        logger.debug("gradvar scores: min %.3f max %.3f", scores.min(), scores.max())
        return greedy_by_priority(problem, scores)


def average_ranks(x: np.ndarray) -> np.ndarray:
    """1-based ranks of ``x`` with ties given their average rank (like ``scipy.stats.rankdata``)."""
    x = np.asarray(x, dtype=np.float64)
    order = np.argsort(x, kind="mergesort")
    sorted_x = x[order]
    starts = np.r_[0, np.flatnonzero(np.diff(sorted_x)) + 1]  # first index of each run of equal values
    ends = np.r_[starts[1:], len(x)]
    ranks = np.empty(len(x))
    for a, b in zip(starts, ends):
        ranks[order[a:b]] = (a + b + 1) / 2.0  # mean of ranks a+1 .. b
    return ranks
