"""Seeded synthetic allocation problems at real model shapes (for scale tests and benchmarks).

The full-size models cannot be profiled on a small machine, so the allocators' behaviour at
OLMoE-1B-7B's shape (16 layers x 64 experts = 1024 experts, top-8) is studied on problems whose
features are *drawn* from a distribution fitted to what the sensitivity pass measured on the
bundled samples (``benchmarks/results/ablation-allocators-*.json`` records the fit inputs):

* routing frequency: per layer ``top_k * Dirichlet(freq_alpha)`` (clipped to 1), so each layer's
  frequencies sum to ``top_k`` like the profile pass's;
* single-expert KL at 2 bits: ``log kl2 = kl_a + kl_b * log(freq) + N(0, kl_sigma)``
  (frequent experts are hit by more tokens, so quantizing them costs more);
* at 4 and 8 bits: ``log(kl_b / kl2) ~ N(mu_b, sigma_b)`` (:attr:`SensitivityModel.log_ratio`);
  16 bits costs 0;
* gradvar features: independent log-normal draws (they carry no signal here, by construction).

Costs are one row per bit-width, the same for every expert (all experts of these models share
one shape); pass a measured row (e.g. the ort-cpu table at the model's real shape) or take the
default, which is *not* measured: bytes of packed codes + fp32 scale and zero point per group
of 64, and decode time proportional to bytes.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from ...ir.graph import expert_node
from .problem import AllocationProblem, Budget, ExpertCost, ExpertInfo, ObjectiveWeights

SYNTHETIC_BITS = (2, 4, 8, 16)
DEFAULT_BUDGET = Budget("bits", 3.5)
DEFAULT_WEIGHTS = ObjectiveWeights()


@dataclass(frozen=True)
class SensitivityModel:
    """Parameters of the draw (module docstring).

    The defaults are fitted to the KL sensitivities the sensitivity pass measured on
    samples/olmoe-tiny (128 experts, top-4): Dirichlet alpha by the method of moments on
    ``freq / top_k``; least squares of ``log kl2`` on ``log freq``; mean and standard deviation of
    ``log(kl_b / kl2)`` (at 8 bits over the 117 of 128 experts with a positive KL).
    """

    freq_alpha: float = 6.6
    kl_a: float = -6.3
    kl_b: float = 1.7
    kl_sigma: float = 1.1
    log_ratio: tuple[tuple[int, float, float], ...] = ((4, -2.5, 1.0), (8, -8.2, 1.9))


def bytes_proxy_cost(n_params: int, bits: int, group: int = 64, ms_per_mb: float = 0.1) -> ExpertCost:
    """An unmeasured cost row: packed codes + fp32 scale and zero point per group; time ~ bytes."""
    nbytes = n_params * 4 if bits == 16 else n_params * bits // 8 + (n_params // group) * 5
    ms = ms_per_mb * nbytes / 2**20
    return ExpertCost(decode_ms=ms, prefill_ms=ms, bytes=int(nbytes), energy_mj=nbytes * 162.5e-9)


def draw_sensitivities(freq: np.ndarray, bits: tuple[int, ...], rng: np.random.Generator,
                       model: SensitivityModel = SensitivityModel()) -> list[dict[int, float]]:
    """Single-expert KL per bit-width for experts routed with frequencies ``freq`` (module docstring).

    Returns:
        One ``{bits: kl}`` per expert, 0 at 16 bits.

    Raises:
        ValueError: For bits outside :data:`SYNTHETIC_BITS`.
    """
    if not set(bits) <= set(SYNTHETIC_BITS):
        raise ValueError(f"synthetic sensitivities exist for bits {SYNTHETIC_BITS} only, got {bits}")
    n = len(freq)
    kl2 = np.exp(model.kl_a + model.kl_b * np.log(np.maximum(freq, 1e-6)) + rng.normal(0.0, model.kl_sigma, n))
    kl = {2: kl2, 16: np.zeros(n)}
    kl.update({b: kl2 * np.exp(rng.normal(mu, sigma, n)) for b, mu, sigma in model.log_ratio})
    return [{b: float(kl[b][e]) for b in bits} for e in range(n)]


def synthetic_problem(n_layers: int = 16, n_experts: int = 64, top_k: int = 8, hidden: int = 2048,
                      intermediate: int = 1024, bits: tuple[int, ...] = (2, 4, 8, 16),
                      budget: Budget = DEFAULT_BUDGET, weights: ObjectiveWeights = DEFAULT_WEIGHTS,
                      seed: int = 0, model: SensitivityModel = SensitivityModel(),
                      cost: Mapping[int, ExpertCost] | None = None) -> AllocationProblem:
    """A seeded problem of ``n_layers x n_experts`` experts of shape ``(hidden, intermediate)``.

    Args:
        n_layers, n_experts, top_k, hidden, intermediate: The model shape (default OLMoE-1B-7B).
        bits: Bit-width choices.
        budget: The budget.
        weights: Objective weights.
        seed: Seeds every draw; same seed, same problem.
        model: The distribution of features (module docstring).
        cost: One :class:`ExpertCost` per bit-width for every expert; default
            :func:`bytes_proxy_cost` (not measured).

    Returns:
        The problem; keys are ``L{layer}.E{expert}``.
    """
    if min(n_layers, n_experts, top_k) < 1 or top_k > n_experts:
        raise ValueError(f"need n_layers, n_experts >= 1 and 1 <= top_k <= n_experts, got {n_layers}, "
                         f"{n_experts}, {top_k}")
    rng = np.random.default_rng(seed)
    n_params = 3 * hidden * intermediate
    rows = dict(cost) if cost is not None else {b: bytes_proxy_cost(n_params, b) for b in bits}
    experts = []
    for layer in range(n_layers):
        freq = np.minimum(top_k * rng.dirichlet(np.full(n_experts, model.freq_alpha)), 1.0)  # [E]
        kl = draw_sensitivities(freq, bits, rng, model)
        rgc, var = rng.lognormal(0.0, 1.0, n_experts), rng.lognormal(0.0, 1.0, n_experts)
        for e in range(n_experts):
            sens = kl[e]
            experts.append(ExpertInfo(
                key=expert_node(layer, e), layer=layer, expert=e, n_params=n_params, freq=float(freq[e]),
                mass=float(freq[e]) / top_k, sensitivity=sens, kl=sens, router_grad_change=float(rgc[e]),
                neuron_variance=float(var[e]), cost={b: rows[b] for b in bits}))
    return AllocationProblem(tuple(experts), bits, budget, weights)


def _proxy_weight_bytes(n: int, k: int, bits: int, group_size: int) -> int:
    """Stored bytes of a ``K -> N`` weight (not measured): packed codes + fp16 scale and packed zero point
    per group of ``group_size``, or fp32 at 16 bits."""
    if bits == 16:
        return 4 * n * k
    groups = n * -(-k // group_size)
    return n * k * bits // 8 + 2 * groups + -(-groups * bits // 8)


def stored_bits_problem(n_layers: int = 16, n_experts: int = 64, top_k: int = 8, hidden: int = 2048,
                        intermediate: int = 1024, q_dim: int = 2048, kv_dim: int = 2048, vocab: int = 50304,
                        attn_items: int = 1, bits: tuple[int, ...] = (2, 4, 8, 16), budget_bits: float = 4.0,
                        seed: int = 0, weight_bytes=None, group_size: int = 64,
                        embedding_bits: tuple[int, ...] = (4, 8, 16)) -> AllocationProblem:
    """A seeded whole-model problem under a stored-bits budget, non-expert items included (as with
    ``--nonexpert-bits auto``): the routed experts of :func:`synthetic_problem`'s shape with their stored
    bytes, plus per layer ``attn_items`` attention items (1: q, k, v and o together; 2: q/k/v and o), an
    embedding table (widths ``embedding_bits``: a smaller column means the next one it has) and an
    ``lm_head``. Defaults: OLMoE-1B-7B (1024 experts + 18 items); Qwen3-30B-A3B is ``n_layers=48,
    n_experts=128, intermediate=768, q_dim=4096, kv_dim=512, vocab=151936, attn_items=2``.

    Args:
        weight_bytes: ``(n, k, bits, group_size) -> bytes`` of one linear weight, e.g. a backend's
            ``weight_bytes``; default an unmeasured proxy (:func:`_proxy_weight_bytes`).
        budget_bits: The stored bits per weight of the whole model.

    Non-expert sensitivities are drawn like an always-routed expert's (``freq = 1``), times 4.
    """
    wb = weight_bytes or _proxy_weight_bytes
    rng = np.random.default_rng(seed)
    base = synthetic_problem(n_layers, n_experts, top_k, hidden, intermediate, bits, DEFAULT_BUDGET,
                             DEFAULT_WEIGHTS, seed)
    expert_bytes = {b: 2 * wb(intermediate, hidden, b, group_size) + wb(hidden, intermediate, b, group_size)
                    for b in bits}
    items = [ExpertInfo(key=e.key, layer=e.layer, expert=e.expert, n_params=e.n_params, freq=e.freq, mass=e.mass,
                        sensitivity=e.sensitivity, kl=e.kl, stored_bytes=expert_bytes) for e in base.experts]
    mats = {1: [(q_dim, hidden), (kv_dim, hidden), (kv_dim, hidden), (hidden, q_dim)],
            2: [(q_dim, hidden), (kv_dim, hidden), (kv_dim, hidden)]}
    if attn_items not in (1, 2):
        raise ValueError(f"attn_items must be 1 or 2, got {attn_items}")
    parts = [("attn", mats[1])] if attn_items == 1 else [("qkv", mats[2]), ("o", [(hidden, q_dim)])]

    def item(key: str, layer: int, shapes: list[tuple[int, int]], widths: tuple[int, ...]) -> ExpertInfo:
        def col(b: int) -> int:  # the smallest width >= b the item has
            return min((w for w in widths if w >= b), default=max(widths))
        sens = draw_sensitivities(np.ones(1), bits, rng)[0]
        return ExpertInfo(key=key, layer=layer, expert=-1, n_params=sum(n * k for n, k in shapes), freq=1.0,
                          mass=1.0, sensitivity={b: 4 * sens[col(b)] for b in bits},
                          stored_bytes={b: sum(wb(n, k, col(b), group_size) for n, k in shapes) for b in bits})

    for layer in range(n_layers):
        items += [item(f"L{layer}.{name}", layer, shapes, bits) for name, shapes in parts]
    items.append(item("embed", -1, [(vocab, hidden)], embedding_bits))
    items.append(item("lm_head", -1, [(vocab, hidden)], bits))
    params = sum(e.n_params for e in items)
    fixed_bytes = 4 * n_layers * (n_experts * hidden + 2 * hidden) + 4 * hidden  # routers and norms, fp32
    params += fixed_bytes // 4
    return AllocationProblem(tuple(items), bits, Budget("stored-bits", budget_bits, fixed=8 * fixed_bytes / params,
                                                        params=params))
