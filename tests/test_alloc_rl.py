"""The RL allocator: gymnasium env, PPO agent, measurement callbacks, determinism and quality."""

import numpy as np
import pytest
import torch
from dmpq_compile.passes.allocate import (
    AllocationEnv,
    AllocationProblem,
    Budget,
    ObjectiveWeights,
    PPOAgent,
    PPOConfig,
    RLAllocator,
    UniformAllocator,
    is_feasible,
    objective_value,
    project,
    solve,
)
from dmpq_compile.passes.allocate.rl_agent import RolloutBuffer
from gymnasium.utils.env_checker import check_env
from test_alloc_problem import make_expert, random_problem

# Stated tolerance: on the small problems below RL (with its default projection + refinement)
# must come within 1% of the DP optimum of the additive objective.
RL_TOLERANCE = 1.01


def _run_episode(env, actions):
    obs, _ = env.reset(seed=0)
    for t, a in enumerate(actions):
        assert env.observation_space.contains(obs)
        obs, reward, terminated, truncated, info = env.step(a)
        assert terminated == (t == len(actions) - 1) and not truncated
    return reward, info


def test_env_passes_gymnasium_checker():
    check_env(AllocationEnv(random_problem(0, n=6)), skip_render_check=True)


def test_env_reward_is_minus_objective_of_projected_proposal():
    problem = random_problem(1, n=8, frac=0.3)
    env = AllocationEnv(problem)
    actions = [len(problem.bits_choices) - 1] * 8  # propose 16 bits everywhere: far over budget
    reward, info = _run_episode(env, actions)
    expected = project(problem, {e.key: 16 for e in problem.experts})
    assert info["allocation"] == expected and is_feasible(problem, expected)
    assert info["proposal"] == {e.key: 16 for e in problem.experts}
    assert reward == pytest.approx(-objective_value(problem, expected))
    with pytest.raises(RuntimeError, match="call reset"):
        env.step(0)
    env.reset()
    with pytest.raises(ValueError, match="not in Discrete"):
        env.step(99)


def test_reward_with_cost_weights_normalises_by_all_highest_bits():
    bits = (4, 16)
    ex = tuple(make_expert(i, bits, sens={4: 10.0, 16: 0.0}) for i in range(2))
    weights = ObjectiveWeights(w_acc=1.0, w_lat=1.0, w_mem=2.0)
    problem = AllocationProblem(ex, bits, Budget("bits", 16), weights)
    reward, _ = _run_episode(AllocationEnv(problem), [1, 1])
    assert reward == pytest.approx(-(0.0 + 1.0 + 2.0))  # all 16 bits: costs equal the reference
    problem = AllocationProblem(ex, bits, Budget("bits", 4), problem.weights)
    reward, _ = _run_episode(AllocationEnv(problem), [1, 1])  # projected down to 4 bits
    assert reward == pytest.approx(-(20.0 + 0.25 + 2 * 0.25))


def test_accuracy_fn_is_called_every_measure_every_episodes_and_calibrates():
    problem = random_problem(2, n=5, frac=0.5)
    calls = []

    def accuracy_fn(allocation):
        calls.append(dict(allocation))
        return 3.0 * objective_value(problem, allocation)  # the true loss is 3x the proxy

    env = AllocationEnv(problem, accuracy_fn=accuracy_fn, measure_every=3)
    infos = [_run_episode(env, [1] * 5)[1] for _ in range(7)]
    assert len(calls) == 3  # episodes 0, 3 and 6
    assert [i["measured"] for i in infos] == [True, False, False, True, False, False, True]
    assert env.calibration.scale == pytest.approx(3.0)
    assert infos[1]["loss"] == pytest.approx(3.0 * infos[1]["proxy"])


