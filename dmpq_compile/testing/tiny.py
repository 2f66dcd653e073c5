"""Build tiny randomly initialised transformers MoE checkpoints with ``save_pretrained``.

Used by tests (frontend parity per family) and by benchmarks that need realistic *shapes* with
random weights. Nothing here downloads anything.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

TINY_FAMILIES = ("mixtral", "olmoe", "qwen2_moe", "qwen3_moe")

_COMMON = {"vocab_size": 96, "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
               "num_key_value_heads": 2, "num_experts_per_tok": 2, "max_position_embeddings": 256,
               "tie_word_embeddings": False}


def _classes(family: str) -> tuple[Any, Any, dict]:
    import transformers as tf

    table = {
        "mixtral": (tf.MixtralConfig, tf.MixtralForCausalLM, {"num_local_experts": 4, "intermediate_size": 64}),
        "olmoe": (tf.OlmoeConfig, tf.OlmoeForCausalLM, {"num_experts": 6, "intermediate_size": 32,
                                                                 "norm_topk_prob": False}),
        "qwen2_moe": (tf.Qwen2MoeConfig, tf.Qwen2MoeForCausalLM,
                      {"num_experts": 4, "moe_intermediate_size": 32, "intermediate_size": 64,
                           "shared_expert_intermediate_size": 48, "norm_topk_prob": False}),
        "qwen3_moe": (tf.Qwen3MoeConfig, tf.Qwen3MoeForCausalLM,
                      {"num_experts": 8, "moe_intermediate_size": 32, "intermediate_size": 64, "norm_topk_prob": True}),
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
        cfg_kwargs.setdefault("eos_token_id", 0)
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
    save_tiny_tokenizer(out, cfg_kwargs["vocab_size"])
    return out


_WORDS = ["the", "expert", "router", "sends", "each", "token", "to", "a", "few", "experts", "and", "the",
          "model", "adds", "their", "weighted", "outputs", "while", "quantization", "keeps", "rare", "experts",
          "small", "and", "frequent", "experts", "precise", "so", "that", "memory", "traffic", "falls", "and",
          "decoding", "runs", "faster", "on", "every", "machine", "we", "measured", "today"]


def tiny_text(n_sentences: int, seed: int = 0) -> str:
    """Deterministic pseudo-English text from a small vocabulary (for tokenizers and corpora in tests)."""
    import random

    rng = random.Random(seed)
    sentences = []
    for _ in range(n_sentences):
        words = [rng.choice(_WORDS) for _ in range(rng.randint(5, 14))]
        sentences.append(" ".join(words).capitalize() + ".")
    return " ".join(sentences)


def write_tiny_corpus(out_dir: str | Path, n_files: int = 12, sentences: int = 40) -> Path:
    """A folder of ``n_files`` text files usable as ``--calib-corpus`` / ``--corpus``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for i in range(n_files):
        (out / f"doc{i:02d}.txt").write_text(tiny_text(sentences, seed=i))
    return out


def save_tiny_tokenizer(out_dir: str | Path, vocab_size: int) -> Path:
    """Train a small BPE tokenizer (``<|endoftext|>`` = id 0) on :func:`tiny_text` and save tokenizer.json."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>", "<unk>"],
                                  limit_alphabet=40, show_progress=False)
    tok.train_from_iterator([tiny_text(200, seed=s) for s in range(5)], trainer)
    if tok.get_vocab_size() > vocab_size:
        raise RuntimeError(f"tiny tokenizer has {tok.get_vocab_size()} tokens > model vocab {vocab_size}")
    path = Path(out_dir) / "tokenizer.json"
    tok.save(str(path))
    return path
