"""Passes over the IR and the explicit list of built-ins.

A pass with more than one module is a folder (``allocate/``: the pass, its measurement and the
allocators; ``qat/``; ``sensitivity/``); the infrastructure (pass contract, manager, cache,
budget guard, storage accounting) is in ``infra/``. Third-party passes register through the
entry-point group ``dmpq_compile.passes``.
"""

from ..registry import PASSES
from .allocate.base import AllocatePass
from .cost import CostPass
from .infra.base import Pass, PassContext, PassError, PassResult
from .infra.manager import DumpIR, Instrument, PassManager, Progress, Timing
from .precision import PrecisionPass
from .profile import ProfilePass
from .qat import QATPass
from .quantize import QuantizePass
from .sensitivity import SensitivityPass

BUILTIN_PASSES = (ProfilePass, SensitivityPass, CostPass, PrecisionPass, AllocatePass, QATPass, QuantizePass)
for _cls in BUILTIN_PASSES:
    PASSES.register(_cls)


def make_pass(name: str, **options) -> Pass:
    """Instantiate a registered pass (built-in or plugin) by name with typed options."""
    return PASSES.get(name)(**options)


__all__ = [
    "BUILTIN_PASSES",
    "PASSES",
    "AllocatePass",
    "CostPass",
    "DumpIR",
    "Instrument",
    "Pass",
    "PassContext",
    "PassError",
    "PassManager",
    "PassResult",
    "PrecisionPass",
    "ProfilePass",
    "Progress",
    "QATPass",
    "QuantizePass",
    "SensitivityPass",
    "Timing",
    "make_pass",
]
