"""The ``qat`` pass: quantization-aware fine-tuning at the assigned bits, whole-model or block-wise.

The training machinery is in :mod:`.training`, the two modes in :mod:`.whole` and
:mod:`.blockwise`; this module chooses the mode and reports it.
"""

from __future__ import annotations

import logging

from ...ir.graph import Graph
from ..infra.base import Pass, PassContext, PassResult
from .training import QATOptions, choose_mode, select_uses
from .whole import run_whole

log = logging.getLogger(__name__)


class QATPass(Pass):
    """Quantization-aware fine-tuning of the experts at their assigned bits (see module docstring)."""

    name = "qat"
    requires = ("bits",)
    provides = ()
    needs_calibration = True
    Options = QATOptions
    description = ("quantization-aware fine-tuning (STE) at each expert's bits: KL distillation from FP of the whole "
                   "model, or of each layer's output in turn (mode blockwise / auto)")

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        o = self.options
        uses = select_uses(graph, o, getattr(ctx.backend, "weight_formats", None))
        mode, reason = choose_mode(graph, o.mode)
        log.info("qat: %s mode (%s)", mode, reason)
        if mode == "blockwise":
            from .blockwise import run_blockwise  # it builds on this module's helpers

            result = run_blockwise(graph, ctx, o, uses)
        else:
            result = run_whole(graph, ctx, o, uses)
        return PassResult(result.graph, result.modified, {"mode": mode, "mode_reason": reason, **result.stats})
