"""Block-wise QAT: the ``qat`` pass's ``mode="blockwise"``, one decoder layer at a time.

For each decoder layer ``l``, in order:

* **Teacher target**: the full-precision model's output of layer ``l`` on the calibration
  tokens (the FP residual stream, advanced one layer with ``quantize=False`` on the original
  weights, before anything of layer ``l`` is written back).
* **Student**: layer ``l`` with the trainable weights whole-model QAT would select
  (:func:`~dmpq_compile.passes.qat.select_uses`) restricted to that layer: quantized experts
  through :func:`~dmpq_compile.quant.fake_quantize_ste` at their bits and group size (with
  learnable scale multipliers when ``learnable_scales``), 16-bit experts, router, attention and
  norms as the options say. The layer's other weights are read once for all its steps. The
  embedding, final norm and LM head belong to no layer and never train in this mode.
* **Student input: the already-quantized prefix's hidden states**, i.e. the outputs of layers
  ``0..l-1`` as written back (RTN of the stored, trained weights: what the ``quantize`` pass and
  the artifact compute). Not the FP prefix's: the deployed layer sees the quantized prefix's
  hidden states, so training on them matches train and test inputs, and mapping them onto the
  FP trajectory lets layer ``l`` correct error accumulated upstream instead of compounding it.
  The cost is one forward of each layer after its write-back.
* **Loss**: relative MSE, ``mean((student - teacher)^2) / mean(teacher^2)``, the denominator
  over the training sequences (the held-out error uses the held-out sequences'), so errors are
  comparable across layers. The layer output includes the residual stream.
* **Never worse**: the held-out relative error at step 0 (the untrained RTN layer), every
  ``eval_every`` steps and at the end; the best weights are written back with
  :func:`~dmpq_compile.passes.qat.write_back` (latent weights, or baked with learnable scales;
  ``group_size`` annotated), nothing when step 0 wins. ``error_after`` is re-measured on the
  written-back store.

Budgets: ``steps`` and ``max_tokens`` apply to each layer (a layer's step costs about ``1/L`` of a
whole-model step); ``time_budget_s`` bounds the training loops of all layers together (as in whole
mode, the loop and its evaluations count, the forwards between layers do not): each layer's loop
gets the budget its predecessors' loops left, divided by the layers left: the forwards do not eat
the later layers' training time, and a layer that stops early passes its time on.

Memory, bounded by one layer plus one layer boundary's activations, not by the model: the
layer's trainable tensors in fp32 with gradient and two Adam moments (16 bytes per trained
parameter; ``peak_trainable_params``), its frozen weights, one batch's activations through it,
and the residual streams for all S calibration sequences of T tokens at one boundary: FP (input,
then target) and quantized prefix, ``S x T x H x 4`` bytes each (``x 2``), plus the untrained
RTN prefix on the held-out sequences (stats ``activation_bytes``). An earlier layer's fp32
copies and optimizer state are gone once it is written back, and with ``ctx.work_dir`` its
written-back weights are spilled there (``WeightStore.spill``) rather than kept in memory. Time: per layer one FP forward,
one untrained forward of the held-out sequences, the training steps and one forward of the
written-back layer, so linear in depth.

Whole-model metric: ``kl_before`` / ``nll_before`` (untrained RTN model) and ``kl_after`` /
``nll_after`` (written-back model) against the FP model on the held-out sequences, the metric
whole mode reports, from the three streams' last-layer outputs through the final norm and LM
head (no extra pass over the weights). ``layers`` lists per layer ``error_before`` /
``error_after`` (held-out relative error), steps, tokens, ``best_step``, ``stop_reason``,
trained tensors and parameters, and seconds.
"""

from __future__ import annotations

import logging
import math
import os
import tempfile
import time
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from tqdm.auto import tqdm