def test_hardware_fn_replaces_table_costs_in_measured_episodes():
    bits = (4, 16)
    ex = tuple(make_expert(i, bits, sens={4: 10.0, 16: 0.0}) for i in range(2))
    problem = AllocationProblem(ex, bits, Budget("bits", 16), ObjectiveWeights(w_acc=1.0, w_lat=1.0))
    ref = sum(e.freq * e.cost[16].decode_ms for e in ex)
    env = AllocationEnv(problem, hardware_fn=lambda alloc: {"latency_ms": 0.5 * ref}, measure_every=2)
    assert _run_episode(env, [1, 1])[0] == pytest.approx(-0.5)  # measured
    assert _run_episode(env, [1, 1])[0] == pytest.approx(-1.0)  # table
    bad = AllocationEnv(problem, hardware_fn=lambda alloc: {"power_w": 1.0})
    with pytest.raises(ValueError, match="unknown keys \\['power_w'\\]"):
        _run_episode(bad, [1, 1])


def test_gae_with_lambda_one_is_return_minus_value():
    buf = RolloutBuffer()
    for t in range(3):  # two envs, reward 1 at the last of 3 steps; critic says 0.5 and 1.0
        last = 1.0 if t == 2 else 0.0
        values = np.array([0.5, 1.0])
        buf.add(np.zeros((2, 1)), np.zeros(2), np.zeros(2), values, np.full(2, last), np.full(2, last))
    adv, ret = buf.advantages(1.0, 1.0, np.zeros(2))
    assert np.allclose(ret, 1.0) and np.allclose(adv[:, 0], 0.5) and np.allclose(adv[:, 1], 0.0)


def test_agent_is_deterministic_and_leaves_global_rng_alone():
    torch.manual_seed(123)
    state = torch.random.get_rng_state()
    obs = np.random.default_rng(0).normal(size=(4, 7)).astype(np.float32)
    a1 = PPOAgent(7, 3, PPOConfig(), seed=5).act(obs)
    a2 = PPOAgent(7, 3, PPOConfig(), seed=5).act(obs)
    for x, y in zip(a1, a2):
        assert np.array_equal(x, y)
    assert torch.equal(state, torch.random.get_rng_state())


def test_rl_is_deterministic_with_a_fixed_seed():
    problem = random_problem(4, n=10, kind="latency", frac=0.3)
    runs = [RLAllocator(episodes=24, seed=7, n_envs=4, progress=False).train(problem) for _ in range(2)]
    assert runs[0].allocation == runs[1].allocation
    assert runs[0].history == runs[1].history


@pytest.mark.parametrize("kind", ["bits", "bytes", "latency"])
def test_rl_close_to_optimal_and_better_than_uniform(kind):
    problem = random_problem(3, n=12, kind=kind, frac=0.3)
    result = RLAllocator(episodes=64, seed=0, progress=False).train(problem)
    assert is_feasible(problem, result.allocation)
    optimum = solve(problem).objective
    uniform = objective_value(problem, UniformAllocator().allocate(problem))
    assert result.table_objective == pytest.approx(objective_value(problem, result.allocation))
    assert result.table_objective <= RL_TOLERANCE * optimum + 1e-12
    assert result.table_objective < uniform


def test_rl_policy_alone_improves_during_training():
    problem = random_problem(6, n=16, kind="bits", frac=0.25)
    result = RLAllocator(episodes=96, seed=0, progress=False, refine_top=0).train(problem)
    first, last = result.history[0]["mean_objective"], result.history[-1]["mean_objective"]
    assert last < first
    assert result.objective <= 1.05 * solve(problem).objective


def test_rl_with_measurements_returns_a_feasible_allocation():
    problem = random_problem(5, n=6, frac=0.4)
    seen = []

    def accuracy_fn(allocation):
        seen.append(1)
        return 2.0 * objective_value(problem, allocation) + 0.01

    allocator = RLAllocator(episodes=16, n_envs=4, measure_every=4, accuracy_fn=accuracy_fn, progress=False)
    result = allocator.train(problem)
    assert is_feasible(problem, result.allocation)
    assert result.measurements >= 1 and len(seen) >= 4


def test_rl_option_validation():
    with pytest.raises(ValueError, match="episodes, n_envs and measure_every must be >= 1"):
        RLAllocator(episodes=0)
    with pytest.raises(ValueError, match="measure_every must be >= 1"):
        AllocationEnv(random_problem(0, n=2), measure_every=0)
