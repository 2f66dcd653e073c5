"""Per-family facts needed to lower a Hugging Face MoE checkpoint: key names and config fields.

Each adapter is data, not code: where a family's checkpoint keeps its router, experts and
attention extras, and how its config spells the MoE hyper-parameters. transformers 5.x keeps
experts fused in memory (``mlp.experts.gate_up_proj [E, 2I, H]``, ``down_proj [E, H, I]``) but
``save_pretrained`` writes the original per-expert keys; the frontend accepts both layouts.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Family:
    """How one MoE family is laid out in a checkpoint."""

    name: str
    model_types: tuple[str, ...]
    moe_prefixes: tuple[str, ...]  # module under layers.N holding router + experts, in order of preference
    expert_names: tuple[str, str, str]  # per-expert file names of (gate, up, down)
    qk_norm: str  # "none" | "full" (over the whole projection) | "head" (per head)
    has_shared_expert: bool = False
    always_norm_topk: bool = False  # Mixtral renormalises the top-k weights unconditionally

    def num_experts(self, cfg: Any) -> int:
        for attr in ("num_local_experts", "num_experts"):
            value = getattr(cfg, attr, None)
            if isinstance(value, int) and value > 0:
                return value
        raise ValueError(f"{self.name}: config has no expert count (num_local_experts / num_experts)")

    def norm_topk(self, cfg: Any) -> bool:
        return True if self.always_norm_topk else bool(getattr(cfg, "norm_topk_prob", False))

    def expert_intermediate(self, cfg: Any) -> int:
        return int(getattr(cfg, "moe_intermediate_size", None) or cfg.intermediate_size)

    def is_moe_layer(self, cfg: Any, layer: int) -> bool:
        """Qwen-MoE configs may keep some layers dense (``mlp_only_layers``, ``decoder_sparse_step``)."""
        if layer in (getattr(cfg, "mlp_only_layers", None) or []):
            return False
        step = getattr(cfg, "decoder_sparse_step", 1) or 1
        return (layer + 1) % step == 0


FAMILIES: tuple[Family, ...] = (
    Family("mixtral", ("mixtral",), ("block_sparse_moe", "mlp"), ("w1", "w3", "w2"), "none",
           always_norm_topk=True),
    Family("olmoe", ("olmoe",), ("mlp",), ("gate_proj", "up_proj", "down_proj"), "full"),
    Family("qwen2_moe", ("qwen2_moe",), ("mlp",), ("gate_proj", "up_proj", "down_proj"), "none",
           has_shared_expert=True),
    Family("qwen3_moe", ("qwen3_moe",), ("mlp",), ("gate_proj", "up_proj", "down_proj"), "head"),
)

SUPPORTED = ", ".join(f"{f.name} ({'/'.join(f.model_types)})" for f in FAMILIES)


def family_for(model_type: str) -> Family:
    """The adapter for a config's ``model_type``, or a ValueError naming the supported families."""
    for fam in FAMILIES:
        if model_type in fam.model_types:
            return fam
    raise ValueError(f"model_type {model_type!r} is not a supported MoE family; supported: {SUPPORTED}")
