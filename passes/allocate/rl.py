"""The reinforcement-learning allocator: PPO over :class:`~.rl_env.AllocationEnv`.

Training runs ``n_envs`` copies of the environment in lockstep (every episode has one step per
expert), so each policy forward pass serves all of them; one PPO update follows every round of
``n_envs`` episodes. Terminal rewards are divided by the objective's range
(``sum_i max_b objective_i - min_b objective_i``) so the critic sees values of order one.

The allocator returns the best *projected* allocation seen during training, ranked by the
measured objective where a measurement of exactly that allocation exists and by the calibrated
proxy objective otherwise. Candidates are the sampled episodes and, with ``greedy_eval``, one
roll-out of the most likely action per step after every update (else only after the last).
Unless ``refine_top`` is 0, the best ``refine_top`` projected allocations of every round are
also polished by :func:`~.projection.refine` (exchange local search with ``refine_kicks``
kicks) before they compete, each distinct allocation once; the policy alone decides where
those searches start.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
from tqdm.auto import tqdm

from .problem import Allocation, AllocationProblem, build_tables, check_feasible
from .projection import refine_indices
from .rl_agent import PPOAgent, PPOConfig, RolloutBuffer, single_thread
from .rl_env import AllocationEnv, Calibration

logger = logging.getLogger(__name__)

DEFAULT_PPO = PPOConfig(gae_lambda=1.0)


@dataclass(frozen=True)
class RLResult:
    """Outcome of :meth:`RLAllocator.train`.

    Attributes:
        allocation: The best allocation found (always feasible).
        objective: Its measured-or-calibrated-proxy objective (lower is better).
        table_objective: Its additive table objective (:func:`~.problem.objective_value`).
        history: One dict per PPO update: ``episodes`` (so far), ``mean_objective`` (of the
            round's projected episodes), ``best_objective`` (so far), ``entropy`` (of the policy)
            and ``proposal_usage`` (mean budget usage of the round's proposals, before projection).
        measurements: Number of episodes measured with the callbacks.
        seconds: Wall-clock training time.
    """

    allocation: Allocation
    objective: float
    table_objective: float
    history: tuple[dict[str, float], ...]
    measurements: int
    seconds: float


class _BestTracker:
    """Keeps the best candidate, re-scoring proxies with the current calibration scale."""

    def __init__(self, problem: AllocationProblem, calibration: Calibration, top: int, kicks: int) -> None:
        self.t = build_tables(problem)
        self.w_acc = problem.weights.w_acc
        self.cost = self.t.objective - self.w_acc * self.t.sens
        self.calibration, self.top, self.kicks = calibration, top, kicks
        self.rows = np.arange(len(self.t.keys))
        self.best: np.ndarray | None = None
        self._refined: set[bytes] = set()

    def score(self, idx: np.ndarray) -> float:
        """Measured objective of ``idx`` if it was measured, else the calibrated proxy objective."""
        record = self.calibration.measured.get(tuple(idx.tolist()), {})
        loss = record.get("loss", self.calibration.scale * float(self.t.sens[self.rows, idx].sum()))
        cost = record.get("cost", float(self.cost[self.rows, idx].sum()))
        return self.w_acc * loss + cost

    def _offer(self, idx: np.ndarray) -> None:
        if self.best is None or self.score(idx) < self.score(self.best):
            self.best = np.array(idx, copy=True)

    def consider(self, infos: list[dict[str, Any]]) -> None:
        """Offer projected allocations; the best ``top`` not refined before are also refined."""
        refined = 0
        for info in sorted(infos, key=lambda i: i["objective"]):
            idx = info["indices"]
            self._offer(idx)
            key = idx.tobytes()
            if refined < self.top and key not in self._refined:
                self._refined.add(key)
                refined += 1
                self._offer(refine_indices(self.t, idx, kicks=self.kicks))

    @property
    def best_objective(self) -> float:
        return self.score(self.best) if self.best is not None else math.inf


@dataclass(frozen=True)
class RLAllocator:
    """PPO-trained allocator (module docstring).

    Attributes:
        episodes: Training episodes (each walks all experts once).
        seed: Seeds the policy, sampling and environments; fixed seed => same result on CPU.
        accuracy_fn: Optional measured loss increase of an allocation (see :mod:`.rl_env`).
        hardware_fn: Optional end-to-end measured costs of an allocation (see :mod:`.rl_env`).
        measure_every: Episodes between calls of the measurement callbacks.
        progress: Show a tqdm progress bar.
        n_envs: Environments stepped in lockstep = episodes per PPO update.
        refine_top: Per round, polish this many of the best projected allocations (each
            distinct one once) with :func:`~.projection.refine`; 0 disables refinement.
        refine_kicks: ``kicks`` of that refinement (escapes from 2-exchange local optima).
        greedy_eval: After every update also roll out the most likely action at each step (not
            trained on) and offer it as a candidate; else only once at the end.
        ppo: PPO hyper-parameters. ``gae_lambda`` defaults to 1 (Monte-Carlo advantages): the
            only reward comes after the last expert, and ``lambda < 1`` would shrink the credit
            of an early expert by ``lambda ** (n_experts - t)``.
    """

    name: ClassVar[str] = "rl"
    episodes: int = 256
    seed: int = 0
    accuracy_fn: Callable[[Allocation], float] | None = None
    hardware_fn: Callable[[Allocation], Mapping[str, float]] | None = None
    measure_every: int = 16
    progress: bool = True
    n_envs: int = 8
    refine_top: int = 2
    refine_kicks: int = 8
    greedy_eval: bool = True
    ppo: PPOConfig = DEFAULT_PPO

    def __post_init__(self) -> None:
        if self.refine_top < 0 or self.refine_kicks < 0:
            raise ValueError(f"RLAllocator: refine_top and refine_kicks must be >= 0, got {self.refine_top}, "
                             f"{self.refine_kicks}")
        if self.episodes < 1 or self.n_envs < 1 or self.measure_every < 1:
            raise ValueError(f"RLAllocator: episodes, n_envs and measure_every must be >= 1, got "
                             f"{self.episodes}, {self.n_envs}, {self.measure_every}")

    def allocate(self, problem: AllocationProblem) -> Allocation:
        """Train on ``problem`` and return the best allocation found; see :meth:`train`."""
        return self.train(problem).allocation

    def train(self, problem: AllocationProblem) -> RLResult:
        """Train a fresh policy on ``problem`` (torch runs single-threaded meanwhile).

        Raises:
            InfeasibleBudgetError: If no allocation meets the budget.
        """
        check_feasible(problem)
        with single_thread():
            return self._train(problem)

    def _train(self, problem: AllocationProblem) -> RLResult:
        start = time.perf_counter()
        calibration = Calibration(self.measure_every)
        tracker = _BestTracker(problem, calibration, self.refine_top, self.refine_kicks)
        obj = tracker.t.objective
        envs = [AllocationEnv(problem, self.accuracy_fn, self.hardware_fn, self.measure_every, calibration)
                for _ in range(min(self.n_envs, self.episodes))]
        agent = PPOAgent(envs[0].observation_space.shape[0], envs[0].action_space.n, self.ppo, self.seed)
        reward_scale = max(float((obj.max(axis=1) - obj.min(axis=1)).sum()), 1e-12)
        history: list[dict[str, float]] = []
        done = 0
        with tqdm(total=self.episodes, desc="rl allocate", disable=not self.progress) as bar:
            while done < self.episodes:
                active = envs[: min(len(envs), self.episodes - done)]
                buffer, infos = self._rollout(agent, active, done, reward_scale)
                tracker.consider(infos)
                stats = agent.update(buffer)
                if self.greedy_eval:
                    tracker.consider(self._rollout(agent, envs[:1], done, reward_scale, greedy=True)[1])
                done += len(active)
                history.append({"episodes": done,
                                "mean_objective": float(np.mean([i["objective"] for i in infos])),
                                "best_objective": tracker.best_objective, "entropy": stats["entropy"],
                                "proposal_usage": float(np.mean([i["proposal_usage"] for i in infos]))})
                bar.update(len(active))
                bar.set_postfix(best=f"{tracker.best_objective:.4g}")
        if not self.greedy_eval:
            tracker.consider(self._rollout(agent, envs[:1], done, reward_scale, greedy=True)[1])
        return self._result(tracker, calibration, history, time.perf_counter() - start)

    def _rollout(self, agent: PPOAgent, envs: list[AllocationEnv], episode0: int, reward_scale: float,
                 greedy: bool = False) -> tuple[RolloutBuffer, list[dict[str, Any]]]:
        """Run one episode in each env in lockstep; return the buffer and the terminal infos."""
        seeds = [self.seed * 1_000_003 + episode0 + k for k in range(len(envs))]
        obs = np.stack([env.reset(seed=s)[0] for env, s in zip(envs, seeds)])
        buffer, infos = RolloutBuffer(), []
        finished = False
        while not finished:
            actions, logp, values = agent.act(obs, greedy=greedy)
            steps = [env.step(int(a)) for env, a in zip(envs, actions)]
            rewards = np.array([s[1] for s in steps]) / reward_scale
            dones = np.array([s[2] for s in steps], dtype=np.float64)
            buffer.add(obs, actions, logp, values, rewards, dones)
            obs = np.stack([s[0] for s in steps])
            finished = bool(dones.all())
            infos = [s[4] for s in steps]
        return buffer, infos

    @staticmethod
    def _result(tracker: _BestTracker, calibration: Calibration, history: list[dict[str, float]],
                seconds: float) -> RLResult:
        best = tracker.best
        rows = tracker.rows
        result = RLResult(allocation=tracker.t.allocation(best), objective=tracker.score(best),
                          table_objective=float(tracker.t.objective[rows, best].sum()),
                          history=tuple(history), measurements=calibration.measurements, seconds=seconds)
        logger.info("rl: best objective %.6g (table %.6g) after %d episodes in %.1fs, %d measured",
                    result.objective, result.table_objective, history[-1]["episodes"], seconds,
                    result.measurements)
        return result
