"""The ``sensitivity`` pass (:mod:`.base`: the pass, its options and the whole-model method) and
its default layer-local Fisher estimate with the routing-flip probe (:mod:`.local`)."""

from .base import METHODS, SensitivityOptions, SensitivityPass

__all__ = ["METHODS", "SensitivityOptions", "SensitivityPass"]