from ...ir.graph import Graph
from ...ir.interpreter import Interpreter, RunOptions
from ...ir.stream import embed, head_chunks, layer_nodes, run_layer
from ..infra.base import PassContext, PassResult
from .training import (
    BakeFidelity,
    Eval,
    QATOptions,
    Trainables,
    Use,
    accumulate_eval,
    collect_trainables,
    split_calibration,
    train,
    write_back,
)

log = logging.getLogger(__name__)


@dataclass
class _LayerObjective:
    """Relative MSE of layer ``layer`` (trainable weights fake-quantized) to the FP layer output.

    Rows ``[0, n_train)`` of ``inputs`` / ``targets`` ``[S, T, H]`` train, the rest are held out.
    """

    interp: Interpreter
    layer: int
    trainables: Trainables
    frozen: dict[str, dict[str, torch.Tensor]]
    inputs: torch.Tensor  # [S, T, H] the quantized prefix's hidden states entering the layer
    targets: torch.Tensor  # [S, T, H] the FP layer output
    n_train: int
    batch_size: int
    label: str = "heldout_err"
    scale: float = field(init=False)

    def __post_init__(self) -> None:
        self.scale = max(float(self.targets[:self.n_train].pow(2).mean()), 1e-30)

    def output(self, rows: torch.Tensor) -> torch.Tensor:
        """The student layer's output ``[b, T, H]`` for the sequences ``rows`` (differentiable)."""
        trained = self.trainables.overrides()
        over = {n: {**self.frozen.get(n, {}), **trained.get(n, {})} for n in {*self.frozen, *trained}}
        return run_layer(self.interp, self.layer, self.inputs[rows], RunOptions(quantize=True, weight_override=over))

    def loss(self, rows: torch.Tensor) -> torch.Tensor:
        return (self.output(rows) - self.targets[rows]).pow(2).mean() / self.scale

    def heldout(self) -> float:
        err = ref = 0.0
        with torch.no_grad():
            for rows in torch.arange(self.n_train, len(self.targets)).split(self.batch_size):
                target = self.targets[rows]
                err += float((self.output(rows) - target).pow(2).sum())
                ref += float(target.pow(2).sum())
        return err / max(ref, 1e-30)

    def metric(self, e: float) -> float:
        return e


