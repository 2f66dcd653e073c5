"""A small PPO agent (categorical actor + critic) in plain torch.

The agent knows nothing about bit allocation: it maps observation vectors to a categorical
distribution over actions and learns from rollouts of several environments stepped in lockstep
(``T`` steps x ``E`` environments). Updates use generalised advantage estimation, the clipped
surrogate objective, an entropy bonus and several epochs of minibatch Adam steps.

Determinism: weights are initialised and actions / minibatches sampled from the agent's own
``torch.Generator`` seeded by ``seed``, so the global torch RNG is untouched and two agents with
the same seed, inputs and thread settings produce identical results on CPU.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class PPOConfig:
    """PPO hyper-parameters.

    Attributes:
        hidden: Width of the two hidden layers of the actor and of the critic.
        lr: Adam learning rate.
        gamma: Discount factor.
        gae_lambda: GAE lambda.
        clip: Surrogate clipping range epsilon.
        epochs: Optimisation passes over each rollout.
        minibatch: Transitions per gradient step.
        ent_coef: Entropy bonus weight.
        vf_coef: Value loss weight.
        max_grad_norm: Gradient clipping norm.
    """

    hidden: int = 64
    lr: float = 3e-3
    gamma: float = 1.0
    gae_lambda: float = 0.95
    clip: float = 0.2
    epochs: int = 4
    minibatch: int = 512
    ent_coef: float = 0.01
    vf_coef: float = 0.5
    max_grad_norm: float = 0.5

    def __post_init__(self) -> None:
        if self.hidden < 1 or self.epochs < 1 or self.minibatch < 1:
            raise ValueError(f"PPOConfig: hidden, epochs and minibatch must be >= 1, got {self}")
        if not (0 < self.gamma <= 1 and 0 <= self.gae_lambda <= 1 and self.clip > 0 and self.lr > 0):
            raise ValueError("PPOConfig: need 0 < gamma <= 1, 0 <= gae_lambda <= 1, clip > 0 and lr > 0; "
                             f"got {self}")


@contextlib.contextmanager
def single_thread() -> Iterator[None]:
    """Run torch on one intra-op thread, restoring the previous setting afterwards.

    The networks are tiny: thread hand-offs cost far more than they save (tens of times slower
    on a busy 2-core machine), and one thread also keeps CPU results bit-reproducible.
    """
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _mlp(inp: int, hidden: int, out: int, gain: float, gen: torch.Generator) -> nn.Sequential:
    with torch.random.fork_rng(devices=[]):  # nn.Linear's default init draws from the global RNG
        net = nn.Sequential(nn.Linear(inp, hidden), nn.Tanh(), nn.Linear(hidden, hidden), nn.Tanh(),
                            nn.Linear(hidden, out))
    gains = [np.sqrt(2.0), np.sqrt(2.0), gain]
    for layer, g in zip([m for m in net if isinstance(m, nn.Linear)], gains):
        nn.init.orthogonal_(layer.weight, gain=float(g), generator=gen)
        nn.init.zeros_(layer.bias)
    return net


@dataclass
class RolloutBuffer:
    """Transitions of ``E`` lockstep environments; arrays are indexed ``[t, env]``."""

    obs: list = field(default_factory=list)
    actions: list = field(default_factory=list)
    logp: list = field(default_factory=list)
    values: list = field(default_factory=list)
    rewards: list = field(default_factory=list)
    dones: list = field(default_factory=list)

    def add(self, obs: np.ndarray, actions: np.ndarray, logp: np.ndarray, values: np.ndarray,
            rewards: np.ndarray, dones: np.ndarray) -> None:
        """Append one lockstep transition of all environments."""
        for name, v in zip(("obs", "actions", "logp", "values", "rewards", "dones"),
                           (obs, actions, logp, values, rewards, dones)):
            getattr(self, name).append(np.asarray(v))

    def __len__(self) -> int:
        return len(self.obs)

    def advantages(self, gamma: float, lam: float, last_values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """GAE advantages and returns, each ``[T, E]``; ``last_values`` bootstraps unfinished runs."""
        values = np.stack(self.values).astype(np.float64)
        rewards = np.stack(self.rewards).astype(np.float64)
        dones = np.stack(self.dones).astype(np.float64)
        adv = np.zeros_like(values)
        running = np.zeros(values.shape[1])
        next_value = np.asarray(last_values, dtype=np.float64)
        for t in range(len(values) - 1, -1, -1):
            alive = 1.0 - dones[t]
            delta = rewards[t] + gamma * next_value * alive - values[t]
            running = delta + gamma * lam * alive * running
            adv[t] = running
            next_value = values[t]
        return adv, adv + values


class PPOAgent:
    """Categorical-policy PPO with separate actor and critic MLPs."""

    def __init__(self, obs_dim: int, n_actions: int, config: PPOConfig = PPOConfig(), seed: int = 0) -> None:
        """Build the networks.

        Args:
            obs_dim: Length of an observation vector.
            n_actions: Number of discrete actions.
            config: Hyper-parameters.
            seed: Seeds weight initialisation and all sampling.
        """
        self.config = config
        self.gen = torch.Generator().manual_seed(int(seed))
        self.actor = _mlp(obs_dim, config.hidden, n_actions, 0.01, self.gen)
        self.critic = _mlp(obs_dim, config.hidden, 1, 1.0, self.gen)
        params = list(self.actor.parameters()) + list(self.critic.parameters())
        self.optimizer = torch.optim.Adam(params, lr=config.lr, eps=1e-5)

    @torch.no_grad()
    def act(self, obs: np.ndarray, greedy: bool = False) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Sample (or, with ``greedy``, take the most likely) actions for a batch of observations.

        Returns:
            ``(actions, log_probs, values)``, one entry per row of ``obs``.
        """
        x = torch.as_tensor(obs, dtype=torch.float32)
        logits = self.actor(x)
        if greedy:
            actions = logits.argmax(dim=-1)
        else:
            actions = torch.multinomial(torch.softmax(logits, dim=-1), 1, generator=self.gen).squeeze(-1)
        logp = torch.log_softmax(logits, dim=-1).gather(-1, actions[:, None]).squeeze(-1)
        values = self.critic(x).squeeze(-1)
        return actions.numpy(), logp.numpy(), values.numpy()

    def update(self, buffer: RolloutBuffer, last_values: np.ndarray | None = None) -> dict[str, float]:
        """Run the PPO epochs on ``buffer`` and return mean losses."""
        cfg = self.config
        n_env = buffer.obs[0].shape[0]
        last = np.zeros(n_env) if last_values is None else last_values
        adv, ret = buffer.advantages(cfg.gamma, cfg.gae_lambda, last)
        data = {
            "obs": torch.as_tensor(np.concatenate(buffer.obs), dtype=torch.float32),
            "act": torch.as_tensor(np.concatenate(buffer.actions), dtype=torch.int64),
            "logp": torch.as_tensor(np.concatenate(buffer.logp), dtype=torch.float32),
            "adv": torch.as_tensor(adv.reshape(-1), dtype=torch.float32),
            "ret": torch.as_tensor(ret.reshape(-1), dtype=torch.float32),
        }
        data["adv"] = (data["adv"] - data["adv"].mean()) / (data["adv"].std() + 1e-8)
        stats = {"policy_loss": 0.0, "value_loss": 0.0, "entropy": 0.0}
        steps = 0
        for _ in range(cfg.epochs):
            order = torch.randperm(len(data["act"]), generator=self.gen)
            for start in range(0, len(order), cfg.minibatch):
                mb = {k: v[order[start:start + cfg.minibatch]] for k, v in data.items()}
                for k, v in self._step(mb).items():
                    stats[k] += v
                steps += 1
        return {k: v / max(steps, 1) for k, v in stats.items()}

    def _step(self, mb: dict[str, torch.Tensor]) -> dict[str, float]:
        cfg = self.config
        logits = self.actor(mb["obs"])
        logp_all = torch.log_softmax(logits, dim=-1)
        logp = logp_all.gather(-1, mb["act"][:, None]).squeeze(-1)
        ratio = torch.exp(logp - mb["logp"])
        surrogate = torch.min(ratio * mb["adv"], torch.clamp(ratio, 1 - cfg.clip, 1 + cfg.clip) * mb["adv"])
        policy_loss = -surrogate.mean()
        entropy = -(logp_all.exp() * logp_all).sum(-1).mean()
        value_loss = (self.critic(mb["obs"]).squeeze(-1) - mb["ret"]).pow(2).mean()
        loss = policy_loss + cfg.vf_coef * value_loss - cfg.ent_coef * entropy
        self.optimizer.zero_grad()
        loss.backward()
        params = [p for group in self.optimizer.param_groups for p in group["params"]]
        nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
        self.optimizer.step()
        return {"policy_loss": policy_loss.item(), "value_loss": value_loss.item(), "entropy": entropy.item()}
