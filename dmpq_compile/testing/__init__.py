"""Helpers that build tiny random MoE checkpoints (tests, demos, benchmarks of shapes)."""

from .tiny import TINY_FAMILIES, make_tiny_checkpoint

__all__ = ["TINY_FAMILIES", "make_tiny_checkpoint"]
