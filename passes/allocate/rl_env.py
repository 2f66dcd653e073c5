"""Gymnasium environment for bit allocation: one expert per step (HAQ-style).

An episode visits the experts in problem order. At step ``t`` the observation describes expert
``t`` and the episode so far; the action is an index into ``bits_choices``. After the last
expert the proposal goes through the deterministic :func:`~.projection.project` (so the budget
always holds, whatever the policy proposed) and the terminal reward is::

    reward = w_acc * dAcc - w_lat * L - w_mem * M - w_eng * E

``dAcc = -loss`` is the negative loss increase; ``L``, ``M``, ``E`` are the expected per-token
decode latency, the total bytes and the expected per-token energy of the projected allocation,
each divided by the same quantity for the all-highest-bits allocation (1.0 = no savings).

Accuracy. ``loss`` is the additive proxy ``sum_i sensitivity_i[b_i]`` times a calibration scale
(:class:`Calibration`, 1.0 until the first measurement). When an ``accuracy_fn(allocation) ->
loss increase`` is given it is called on every ``measure_every``-th episode; its value is used as
that episode's loss and the scale is refitted by least squares through the origin on all
(proxy, measured) pairs. Likewise ``hardware_fn(allocation) -> {"latency_ms", "bytes",
"energy_mj"}`` (any subset) measured end to end replaces the table cost in that episode's
reward (it is only called when some cost weight is positive); the budget is still enforced on
the table costs.

Observation (float32, clipped to [-10, 10]): per expert its ``freq``, ``mass``, ``log10``
sensitivity at each bit-width (standardised over all experts and bit-widths), standardised
``log1p`` contribution, standardised log size, layer position in [0, 1] and the budget usage of
each bit-width relative to the per-expert budget share; then five global features: the summed
sensitivity so far relative to the worst case (every expert at its most sensitive bit-width),
budget used so far / budget, the cheapest possible usage of the remaining experts / budget, the
affordable fraction of the remaining upgrade room, and the fraction of experts done.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

import gymnasium as gym
import numpy as np

from .problem import COST_METRICS, Allocation, AllocationProblem, build_tables, cost_terms
from .projection import project_indices

logger = logging.getLogger(__name__)

HARDWARE_KEYS = COST_METRICS
N_GLOBAL = 5


@dataclass
class Calibration:
    """Proxy-to-measured loss scale and the measurement schedule, shareable by several envs.

    ``measured`` maps an allocation (column indices) to its latest measured ``loss`` and/or
    ``cost``; ``measurements`` counts the episodes measured.
    """

    measure_every: int = 10
    episodes: int = 0
    pairs: list[tuple[float, float]] = field(default_factory=list)
    measured: dict[tuple[int, ...], dict[str, Any]] = field(default_factory=dict)
    measurements: int = 0

    def due(self) -> bool:
        """Count an episode; true on episodes 0, ``measure_every``, ``2 * measure_every``, ..."""
        due = self.measure_every > 0 and self.episodes % self.measure_every == 0
        self.episodes += 1
        return due

    @property
    def scale(self) -> float:
        """Least-squares ``measured ~ scale * proxy`` (1.0 without usable measurements)."""
        den = sum(p * p for p, _ in self.pairs)
        return sum(p * m for p, m in self.pairs) / den if den > 0 else 1.0

    def add(self, proxy: float, measured: float) -> None:
        """Record a measurement."""
        self.pairs.append((float(proxy), float(measured)))


def _standardise(x: np.ndarray, axis: int | None = 0) -> np.ndarray:
    std = x.std(axis=axis)
    return (x - x.mean(axis=axis)) / np.where(std > 1e-12, std, 1.0)


def expert_features(problem: AllocationProblem, usage: np.ndarray, sens: np.ndarray) -> np.ndarray:
    """Per-expert observation features (module docstring), ``[n_experts, d]``."""
    ex = problem.experts
    layers = np.array([e.layer for e in ex], dtype=np.float64)
    span = layers.max() - layers.min()
    share = problem.capacity / len(ex)
    cols = [
        np.array([[e.freq, e.mass] for e in ex]),
        _standardise(np.log10(np.maximum(sens, 0.0) + 1e-9), axis=None),
        _standardise(np.log1p(np.array([[max(e.contribution, 0.0)] for e in ex]))),
        _standardise(np.log(np.array([[float(e.n_params)] for e in ex]))),
        ((layers - layers.min()) / span if span > 0 else np.zeros_like(layers))[:, None],
        usage / share if share > 0 else np.zeros_like(usage),
    ]
    return np.clip(np.concatenate(cols, axis=1), -10, 10).astype(np.float32)


class AllocationEnv(gym.Env):
    """Walks the experts; actions pick bits; the terminal reward scores the projected allocation."""

    metadata: ClassVar[dict[str, Any]] = {"render_modes": []}

    def __init__(self, problem: AllocationProblem, accuracy_fn: Callable[[Allocation], float] | None = None,
                 hardware_fn: Callable[[Allocation], Mapping[str, float]] | None = None,
                 measure_every: int = 10, calibration: Calibration | None = None) -> None:
        """Create the environment.

        Args:
            problem: The allocation problem (needs every sensitivity).
            accuracy_fn: Optional measured loss increase of an allocation (expensive).
            hardware_fn: Optional end-to-end measured costs of an allocation.
            measure_every: Call the measurement callbacks every this many episodes.
            calibration: Shared :class:`Calibration` (e.g. across lockstep copies of this env).
        """
        super().__init__()
        if measure_every < 1:
            raise ValueError(f"measure_every must be >= 1, got {measure_every}")
        self.problem, self.accuracy_fn, self.hardware_fn = problem, accuracy_fn, hardware_fn
        self.calibration = calibration if calibration is not None else Calibration(measure_every)
        self.tables = t = build_tables(problem)
        self._cost_obj = t.objective - problem.weights.w_acc * t.sens
        self._terms = cost_terms(problem)
        self._feat = expert_features(problem, t.usage, t.sens)
        self._min_use, self._max_use = t.usage.min(axis=1), t.usage.max(axis=1)
        self._worst = max(float(t.sens.max(axis=1).sum()), 1e-12)
        n, m = t.usage.shape
        dim = self._feat.shape[1] + N_GLOBAL
        self.observation_space = gym.spaces.Box(-10.0, 10.0, (dim,), np.float32)
        self.action_space = gym.spaces.Discrete(m)
        self._n, self._t = n, 0
        self._idx = np.zeros(n, dtype=np.int64)
        self._used = self._proxy = 0.0

    def _obs(self) -> np.ndarray:
        t, cap = min(self._t, self._n - 1), self.problem.capacity
        rest_min = float(self._min_use[self._t:].sum())
        room = float(self._max_use[self._t:].sum()) - rest_min
        afford = (cap - self._used - rest_min) / room if room > 0 else 1.0
        glob = np.array([self._proxy / self._worst, self._used / cap if cap else 0.0,
                         rest_min / cap if cap else 0.0, afford, self._t / self._n], dtype=np.float32)
        return np.clip(np.concatenate([self._feat[t], glob]), -10, 10).astype(np.float32)

    def reset(self, *, seed: int | None = None, options: dict | None = None) -> tuple[np.ndarray, dict]:
        """Start a new episode at the first expert."""
        super().reset(seed=seed)
        self._t, self._used, self._proxy = 0, 0.0, 0.0
        self._idx[:] = 0
        return self._obs(), {}

    def step(self, action: int) -> tuple[np.ndarray, float, bool, bool, dict]:
        """Assign bits ``bits_choices[action]`` to the current expert."""
        if self._t >= self._n:
            raise RuntimeError("episode is over: call reset() before step()")
        if not self.action_space.contains(int(action)):
            raise ValueError(f"action {action!r} is not in {self.action_space}")
        i, a = self._t, int(action)
        self._idx[i] = a
        self._used += float(self.tables.usage[i, a])
        self._proxy += float(self.tables.sens[i, a])
        self._t += 1
        if self._t < self._n:
            return self._obs(), 0.0, False, False, {}
        reward, info = self._finish(self._idx, self._used)
        return self._obs(), reward, True, False, info

    def evaluate(self, proposal: np.ndarray) -> dict[str, Any]:
        """The terminal step for a whole proposal at once (column indices, one per expert).

        Projects, measures when due and scores exactly like the last :meth:`step` of an episode
        that proposed ``proposal``; returns that step's ``info``. The episode state is untouched.
        """
        proposal = np.asarray(proposal, dtype=np.int64)
        if proposal.shape != (self._n,) or proposal.min() < 0 or proposal.max() >= self.action_space.n:
            raise ValueError(f"proposal must be {self._n} column indices in [0, {self.action_space.n}), "
                             f"got shape {proposal.shape}")
        used = float(self.tables.usage[np.arange(self._n), proposal].sum())
        return self._finish(proposal, used)[1]

    def _finish(self, proposal: np.ndarray, proposal_usage: float) -> tuple[float, dict]:
        t, w = self.tables, self.problem.weights
        idx = project_indices(t, proposal, self.problem)
        rows = np.arange(self._n)
        proxy = float(t.sens[rows, idx].sum())
        cost = float(self._cost_obj[rows, idx].sum()) + t.fused(idx)  # the objective optimal and search use
        allocation = t.allocation(idx)
        loss, measured = self.calibration.scale * proxy, False
        if self.calibration.due():
            loss, cost, measured = self._measure(idx, allocation, proxy, loss, cost)
        objective = w.w_acc * loss + cost
        info = {"proposal": t.allocation(proposal), "allocation": allocation, "indices": idx,
                "proxy": proxy, "loss": loss, "cost": cost, "objective": objective, "measured": measured,
                "proposal_usage": proposal_usage}
        return -objective, info

    def _measure(self, idx: np.ndarray, allocation: Allocation, proxy: float, loss: float,
                 cost: float) -> tuple[float, float, bool]:
        record: dict[str, Any] = {}
        if self.accuracy_fn is not None:
            loss = float(self.accuracy_fn(allocation))
            self.calibration.add(proxy, loss)
            record["loss"] = loss
        if self.hardware_fn is not None and self._terms:
            cost = self._hardware_cost(self.hardware_fn(allocation), idx)
            record["cost"] = cost
        if record:
            self.calibration.measurements += 1
            self.calibration.measured[tuple(idx.tolist())] = record
            logger.debug("measured episode: %s (proxy %.4g, scale %.4g)", record, proxy,
                         self.calibration.scale)
        return loss, cost, bool(record)

    def _hardware_cost(self, hw: Mapping[str, float], idx: np.ndarray) -> float:
        """Weighted normalised cost with measured values where ``hw`` has them, table values elsewhere."""
        unknown = sorted(set(hw) - set(HARDWARE_KEYS))
        if unknown:
            raise ValueError(f"hardware_fn returned unknown keys {unknown}; expected any of {HARDWARE_KEYS}")
        rows = np.arange(self._n)
        cost = 0.0
        for name, (weight, mat, ref) in self._terms.items():
            if name in hw:
                cost += weight * float(hw[name]) / ref
            else:
                cost += weight * float(mat[rows, idx].sum())
        return cost
