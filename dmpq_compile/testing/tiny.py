"""Build tiny randomly initialised transformers MoE checkpoints with ``save_pretrained``.

Used by tests (frontend parity per family) and by benchmarks that need realistic *shapes* with
random weights. Nothing here downloads anything.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

TINY_FAMILIES = ("mixtral", "olmoe", "qwen2_moe", "qwen3_moe")

_COMMON = dict(vocab_size=96, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, num_experts_per_tok=2, max_position_embeddings=256,
               tie_word_embeddings=False)


def _classes(family: str) -> tuple[Any, Any, dict]:
    import transformers as tf

    table = {
        "mixtral": (tf.MixtralConfig, tf.MixtralForCausalLM, dict(num_local_experts=4, intermediate_size=64)),
        "olmoe": (tf.OlmoeConfig, tf.OlmoeForCausalLM, dict(num_experts=6, intermediate_size=32,
                                                                 norm_topk_prob=False)),
        "qwen2_moe": (tf.Qwen2MoeConfig, tf.Qwen2MoeForCausalLM,
                      dict(num_experts=4, moe_intermediate_size=32, intermediate_size=64,
                           shared_expert_intermediate_size=48, norm_topk_prob=False)),
        "qwen3_moe": (tf.Qwen3MoeConfig, tf.Qwen3MoeForCausalLM,
                      dict(num_experts=8, moe_intermediate_size=32, intermediate_size=64, norm_topk_prob=True)),
    }
    if family not in table:
        raise ValueError(f"unknown tiny family {family!r}; choose from {TINY_FAMILIES}")
    return table[family]


def make_tiny_checkpoint(family: str, out_dir: str | Path, seed: int = 0, **overrides: Any) -> Path:
    """Save a random-initialised ``family`` model to ``out_dir`` and return the path.

    Weights get a larger-than-default init so routing is not degenerate (random routers with
    the default 0.02 std route almost uniformly, which hides routing bugs).
    """
    config_cls, model_cls, extra = _classes(family)
    torch.manual_seed(seed)
    cfg_kwargs = {**_COMMON, **extra, **overrides}
    if family == "olmoe":
        cfg_kwargs.setdefault("eos_token_id", cfg_kwargs["vocab_size"] - 1)
        cfg_kwargs.setdefault("pad_token_id", 0)
    config = config_cls(**cfg_kwargs)
    model = model_cls(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 2:
                p.normal_(0.0, 0.08)
            elif "norm" in name:
                p.uniform_(0.8, 1.2)
            else:
                p.normal_(0.0, 0.02)
    out = Path(out_dir)
    model.save_pretrained(out)
    return out
