"""Proposal search: random proposals, the budget projection and exchange local search.

This is the part of the ``rl`` allocator that is not learned, as an allocator of its own
(``search``) and as the ablation baseline of ``rl``. Every round draws ``per_round`` proposals
(each expert's bit-width uniformly at random), evaluates them through the same
:class:`~.rl_env.AllocationEnv` terminal step as ``rl`` (projection onto the budget, measured or
calibrated-proxy objective), and :class:`BestTracker` polishes the best ``refine_top`` of them
with :func:`~.projection.refine_indices`. Given the same proposals, refinements and
measurements, ``search`` and ``rl`` differ only in where the proposals come from.

Bounds: the tracker remembers which allocations it refined as 20-byte digests, at most
``refine_top`` per round (so at most ``refine_top * rounds``); the calibration keeps one record
per measured episode (at most ``proposals / measure_every``). ``time_limit_s`` stops the search
at the first round boundary past it (logged), so a run is bounded in time as well.
"""

from __future__ import annotations

import hashlib
import logging
import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from .problem import Allocation, AllocationProblem, build_tables, check_feasible
from .projection import refine_indices
from .rl_env import AllocationEnv, Calibration

logger = logging.getLogger(__name__)


def require_at_least(owner: str, minimum: int, **settings: int) -> None:
    """Raise ``ValueError`` unless every named setting is ``>= minimum`` (the message names them all).

    The ``search`` and ``rl`` allocators share their proposal, refinement and measurement settings.
    """
    if any(v < minimum for v in settings.values()):
        names = list(settings)
        listed = names[0] if len(names) == 1 else f"{', '.join(names[:-1])} and {names[-1]}"
        raise ValueError(f"{owner}: {listed} must be >= {minimum}, got {', '.join(map(str, settings.values()))}")


@dataclass(frozen=True)
class SearchResult:
    """Outcome of a search (``search``) or of PPO training (``rl``).

    Attributes:
        allocation: The best allocation found (always feasible).
        objective: Its measured-or-calibrated-proxy objective (lower is better).
        table_objective: Its additive table objective (:func:`~.problem.objective_value`).
        history: One dict per round: ``episodes`` (proposals so far), ``mean_objective`` (of the
            round's projected proposals), ``best_objective`` (so far), ``proposal_usage`` (mean
            budget usage before projection) and, for ``rl``, the policy's ``entropy``.
        measurements: Proposals measured with the callbacks.
        proposals: Projected allocations evaluated (sampled and greedy roll-outs).
        refinements: Calls of the exchange local search.
        seconds: Wall-clock time.
        stopped_early: Whether ``time_limit_s`` ended the run before all proposals were made.
    """

    allocation: Allocation
    objective: float
    table_objective: float
    history: tuple[dict[str, float], ...]
    measurements: int
    proposals: int
    refinements: int
    seconds: float
    stopped_early: bool = False


class BestTracker:
    """Keeps the best candidate, re-scoring proxies with the current calibration scale."""

    def __init__(self, problem: AllocationProblem, calibration: Calibration, top: int, kicks: int) -> None:
        self.t = build_tables(problem)
        self.w_acc = problem.weights.w_acc
        self.cost = self.t.objective - self.w_acc * self.t.sens
        self.calibration, self.top, self.kicks = calibration, top, kicks
        self.rows = np.arange(len(self.t.keys))
        self.best: np.ndarray | None = None
        self.proposals = self.refinements = 0
        self._refined: set[bytes] = set()

    def score(self, idx: np.ndarray) -> float:
        """Measured objective of ``idx`` if it was measured, else the calibrated proxy objective."""
        record = self.calibration.measured.get(tuple(idx.tolist()), {})
        loss = record.get("loss", self.calibration.scale * float(self.t.sens[self.rows, idx].sum()))
        cost = record.get("cost", float(self.cost[self.rows, idx].sum()) + self.t.fused(idx))
        return self.w_acc * loss + cost

    def _offer(self, idx: np.ndarray) -> None:
        if self.best is None or self.score(idx) < self.score(self.best):
            self.best = np.array(idx, copy=True)

    def consider(self, infos: list[dict[str, Any]]) -> None:
        """Offer projected allocations; the best ``top`` not refined before are also refined."""
        refined = 0
        self.proposals += len(infos)
        for info in sorted(infos, key=lambda i: i["objective"]):
            idx = info["indices"]
            self._offer(idx)
            key = hashlib.sha1(idx.tobytes()).digest()
            if refined < self.top and key not in self._refined:
                self._refined.add(key)
                refined += 1
                self.refinements += 1
                self._offer(refine_indices(self.t, idx, kicks=self.kicks))

    @property
    def best_objective(self) -> float:
        return self.score(self.best) if self.best is not None else math.inf

    def result(self, calibration: Calibration, history: list[dict[str, float]], seconds: float,
               stopped_early: bool) -> SearchResult:
        best = self.best
        return SearchResult(allocation=self.t.allocation(best), objective=self.score(best),
                            table_objective=self.t.value(best),
                            history=tuple(history), measurements=calibration.measurements,
                            proposals=self.proposals, refinements=self.refinements, seconds=seconds,
                            stopped_early=stopped_early)


