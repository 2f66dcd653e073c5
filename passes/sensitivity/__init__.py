"""The ``sensitivity`` pass (:mod:`.base`: the pass, its options and the whole-model method) and
its default layer-local Fisher estimate with the routing-flip probe (:mod:`.local`) and the
pricing of rare experts, those measured on too few routed tokens (:mod:`.rare_experts`)."""

from .base import METHODS, SensitivityOptions, SensitivityPass

__all__ = ["METHODS", "SensitivityOptions", "SensitivityPass"]
