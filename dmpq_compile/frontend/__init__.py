"""Hugging Face checkpoints -> graph IR, one small adapter per MoE family."""

from .families import FAMILIES, SUPPORTED, Family
from .hf import FrontendError, load

__all__ = ["FAMILIES", "SUPPORTED", "Family", "FrontendError", "load"]
