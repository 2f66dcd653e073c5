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
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
from tqdm.auto import tqdm

from .problem import Allocation, AllocationProblem, check_feasible
from .rl_agent import PPOAgent, PPOConfig, RolloutBuffer, single_thread
from .rl_env import AllocationEnv, Calibration
from .search import BestTracker, SearchResult, past_limit, require_at_least

logger = logging.getLogger(__name__)

DEFAULT_PPO = PPOConfig(gae_lambda=1.0)


RLResult = SearchResult
"""What :meth:`RLAllocator.train` returns (the same record as the ``search`` allocator's)."""


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
        time_limit_s: Stop training at the first update after this many seconds and return the
            best allocation so far, with a warning (None: never). One episode walks every expert
            once, so on 1024 experts 256 episodes would take several minutes on 2 cores.
        ppo: PPO hyper-parameters. ``gae_lambda`` defaults to 1 (Monte-Carlo advantages): the
            only reward comes after the last expert, and ``lambda < 1`` would shrink the credit
            of an early expert by ``lambda ** (n_experts - t)``.
    """

    name: ClassVar[str] = "rl"
    needs: ClassVar[tuple[str, ...]] = ("sensitivity",)
    measures: ClassVar[bool] = True
    places_nonexperts: ClassVar[bool] = False
    summary: ClassVar[str] = ("PPO proposals through the same projection and local search; measured to reach "
                              "the same objective as search, more slowly")
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
    time_limit_s: float | None = 240.0
    ppo: PPOConfig = DEFAULT_PPO

    def __post_init__(self) -> None:
        require_at_least("RLAllocator", 0, refine_top=self.refine_top, refine_kicks=self.refine_kicks)
        require_at_least("RLAllocator", 1, episodes=self.episodes, n_envs=self.n_envs,
                         measure_every=self.measure_every)

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
        tracker = BestTracker(problem, calibration, self.refine_top, self.refine_kicks)
        obj = tracker.t.objective
        envs = [AllocationEnv(problem, self.accuracy_fn, self.hardware_fn, self.measure_every, calibration)
                for _ in range(min(self.n_envs, self.episodes))]
        agent = PPOAgent(envs[0].observation_space.shape[0], envs[0].action_space.n, self.ppo, self.seed)
        reward_scale = max(float((obj.max(axis=1) - obj.min(axis=1)).sum()), 1e-12)
        history: list[dict[str, float]] = []
        done, stopped = 0, False
        with tqdm(total=self.episodes, desc="rl allocate", disable=not self.progress) as bar:
            while done < self.episodes:
                if done and past_limit(start, self.time_limit_s, "rl", done, self.episodes):
                    stopped = True
                    break
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
        result = tracker.result(calibration, history, time.perf_counter() - start, stopped)
        logger.info("rl: best objective %.6g (table %.6g) after %d episodes (%d proposals, %d refinements) "
                    "in %.1fs, %d measured", result.objective, result.table_objective, done, result.proposals,
                    result.refinements, result.seconds, result.measurements)
        return result

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