def past_limit(start: float, limit: float | None, what: str, done: int, total: int) -> bool:
    """Whether ``limit`` seconds have passed since ``start``; logs a warning when they have."""
    if limit is None or time.perf_counter() - start <= limit:
        return False
    logger.warning("%s: time limit of %.0f s reached after %d of %d proposals; returning the best so far",
                   what, limit, done, total)
    return True


@dataclass(frozen=True)
class SearchAllocator:
    """Random proposals + projection + exchange local search (module docstring).

    Attributes:
        proposals: Random proposals in total.
        per_round: Proposals per round (the best ``refine_top`` of each round are refined).
        refine_top: Refinements per round (each distinct allocation once); 0 disables them.
        refine_kicks: ``kicks`` of the refinement.
        seed: Seeds the proposals.
        accuracy_fn: Optional measured loss increase of an allocation (see :mod:`.rl_env`).
        hardware_fn: Optional end-to-end measured costs of an allocation (see :mod:`.rl_env`).
        measure_every: Proposals between calls of the measurement callbacks.
        time_limit_s: Stop at the first round boundary after this many seconds (None: never).
    """

    name: ClassVar[str] = "search"
    needs: ClassVar[tuple[str, ...]] = ("sensitivity",)
    measures: ClassVar[bool] = True
    places_nonexperts: ClassVar[bool] = False
    summary: ClassVar[str] = ("random proposals, each projected onto the budget and polished by an exchange "
                              "local search, re-ranked by whole-model interpreter measurements on models up to 100M "
                              "parameters")
    proposals: int = 32
    per_round: int = 8
    refine_top: int = 2
    refine_kicks: int = 8
    seed: int = 0
    accuracy_fn: Callable[[Allocation], float] | None = None
    hardware_fn: Callable[[Allocation], Mapping[str, float]] | None = None
    measure_every: int = 16
    time_limit_s: float | None = 240.0

    def __post_init__(self) -> None:
        require_at_least("SearchAllocator", 1, proposals=self.proposals, per_round=self.per_round,
                         measure_every=self.measure_every)
        require_at_least("SearchAllocator", 0, refine_top=self.refine_top, refine_kicks=self.refine_kicks)

    def allocate(self, problem: AllocationProblem) -> Allocation:
        """Search and return the best allocation found; see :meth:`search`."""
        return self.search(problem).allocation

    def search(self, problem: AllocationProblem) -> SearchResult:
        """Run the search on ``problem``.

        Raises:
            InfeasibleBudgetError: If no allocation meets the budget.
        """
        check_feasible(problem)
        start = time.perf_counter()
        calibration = Calibration(self.measure_every)
        tracker = BestTracker(problem, calibration, self.refine_top, self.refine_kicks)
        env = AllocationEnv(problem, self.accuracy_fn, self.hardware_fn, self.measure_every, calibration)
        rng = np.random.default_rng(self.seed)
        n, m = tracker.t.usage.shape
        history: list[dict[str, float]] = []
        done, stopped = 0, False
        while done < self.proposals:
            if done and past_limit(start, self.time_limit_s, "search", done, self.proposals):
                stopped = True
                break
            k = min(self.per_round, self.proposals - done)
            infos = [env.evaluate(rng.integers(0, m, n)) for _ in range(k)]
            tracker.consider(infos)
            done += k
            history.append({"episodes": done, "mean_objective": float(np.mean([i["objective"] for i in infos])),
                            "best_objective": tracker.best_objective,
                            "proposal_usage": float(np.mean([i["proposal_usage"] for i in infos]))})
        result = tracker.result(calibration, history, time.perf_counter() - start, stopped)
        logger.info("search: best objective %.6g (table %.6g) from %d proposals, %d refinements in %.1fs, "
                    "%d measured", result.objective, result.table_objective, result.proposals,
                    result.refinements, result.seconds, result.measurements)
        return result
