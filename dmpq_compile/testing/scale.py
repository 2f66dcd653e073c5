"""Random checkpoints at real widths, written shard by shard without building the model.

The parameter names and shapes come from the transformers model class instantiated on the
meta device (no memory); each tensor is then drawn, written into the current shard and
dropped, so building a 93 GB Mixtral-8x7B-shaped checkpoint holds one shard (``shard_bytes``)
in memory. Weights are N(0, 1/fan_in) (norms near 1) so activations stay in range at any width.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from .tiny import _classes, save_tiny_tokenizer

SHAPES: dict[str, tuple[str, dict[str, Any]]] = {  # name -> (family, config overrides)
    "mixtral-8x7b": ("mixtral", {"hidden_size": 4096, "intermediate_size": 14336, "num_local_experts": 8,
                                 "num_experts_per_tok": 2, "num_attention_heads": 32, "num_key_value_heads": 8,
                                 "vocab_size": 32000, "max_position_embeddings": 4096}),
    "olmoe-1b-7b": ("olmoe", {"hidden_size": 2048, "intermediate_size": 1024, "num_experts": 64,
                              "num_experts_per_tok": 8, "num_attention_heads": 16, "num_key_value_heads": 16,
                              "num_hidden_layers": 16, "vocab_size": 50304, "max_position_embeddings": 4096}),
    # as the hub's Qwen3MoeForCausalLM config of Qwen3-30B-A3B says (about 61 GB in bf16)
    "qwen3-30b-a3b": ("qwen3_moe", {"hidden_size": 2048, "intermediate_size": 6144, "moe_intermediate_size": 768,
                                    "num_experts": 128, "num_experts_per_tok": 8, "num_attention_heads": 32,
                                    "num_key_value_heads": 4, "head_dim": 128, "num_hidden_layers": 48,
                                    "vocab_size": 151936, "max_position_embeddings": 40960, "rope_theta": 1e6,
                                    "rms_norm_eps": 1e-6, "norm_topk_prob": True, "decoder_sparse_step": 1,
                                    "mlp_only_layers": [], "tie_word_embeddings": False}),
}


def write_random_checkpoint(family: str, out_dir: str | Path, seed: int = 0, shard_bytes: int = 2 * 2**30,
                            dtype: torch.dtype = torch.bfloat16, **overrides: Any) -> Path:
    """Write a random ``family`` checkpoint (config, sharded safetensors + index, tokenizer)."""
    config_cls, model_cls, extra = _classes(family)
    config = config_cls(**{**extra, **overrides})
    with torch.device("meta"):
        shapes = {name: tuple(p.shape) for name, p in model_cls(config).named_parameters()}
    if getattr(config, "tie_word_embeddings", False):
        shapes.pop("lm_head.weight", None)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(seed)
    shard, size, files, weight_map = {}, 0, [], {}

    def flush() -> None:
        nonlocal shard, size
        name = f"model-{len(files) + 1:05d}.safetensors"
        save_file(shard, str(out / name), metadata={"format": "pt"})
        files.append(name)
        weight_map.update({k: name for k in shard})
        shard, size = {}, 0

    for name, shape in shapes.items():
        t = torch.empty(shape, dtype=torch.float32)
        if len(shape) >= 2:
            t.normal_(0.0, shape[-1] ** -0.5, generator=gen)
        elif "norm" in name:
            t.uniform_(0.8, 1.2, generator=gen)
        else:
            t.normal_(0.0, 0.02, generator=gen)
        shard[name] = t.to(dtype)
        size += shard[name].numel() * shard[name].element_size()
        if size >= shard_bytes:
            flush()
    if shard:
        flush()
    total = sum((out / f).stat().st_size for f in files)
    (out / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1))
    config.torch_dtype = dtype
    config.save_pretrained(out)
    save_tiny_tokenizer(out, min(int(config.vocab_size), 400))
    return out
