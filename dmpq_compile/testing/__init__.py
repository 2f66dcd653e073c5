"""Helpers that build tiny random MoE checkpoints and corpora (tests, demos, shape benchmarks)."""

from .tiny import TINY_FAMILIES, make_tiny_checkpoint, save_tiny_tokenizer, tiny_text, write_tiny_corpus

__all__ = ["TINY_FAMILIES", "make_tiny_checkpoint", "save_tiny_tokenizer", "tiny_text", "write_tiny_corpus"]