def run_blockwise(graph: Graph, ctx: PassContext, o: QATOptions, uses: list[Use]) -> PassResult:
    """Block-wise QAT of ``graph`` in place (see the module docstring); ``uses``: what trains."""
    train_ids, eval_ids = split_calibration(ctx.calibration, o.eval_fraction)
    n_train, held = len(train_ids), slice(len(train_ids), None)
    interp = Interpreter(graph, quantize=True, formats=getattr(ctx.backend, "weight_formats", None))
    layers = layer_nodes(graph)
    outside = sorted({u.node_id for u in uses} - set().union(*layers))
    if outside:
        log.info("qat: block-wise mode leaves %s untrained (they belong to no decoder layer)", outside)
    with torch.no_grad():
        fp = embed(interp, torch.cat([train_ids, eval_ids]), RunOptions(quantize=False))  # [S, T, H]
    q, rtn = fp.clone(), fp[held].clone()
    activation_bytes = (fp.numel() + q.numel() + rtn.numel()) * fp.element_size()
    largest = _largest_layer(graph, uses, layers)
    log.info("qat: block-wise over %d layers; largest layer trains %d parameters (~%.2f GiB with gradients and "
             "Adam moments); residual streams %.1f MiB (%d x %d tokens x %d hidden x 4 B x 2, + %d held-out)",
             len(layers), largest, 16 * largest / 2**30, activation_bytes / 2**20, *fp.shape, len(rtn))
    t0 = time.perf_counter()
    fidelity = BakeFidelity() if o.learnable_scales else None
    records: list[dict[str, Any]] = []
    bar = tqdm(total=len(layers), desc="qat (blockwise)", unit="layer", disable=not ctx.progress, leave=False)
    for layer, nodes in enumerate(layers):
        t_layer = time.perf_counter()
        _advance(interp, layer, fp, RunOptions(quantize=False), o.batch_size)  # now layer's FP output: the target
        _advance(interp, layer, rtn, RunOptions(quantize=True), o.batch_size)  # untrained, before write-back
        layer_uses = [u for u in uses if u.node_id in nodes]
        rec = _train_layer(graph, interp, layer, nodes, layer_uses, q, fp, n_train,
                           _layer_options(o, records, len(layers) - layer), ctx, fidelity)
        _advance(interp, layer, q, RunOptions(quantize=True), o.batch_size)  # through the written-back layer
        rec["error_after"] = float((q[held] - fp[held]).pow(2).sum() / fp[held].pow(2).sum().clamp_min(1e-30))
        rec.setdefault("error_before", rec["error_after"])
        rec["seconds"] = round(time.perf_counter() - t_layer, 3)
        records.append(rec)
        log.info("qat: layer %d/%d: held-out layer error %.4g -> %.4g (%d steps, %s)", layer + 1, len(layers),
                 rec["error_before"], rec["error_after"], rec["steps"], rec["stop_reason"])
        bar.update(1)
        bar.set_postfix(layer_err=f"{rec['error_before']:.3g}->{rec['error_after']:.3g}")
    bar.close()
    with torch.no_grad():
        before, after = _head_eval(interp, rtn, fp[held], eval_ids), _head_eval(interp, q[held], fp[held], eval_ids)
        fp_nll = _head_eval(interp, fp[held], fp[held], eval_ids).nll
    seconds = time.perf_counter() - t0
    stats = _summary(records, before, after, fp_nll, seconds, activation_bytes, train_ids, eval_ids)
    if fidelity is not None and fidelity.tensors:
        stats.update(fidelity.stats())
    log.info("qat: block-wise, %d layers, %d steps, %.1fs; held-out KL %.5f -> %.5f", len(layers), stats["steps"],
             seconds, before.kl, after.kl)
    return PassResult(graph, modified=stats["written_layers"] > 0, stats=stats)


def _train_layer(graph: Graph, interp: Interpreter, layer: int, nodes: set[str], uses: list[Use], inputs: torch.Tensor,
                 targets: torch.Tensor, n_train: int, o: QATOptions, ctx: PassContext,
                 fidelity: BakeFidelity | None) -> dict[str, Any]:
    """Train the ``uses`` of layer ``layer`` (node ids ``nodes``) on ``inputs -> targets``; write the best back.

    Returns:
        The layer's stats record (``error_after`` is added by the caller).
    """
    rec: dict[str, Any] = {"layer": layer, "trained_tensors": 0, "trainable_params": 0, "steps": 0, "tokens": 0,
                           "best_step": 0, "stop_reason": "nothing_to_train", "written": False,
                           "train_seconds": 0.0}
    if not uses:
        return rec
    tr = collect_trainables(graph, o, uses)
    obj = _LayerObjective(interp, layer, tr, _frozen_weights(interp, nodes, tr), inputs, targets, n_train, o.batch_size)
    before = obj.heldout()
    t0 = time.perf_counter()
    loop = train(obj, o, n_train, inputs.shape[1], before, ctx, desc=f"qat L{layer}")
    rec["train_seconds"] = round(time.perf_counter() - t0, 3)
    if loop.best_state is not None:
        tr.restore(loop.best_state)
        write_back(graph, tr, fidelity)
        if ctx.work_dir is not None:  # the trained weights go to disk, as the quantize pass's codes do
            fd, path = tempfile.mkstemp(prefix=f"qat-L{layer}-", suffix=".safetensors", dir=ctx.work_dir)
            os.close(fd)
            graph.weights.spill(sorted(tr.params), path)
    rec.update(trained_tensors=len(tr.params), fake_quantized_nodes=len(tr.quantized_nodes()),
               trainable_params=sum(p.numel() for p in (*tr.params.values(), *tr.scales.values())),
               steps=loop.steps, tokens=loop.tokens, best_step=loop.best_step, stop_reason=loop.stop_reason,
               written=loop.best_state is not None, error_before=before, error_best=loop.best,
               train_loss_first=loop.losses[0] if loop.losses else None,
               train_loss_last=loop.losses[-1] if loop.losses else None)
    return rec


