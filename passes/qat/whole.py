"""Whole-model QAT: the fake-quantized student distils the frozen full-precision teacher's logits.

Memory: about ``BYTES_PER_PARAM`` bytes per parameter (:func:`~.training.whole_model_estimate`);
the ``qat`` pass runs it when that fits (``mode="auto"``) or when asked (``mode="whole"``).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

import torch

from ...eval.metrics import mean_kl, mean_nll
from ...ir.graph import Graph
from ...ir.interpreter import Interpreter, RunOptions
from ..infra.base import PassContext, PassResult
from .training import (
    BakeFidelity,
    Eval,
    LoopResult,
    QATOptions,
    Trainables,
    Use,
    collect_trainables,
    evaluate,
    split_calibration,
    train,
    write_back,
)

log = logging.getLogger(__name__)


@dataclass
class Models:
    """Whole-model objective: the frozen FP teacher and the fake-quantized student (reference interpreters)."""

    teacher: Interpreter
    student: Interpreter
    trainables: Trainables
    train_ids: torch.Tensor
    eval_ids: torch.Tensor
    o: QATOptions

    @property
    def label(self) -> str:
        return f"heldout_{self.o.loss}"

    def teacher_logits(self, ids: torch.Tensor) -> torch.Tensor:
        """Full-precision logits ``[B, T, V]`` of the original weights (no autograd)."""
        with torch.no_grad():
            return self.teacher.run(ids, RunOptions(quantize=False))["lm_head"]

    def student_logits(self, ids: torch.Tensor) -> torch.Tensor:
        """Logits ``[B, T, V]`` with the trainable weights (fake-quantized where quantized), differentiable."""
        opts = RunOptions(quantize=True, weight_override=self.trainables.overrides())
        return self.student.run(ids, opts)["lm_head"]

    def loss(self, rows: torch.Tensor) -> torch.Tensor:
        ids = self.train_ids[rows]
        logits = self.student_logits(ids)
        if self.o.loss == "nll":
            return mean_nll(logits, ids)
        return mean_kl(self.teacher_logits(ids), logits)

    def heldout(self) -> Eval:
        return evaluate(self.student_logits, self.teacher_logits, self.eval_ids, self.o.batch_size)

    def metric(self, e: Eval) -> float:
        """KL for ``kl`` training, NLL for ``nll``."""
        return e.kl if self.o.loss == "kl" else e.nll


def run_whole(graph: Graph, ctx: PassContext, o: QATOptions, uses: list[Use]) -> PassResult:
    """Whole-model QAT (see the module docstring)."""
    tr = collect_trainables(graph, o, uses)
    train_ids, eval_ids = split_calibration(ctx.calibration, o.eval_fraction)
    formats = getattr(ctx.backend, "weight_formats", None)
    models = Models(Interpreter(graph.copy(), quantize=False), Interpreter(graph, quantize=True, formats=formats), tr, train_ids,
                     eval_ids, o)
    before = models.heldout()
    fp_nll = evaluate(models.teacher_logits, models.teacher_logits, eval_ids, o.batch_size).nll
    log.info("qat: %d tensors train (%d fake-quantized nodes); held-out KL %.5f before",
             len(tr.params), len(tr.quantized_nodes()), before.kl)
    t0 = time.perf_counter()
    loop = train(models, o, len(train_ids), train_ids.shape[1], before, ctx)
    seconds = time.perf_counter() - t0
    bake: dict[str, Any] = {}
    if loop.best_state is not None:
        tr.restore(loop.best_state)
        fidelity = BakeFidelity() if o.learnable_scales else None
        write_back(graph, tr, fidelity)
        bake = fidelity.stats() if fidelity else {}
    after = evaluate(Interpreter(graph, quantize=True, formats=formats), models.teacher_logits, eval_ids,
                     o.batch_size)
    stats = {**summary(o, loop, tr, before, after, fp_nll, seconds, train_ids, eval_ids), **bake}
    log.info("qat: %d steps, %d tokens, %.1fs (%s); held-out KL %.5f -> %.5f", loop.steps, loop.tokens,
             seconds, loop.stop_reason, before.kl, after.kl)
    return PassResult(graph, modified=loop.best_state is not None, stats=stats)


def summary(o: QATOptions, loop: LoopResult, tr: Trainables, before: Eval, after: Eval, fp_nll: float,
             seconds: float, train_ids: torch.Tensor, eval_ids: torch.Tensor) -> dict[str, Any]:
    """The pass's stats dictionary (see the module docstring)."""
    return {
        "steps": loop.steps, "tokens": loop.tokens, "seconds": round(seconds, 3), "stop_reason": loop.stop_reason,
        "loss": o.loss, "kl_before": before.kl, "kl_after": after.kl, "nll_before": before.nll,
        "nll_after": after.nll, "nll_fp": fp_nll, "best_step": loop.best_step,
        "train_loss_first": loop.losses[0] if loop.losses else None,
        "train_loss_last": loop.losses[-1] if loop.losses else None,
        "trained_tensors": len(tr.params), "fake_quantized_nodes": len(tr.quantized_nodes()),
        "train_sequences": len(train_ids), "eval_sequences": len(eval_ids),
    }


# -- the training loop (shared by both modes) ----------------------------------------------------
