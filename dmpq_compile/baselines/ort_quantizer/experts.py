"""Export-friendly experts: transformers 5's fused experts module replaced by :class:`GatherExperts`.

Every expert runs in a fixed loop over all experts, on the tokens routed to it (``nonzero``),
with its two projections as separate 2-D ``[K, N]`` weights, so ``torch.onnx`` exports one
constant 2-D weight per MatMul (what ``MatMulNBitsQuantizer`` quantizes) and no expert depends
on which ones the tracing input happened to reach.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from .config import BaselineError

log = logging.getLogger(__name__)


class _ExpertWeights(nn.Module):
    """One expert's projections as ``[K, N]`` weights: ``gate_up [H, 2I]`` and ``down [I, H]``."""

    def __init__(self, gate_up: torch.Tensor, down: torch.Tensor) -> None:
        super().__init__()
        self.gate_up = nn.Parameter(gate_up, requires_grad=False)
        self.down = nn.Parameter(down, requires_grad=False)


class GatherExperts(nn.Module):
    """Drop-in replacement for transformers 5's fused experts that exports correctly.

    Same call as the original module: ``(hidden_states [N, H], top_k_index [N, k],
    top_k_weights [N, k]) -> [N, H]``. The loop runs over all experts (static), and only the
    number of tokens per expert depends on the data. Expert ``e``'s weights are the submodule
    ``str(e)``, so parameters are named ``...experts.{e}.gate_up`` / ``.down``.
    """

    def __init__(self, experts: list[_ExpertWeights], act_fn: nn.Module) -> None:
        super().__init__()
        self.num_experts = len(experts)
        for e, weights in enumerate(experts):
            self.add_module(str(e), weights)
        self.act_fn = act_fn

    @classmethod
    def from_fused(cls, module: nn.Module) -> GatherExperts:
        """Split a fused experts module into per-expert transposed weights (copies)."""
        _check_fused_layout(module)
        experts = [_ExpertWeights(module.gate_up_proj[e].detach().t().contiguous(),
                                  module.down_proj[e].detach().t().contiguous())
                   for e in range(module.gate_up_proj.shape[0])]
        return cls(experts, module.act_fn)

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                top_k_weights: torch.Tensor) -> torch.Tensor:
        out = torch.zeros_like(hidden_states)
        for e in range(self.num_experts):
            weights = getattr(self, str(e))
            token, slot = torch.nonzero(top_k_index == e, as_tuple=True)
            x = hidden_states.index_select(0, token)
            gate, up = torch.matmul(x, weights.gate_up).chunk(2, dim=-1)
            y = torch.matmul(self.act_fn(gate) * up, weights.down)
            y = y * top_k_weights[token, slot].unsqueeze(-1).to(y.dtype)
            out = out.index_add(0, token, y.to(out.dtype))
        return out


def _check_fused_layout(module: nn.Module) -> None:
    expected = {"is_transposed": False, "has_bias": False, "has_gate": True, "has_post_expert_norm": False,
                "is_concatenated": True, "_is_expert_parallel": False}
    bad = {k: getattr(module, k) for k, v in expected.items() if getattr(module, k, v) != v}
    if bad:
        raise BaselineError(f"{type(module).__name__} has an experts layout this baseline does not export ({bad}); "
                            f"supported: {expected}")


def _is_fused_experts(module: nn.Module) -> bool:
    gate_up, down = getattr(module, "gate_up_proj", None), getattr(module, "down_proj", None)
    return (isinstance(gate_up, torch.Tensor) and isinstance(down, torch.Tensor) and gate_up.dim() == 3
            and down.dim() == 3 and hasattr(module, "act_fn"))


def make_experts_exportable(model: nn.Module, check_tokens: int = 16, seed: int = 0) -> int:
    """Replace every fused experts module in ``model`` by :class:`GatherExperts`, in place.

    Each replacement is checked against the module it replaces on ``check_tokens`` random
    tokens with random routing (catches a layout this code misreads).

    Returns:
        The number of modules replaced.

    Raises:
        BaselineError: no fused experts module found, an unsupported layout, or a mismatch.
    """
    targets = [(name, m) for name, m in model.named_modules() if _is_fused_experts(m)]
    if not targets:
        raise BaselineError(f"{type(model).__name__} has no fused experts module (gate_up_proj [E, 2I, H], "
                            "down_proj [E, H, I]); this baseline handles transformers 5 MoE models")
    gen = torch.Generator().manual_seed(seed)
    for name, old in targets:
        new = GatherExperts.from_fused(old)
        _check_same_output(name, old, new, check_tokens, gen)
        parent_name, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, attr, new)
    log.info("replaced %d experts modules by GatherExperts", len(targets))
    return len(targets)


def _check_same_output(name: str, old: nn.Module, new: GatherExperts, tokens: int, gen: torch.Generator) -> None:
    n_exp, hidden = old.gate_up_proj.shape[0], old.gate_up_proj.shape[2]
    k = min(2, n_exp)
    h = torch.randn(tokens, hidden, generator=gen, dtype=old.gate_up_proj.dtype)
    index = torch.stack([torch.randperm(n_exp, generator=gen)[:k] for _ in range(tokens)])
    weights = torch.rand(tokens, k, generator=gen, dtype=h.dtype)
    with torch.no_grad():
        want, got = old(h, index, weights), new(h, index, weights)
    err = float((want - got).abs().max())
    scale = max(1.0, float(want.abs().max()))
    if not err <= 1e-4 * scale:
        raise BaselineError(f"{name}: GatherExperts differs from {type(old).__name__} by {err:.3g} (scale "
                            f"{scale:.3g}); its weight layout is not the one this baseline assumes")