def _frozen_weights(interp: Interpreter, nodes: set[str], tr: Trainables) -> dict[str, dict[str, torch.Tensor]]:
    """The weights of the layer's ``nodes`` that do not train, as the interpreter reads them, read once
    for all the layer's steps (a model over the interpreter's cache bound would read them from the
    store at every step)."""
    trained = {(u.node_id, u.role) for u in tr.uses}
    out = {}
    for node_id in nodes:
        roles = [r for r in interp.graph.node(node_id).params if (node_id, r) not in trained]
        if roles:
            w = interp.weights(node_id, RunOptions(quantize=True))
            out[node_id] = {r: w[r] for r in roles}
    return out


def _advance(interp: Interpreter, layer: int, h: torch.Tensor, opts: RunOptions, chunk: int) -> None:
    """Replace the residual stream ``h`` ``[S, T, H]`` in place by layer ``layer``'s output, ``chunk``
    sequences at a time (sequences are independent), without autograd."""
    with torch.no_grad():
        for start in range(0, len(h), chunk):
            sl = slice(start, start + chunk)
            h[sl] = run_layer(interp, layer, h[sl], opts)


def _head_eval(interp: Interpreter, h: torch.Tensor, h_fp: torch.Tensor, ids: torch.Tensor) -> Eval:
    """Held-out KL / NLL of the model whose last layer outputs ``h``, against the FP model's ``h_fp``."""
    opts = RunOptions(quantize=False)  # final norm and LM head are never quantized
    pairs = zip(head_chunks(interp, h, opts), head_chunks(interp, h_fp, opts))
    return accumulate_eval(((ids[sl], logits, teacher) for (sl, logits), (_, teacher) in pairs), len(ids))


def _layer_options(o: QATOptions, records: list[dict[str, Any]], layers_left: int) -> QATOptions:
    """``o`` with the layer's share of ``time_budget_s``: the training time the earlier layers'
    loops (``records``) left, divided by the layers left."""
    if o.time_budget_s is None:
        return o
    left = o.time_budget_s - sum(r["train_seconds"] for r in records)
    return replace(o, time_budget_s=max(left / layers_left, 1e-9))


def _largest_layer(graph: Graph, uses: list[Use], layers: list[set[str]]) -> int:
    """Trainable parameters of the layer with the most (without reading any tensor)."""
    per_layer = [{u.key for u in uses if u.node_id in nodes} for nodes in layers]
    return max((sum(math.prod(graph.weights.shape(k)) for k in keys) for keys in per_layer), default=0)


def _summary(records: list[dict[str, Any]], before: Eval, after: Eval, fp_nll: float, seconds: float,
             activation_bytes: int, train_ids: torch.Tensor, eval_ids: torch.Tensor) -> dict[str, Any]:
    """The pass's stats in block-wise mode (see the module docstring)."""
    return {
        "steps": sum(r["steps"] for r in records), "tokens": sum(r["tokens"] for r in records),
        "seconds": round(seconds, 3), "stop_reason": ",".join(sorted({r["stop_reason"] for r in records})),
        "loss": "layer_rel_mse", "kl_before": before.kl, "kl_after": after.kl, "nll_before": before.nll,
        "nll_after": after.nll, "nll_fp": fp_nll,
        "trained_tensors": sum(r["trained_tensors"] for r in records),
        "fake_quantized_nodes": sum(r.get("fake_quantized_nodes", 0) for r in records),
        "written_layers": sum(r["written"] for r in records),
        "peak_trainable_params": max((r["trainable_params"] for r in records), default=0),
        "activation_bytes": activation_bytes, "train_sequences": len(train_ids), "eval_sequences": len(eval_ids),
        "layers": records,
    }
