"""The ``qat`` pass (:mod:`.base`), its training machinery (:mod:`.training`) and its two modes:
whole-model distillation (:mod:`.whole`) and one decoder layer at a time (:mod:`.blockwise`)."""

from .base import QATPass
from .blockwise import run_blockwise
from .training import (
    BYTES_PER_PARAM,
    LOSSES,
    MODES,
    BakeFidelity,
    MemoryEstimate,
    QATOptions,
    batch_stream,
    check_fits,
    choose_mode,
    collect_trainables,
    lr_factor,
    planned_steps,
    select_uses,
    split_calibration,
    whole_model_estimate,
)
from .whole import run_whole

__all__ = [
    "BYTES_PER_PARAM", "LOSSES", "MODES", "BakeFidelity", "MemoryEstimate", "QATOptions", "QATPass", "batch_stream",
    "check_fits", "choose_mode", "collect_trainables", "lr_factor", "planned_steps", "run_blockwise", "run_whole",
    "select_uses", "split_calibration", "whole_model_estimate",
]
