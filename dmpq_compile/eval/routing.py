"""Expert routing statistics of a transformers MoE model: how often each expert is selected."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
from tqdm.auto import tqdm

if TYPE_CHECKING:  # torch is imported where a model is run, so `dmpq_compile.eval` stays light
    import torch

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LayerRouting:
    """Routing frequencies of one MoE layer.

    Attributes:
        layer: Layer index.
        frequency: Per expert, the fraction of tokens whose top-k includes it (sums to top-k;
            a perfectly balanced router gives ``top_k / n_experts`` to each).
    """

    layer: int
    frequency: tuple[float, ...]

    @property
    def min(self) -> float:
        """Smallest per-expert frequency."""
        return float(np.min(self.frequency))

    @property
    def max(self) -> float:
        """Largest per-expert frequency."""
        return float(np.max(self.frequency))

    @property
    def std(self) -> float:
        """Population standard deviation of the per-expert frequencies."""
        return float(np.std(self.frequency))

    def summary(self) -> dict[str, Any]:
        """JSON-friendly dict: layer, min, max, std and the frequencies rounded to 4 digits."""
        return {"layer": self.layer, "min": round(self.min, 4), "max": round(self.max, 4),
                "std": round(self.std, 4), "frequency": [round(f, 4) for f in self.frequency]}


def _top_k(model: Any) -> int:
    cfg = model.config
    k = getattr(cfg, "num_experts_per_tok", None)
    if k is None:
        raise ValueError(f"{type(model).__name__} config has no num_experts_per_tok: not a supported MoE model")
    return int(k)


def expert_frequencies(model: Any, token_ids: Any, seq_len: int = 256, batch_size: int = 8,
                       max_tokens: int | None = None, progress: bool = False) -> list[LayerRouting]:
    """Measure how often each expert is selected, per layer, over a token stream.

    The stream is cut into non-overlapping windows of ``seq_len`` tokens; the router logits that
    transformers returns with ``output_router_logits=True`` give each token's top-k experts.

    Args:
        model: A transformers MoE causal LM (Mixtral, OLMoE, Qwen-MoE, ...).
        token_ids: 1-D token ids.
        seq_len: Window length.
        batch_size: Windows per forward pass.
        max_tokens: Use at most this many tokens of the stream.
        progress: Show a tqdm progress bar.

    Raises:
        ValueError: The stream is shorter than one window, or the model returns no router logits.
    """
    import torch

    ids = torch.as_tensor(np.asarray(token_ids), dtype=torch.long).flatten()
    if max_tokens is not None:
        ids = ids[:max_tokens]
    n_windows = ids.numel() // seq_len
    if n_windows == 0:
        raise ValueError(f"need at least seq_len={seq_len} tokens to measure routing, got {ids.numel()}")
    windows = ids[: n_windows * seq_len].view(n_windows, seq_len)
    k, device = _top_k(model), next(model.parameters()).device
    counts: list[torch.Tensor] | None = None
    model.eval()
    with torch.inference_mode():
        for start in tqdm(range(0, n_windows, batch_size), desc="routing", disable=not progress):
            out = model(input_ids=windows[start:start + batch_size].to(device), output_router_logits=True,
                        use_cache=False)
            if not getattr(out, "router_logits", None):
                raise ValueError(f"{type(model).__name__} returned no router_logits; it is not a MoE model")
            layer_counts = [_count_selected(r, k) for r in out.router_logits]
            counts = layer_counts if counts is None else [a + b for a, b in zip(counts, layer_counts)]
    n_tokens = n_windows * seq_len
    result = [LayerRouting(i, tuple((c.double() / n_tokens).tolist())) for i, c in enumerate(counts)]
    for r in result:
        log.info("layer %d expert frequency min %.4f max %.4f std %.4f", r.layer, r.min, r.max, r.std)
    return result


def _count_selected(router_logits: torch.Tensor, k: int) -> torch.Tensor:
    """Count, per expert, the tokens whose top-k router logits include it."""
    import torch

    logits = router_logits.reshape(-1, router_logits.shape[-1]).float()
    chosen = logits.topk(k, dim=-1).indices.flatten().cpu()
    return torch.bincount(chosen, minlength=logits.shape[-1])
