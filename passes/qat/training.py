"""``qat``: quantization-aware fine-tuning of the experts at their assigned bit-widths.

The pass fine-tunes the model on the calibration batch with straight-through-estimator (STE)
fake quantization applied to every expert whose ``bits`` annotation is below 16, then writes
the recovered weights back into the weight store. The ``quantize`` pass and the backend run on
them afterwards exactly as they would on the original weights.

Modes (option ``mode``). ``whole`` trains the whole model at once (everything below). It keeps
every weight in fp32 twice plus gradients and Adam moments of the trained ones, about
``BYTES_PER_PARAM`` (20) bytes per parameter (:func:`whole_model_estimate`). ``blockwise``
distils one decoder layer at a time (:mod:`~dmpq_compile.passes.qat.blockwise`): memory is one
layer's weights plus the residual stream at one layer boundary, time is linear in depth. ``auto``
(default) takes ``whole`` when its estimate is within ``FIT_FRACTION`` of the available memory,
``blockwise`` otherwise; one INFO line says which mode runs and why, and the stats carry it
(``mode``, ``mode_reason``). An explicit ``whole`` that cannot fit is refused before any work.
The rest of this docstring describes ``whole``; block-wise shares the trainable selection, the
optimizer and schedule, the keep-the-best rule and the write-back, per layer.

What trains (everything else is read from the store untouched, so stays bit-identical):

* experts with ``bits < 16``: always, through :func:`~dmpq_compile.quant.fake_quantize_ste` at
  their bits and group size, in the weight format the target stores those bits in
  (``ctx.backend.weight_formats``: e.g. trt-a100's per-channel symmetric INT8), optionally with
  LSQ-style learnable per-group scale multipliers (group-wise asymmetric formats only; a
  per-channel symmetric weight trains by plain STE);
* experts kept at 16 bits: in full precision when ``train_fp_experts`` (default);
* routers: when ``train_router``;
* embeddings, attention, norms, shared experts, dense MLPs and the LM head: in full precision when
  ``train_nonexpert`` (an attention, shared expert, dense MLP or LM head whose weights carry
  ``bits < 16`` from the non-expert precision policy trains through STE at those bits and the
  target's format, matching what the reference interpreter executes for it).

Loss: ``kl`` (default) distils from the full-precision model (the same graph run with
``quantize=False`` on the original weights, logits computed on the fly under ``no_grad``), the
KL divergence ``KL(p_fp || p_student)`` averaged over all token positions; ``nll`` is next-token
cross-entropy on the calibration text.

Data: the last ``eval_fraction`` of the calibration sequences (at least one) is held out; the
rest is drawn in shuffled batches of ``batch_size`` sequences (seeded by ``ctx.seed``). The
held-out KL / NLL of the fake-quantized model is measured before training, every
``eval_every`` steps and at the end; the weights of the best evaluation are kept, the untrained
weights (step 0) included, so the pass never makes the held-out metric worse (when step 0 wins
nothing is written). The optimizer is AdamW with linear warmup and cosine decay over the planned
number of steps (``steps``, or fewer when ``max_tokens`` allows fewer); training stops at
``steps``, ``max_tokens`` or ``time_budget_s`` (measured over the training loop and its
evaluations), whichever comes first.

Write-back. Without learnable scales the latent full-precision weights are written: RTN
re-quantization of them reproduces the STE forward values exactly (at the same group size). With
``learnable_scales`` each weight is *baked* to its fake-quantized value ``(q - Z) * S * m``.
Multipliers are kept in ``[SCALE_MULT_MIN, 1]``: with ``m <= 1`` the extreme codes ``0`` and
``2**bits - 1`` are always used (the group minimum rounds to code 0 and the maximum to the top
code), so RTN min/max re-quantization of the baked tensor recovers scale ``S * m`` and zero point
``Z`` and reproduces the baked values up to float32 rounding (~1e-7 relative; a multiplier above
1 would leave codes unused and could not be re-derived from min/max). The pass measures this and
reports ``bake_max_abs_diff``, ``bake_rel_rms_diff`` and ``bake_mismatch_frac`` in its stats.

Every fake-quantized node is annotated with the ``group_size`` it was trained at. Run the
``quantize`` pass with that same group size (and method ``rtn`` for a bit-exact match with the
trained forward; ``hqq``/``gptq`` re-optimise the rounding on the recovered weights, which undid
most of the gain in every measured case, so ``compile`` refuses ``--qat`` with them). The pass
refuses a graph that already carries ``quant`` records: its packed tensors would go stale.

Stats: ``mode`` and ``mode_reason`` (both modes), ``steps``, ``tokens``, ``seconds``, ``stop_reason``,
``kl_before`` / ``kl_after`` and
``nll_before`` / ``nll_after`` (held-out, fake-quantized model vs. the FP model, ``after``
measured with RTN on the written-back store), ``nll_fp``, ``best_step``, ``train_loss_first`` /
``train_loss_last``, counts of trained tensors and held-out / training sequences.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from tqdm.auto import tqdm

from ...eval.metrics import mean_kl, mean_nll
from ...ir.graph import QUANT_ROLES, Graph
from ...quant import QuantSpec, fake_quantize, fake_quantize_spec, fake_quantize_ste, init_scale_multiplier
from ...quant.formats import WeightFormat
from ...quant.spec import ASYM_GROUP, DEFAULT_GROUP_SIZE
from ...sysinfo import available_memory_bytes
from ..infra.base import PassContext, PassError

log = logging.getLogger(__name__)

LOSSES = ("kl", "nll")
MODES = ("auto", "whole", "blockwise")
BYTES_PER_PARAM = 20  # whole-model QAT: fp32 student + teacher (8), gradient (4), two Adam moments (8)
FIT_FRACTION = 0.8  # whole-model QAT may use at most this fraction of the available memory
NONEXPERT_KINDS = ("embed", "norm", "attention", "shared_expert", "mlp", "lm_head")
SCALE_MULT_MIN = 0.25  # learnable scale multipliers are clamped to [SCALE_MULT_MIN, 1]
BAKE_TOLERANCE = 1e-5  # relative to a tensor's max |value|: a larger difference counts as a mismatch


@dataclass(frozen=True)
class QATOptions:
    """Options of the ``qat`` pass.

    Attributes:
        steps: Maximum optimizer steps.
        max_tokens: Training-token budget (``None``: unlimited); a step that would exceed it is
            not taken.
        time_budget_s: Wall-clock budget of the training loop in seconds (``None``: unlimited).
        lr: Peak AdamW learning rate.
        warmup_steps: Linear warmup steps (``None``: 5 % of the planned steps, at least 1).
        weight_decay: AdamW weight decay (0 keeps weights anchored only by the loss).
        max_grad_norm: Gradient-norm clip (``None``: no clipping).
        batch_size: Calibration sequences per step.
        loss: ``"kl"`` (distil from the FP model) or ``"nll"`` (next-token cross-entropy).
        train_router: Train router weights (full precision).
        train_nonexpert: Train embeddings, attention, norms, shared experts, dense MLPs and the
            LM head (full precision).
        train_fp_experts: Train experts kept at 16 bits (full precision).
        learnable_scales: Learn a per-group scale multiplier (LSQ) and bake weights to their
            fake-quantized values at the end.
        group_size: Quantization group size (``None``: the node's ``group_size`` annotation,
            else ``graph.meta["group_size"]``, else ``DEFAULT_GROUP_SIZE``).
        eval_every: Evaluate on the held-out slice every this many steps (0: only before and
            after training); the best evaluation's weights are kept.
        eval_fraction: Fraction of the calibration sequences held out (at least one).
        mode: ``"whole"`` (train the whole model at once), ``"blockwise"`` (distil one decoder
            layer at a time; ``steps`` and ``max_tokens`` then apply to each layer, and
            ``time_budget_s`` is shared by the layers) or ``"auto"`` (whole when it fits in
            memory, else blockwise; see the module docstring). Blockwise trains on layer
            outputs, so ``loss="nll"`` needs ``whole``.
    """

    steps: int = 200
    max_tokens: int | None = None
    time_budget_s: float | None = None
    lr: float = 1e-4
    warmup_steps: int | None = None
    weight_decay: float = 0.0
    max_grad_norm: float | None = 1.0
    batch_size: int = 4
    loss: str = "kl"
    train_router: bool = False
    train_nonexpert: bool = False
    train_fp_experts: bool = True
    learnable_scales: bool = False
    group_size: int | None = None
    eval_every: int = 0
    eval_fraction: float = 0.25
    mode: str = "auto"

    def __post_init__(self) -> None:
        if self.loss not in LOSSES:
            raise ValueError(f"loss must be one of {LOSSES}, got {self.loss!r}")
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
        if self.mode == "blockwise" and self.loss == "nll":
            raise ValueError("loss='nll' needs mode='whole': block-wise QAT distils each layer's output")
        for name in ("train_router", "train_nonexpert", "train_fp_experts", "learnable_scales"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"{name} must be True or False, got {getattr(self, name)!r}")
        _check_int("steps", self.steps, 1)
        _check_int("batch_size", self.batch_size, 1)
        _check_int("eval_every", self.eval_every, 0)
        for name, lo in (("max_tokens", 1), ("warmup_steps", 0), ("group_size", 1)):
            if getattr(self, name) is not None:
                _check_int(name, getattr(self, name), lo)
        _check_number("lr", self.lr, positive=True)
        _check_number("weight_decay", self.weight_decay, positive=False)
        for name in ("time_budget_s", "max_grad_norm"):
            if getattr(self, name) is not None:
                _check_number(name, getattr(self, name), positive=True)
        _check_number("eval_fraction", self.eval_fraction, positive=True)
        if self.eval_fraction >= 1:
            raise ValueError(f"eval_fraction must be in (0, 1), got {self.eval_fraction!r}")


def _check_int(name: str, value: Any, lo: int) -> None:
    """Raise ``ValueError`` unless ``value`` is an int (not a bool) ``>= lo``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < lo:
        raise ValueError(f"{name} must be an int >= {lo}, got {value!r}")


def _check_number(name: str, value: Any, positive: bool) -> None:
    """Raise ``ValueError`` unless ``value`` is a finite number, ``> 0`` or ``>= 0``."""
    ok = not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)
    if not ok or (value <= 0 if positive else value < 0):
        raise ValueError(f"{name} must be a finite number {'> 0' if positive else '>= 0'}, got {value!r}")


# -- what trains ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class Use:
    """One (node, role) reading a trainable weight key, with its fake quantization (bits 16: none)."""

    node_id: str
    role: str
    key: str
    bits: int = 16
    group_size: int = DEFAULT_GROUP_SIZE
    spec: QuantSpec | None = None  # the target's format for ``bits``; None: group-wise asymmetric

    @property
    def learnable(self) -> bool:
        """Whether LSQ scale multipliers can train for this use (group-wise asymmetric formats only)."""
        return self.bits < 16 and (self.spec is None or self.spec.scheme == ASYM_GROUP)


@dataclass
class Trainables:
    """Trainable float32 copies of weight-store tensors and how the forward pass reads them."""

    params: dict[str, torch.nn.Parameter] = field(default_factory=dict)  # weight key -> latent weight
    scales: dict[tuple[str, int, int], torch.nn.Parameter] = field(default_factory=dict)  # LSQ multipliers
    uses: list[Use] = field(default_factory=list)

    def add(self, graph: Graph, use: Use, learnable_scales: bool) -> None:
        """Register ``use``, creating the key's parameter (and scale multiplier) on first sight."""
        if use.key not in self.params:
            self.params[use.key] = torch.nn.Parameter(graph.weights[use.key].detach().to(torch.float32).clone())
        if learnable_scales and use.learnable:  # per-channel symmetric formats train by plain STE
            skey = (use.key, use.bits, use.group_size)
            if skey not in self.scales:
                self.scales[skey] = init_scale_multiplier(self.params[use.key], use.group_size)
        self.uses.append(use)

    def quantized_nodes(self) -> dict[str, int]:
        """``node_id -> group_size`` of every node trained through fake quantization."""
        return {u.node_id: u.group_size for u in self.uses if u.bits < 16}

    def value(self, use: Use) -> torch.Tensor:
        """The tensor the forward pass uses for ``use`` (STE fake-quantized when ``bits < 16``)."""
        w = self.params[use.key]
        if use.bits >= 16:
            return w
        scale = self.scales.get((use.key, use.bits, use.group_size))
        return fake_quantize_ste(w, use.bits, use.group_size, scale_mult=scale, spec=use.spec)

    def overrides(self) -> dict[str, dict[str, torch.Tensor]]:
        """``RunOptions.weight_override`` for the current parameter values."""
        out: dict[str, dict[str, torch.Tensor]] = {}
        for use in self.uses:
            out.setdefault(use.node_id, {})[use.role] = self.value(use)
        return out

    def snapshot(self) -> dict[Any, torch.Tensor]:
        """Detached copies of every parameter and scale multiplier."""
        return {k: p.detach().clone() for k, p in (*self.params.items(), *self.scales.items())}

    def restore(self, snap: dict[Any, torch.Tensor]) -> None:
        """Load a :meth:`snapshot` back into the parameters."""
        with torch.no_grad():
            for k, p in (*self.params.items(), *self.scales.items()):
                p.copy_(snap[k])

    def clamp_scales(self) -> None:
        """Keep scale multipliers in ``[SCALE_MULT_MIN, 1]`` (see the module docstring)."""
        with torch.no_grad():
            for s in self.scales.values():
                s.clamp_(SCALE_MULT_MIN, 1.0)


def _group_size(graph: Graph, ann: dict[str, Any], option: int | None) -> int:
    """Group size for one node: the option, else its annotation, else the graph's, else 64."""
    if option is not None:
        return option
    return int(ann.get("group_size", graph.meta.get("group_size", DEFAULT_GROUP_SIZE)))


def _node_bits(kind: str, ann: dict[str, Any]) -> int:
    """Bits the reference interpreter applies to a node's quantizable weights (16: none):
    an expert's allocation, or the non-expert precision policy's bits."""
    return int(ann.get("bits", 16)) if kind in QUANT_ROLES else 16


def _trains(kind: str, bits: int, o: QATOptions) -> bool:
    """Whether a node of ``kind`` whose weights are quantized at ``bits`` trains under ``o``."""
    if kind == "expert":
        return bits < 16 or o.train_fp_experts
    if kind == "router":
        return o.train_router
    return kind in NONEXPERT_KINDS and o.train_nonexpert


def select_uses(graph: Graph, o: QATOptions, formats: dict[int, WeightFormat] | None = None) -> list[Use]:
    """The (node, role) weights that train under ``o`` and how the forward pass reads each; reads no tensor.

    ``formats`` (``Backend.weight_formats``) are the target's weight formats: a weight trains
    toward the format it will be stored in (e.g. trt-a100's per-channel symmetric INT8).

    Raises:
        PassError: the graph already carries ``quant`` records, or nothing would train.
    """
    stale = [n.id for n in graph.nodes() if "quant" in n.ann]
    if stale:
        raise PassError(f"pass 'qat' must run before 'quantize': {len(stale)} node(s) (e.g. {stale[0]!r}) already "
                        "carry packed weights whose codes QAT would leave stale")
    uses = []
    for node in graph.nodes():
        bits = _node_bits(node.kind, node.ann)
        if not _trains(node.kind, bits, o):
            continue
        group = _group_size(graph, node.ann, o.group_size)
        for role, key in node.params.items():
            b = bits if role in QUANT_ROLES.get(node.kind, ()) else 16
            fmt = (formats or {}).get(b) if b < 16 else None
            uses.append(Use(node.id, role, key, b, group, fmt.spec(group) if fmt else None))
    if not uses:
        raise PassError("pass 'qat': nothing to train (no expert has bits < 16 and every other part is frozen)")
    return uses


def collect_trainables(graph: Graph, o: QATOptions, uses: list[Use] | None = None) -> Trainables:
    """fp32 trainable copies of the weights of ``uses`` (default: all of :func:`select_uses`)."""
    tr = Trainables()
    for use in select_uses(graph, o) if uses is None else uses:
        tr.add(graph, use, o.learnable_scales)
    return tr


# -- data, losses, schedule ----------------------------------------------------------------------
def split_calibration(ids: torch.Tensor, eval_fraction: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(train, held_out)``: the last ``eval_fraction`` of the sequences (at least one) are held out.

    With a single sequence it serves as both (logged as a warning).
    """
    if ids.dim() != 2 or ids.shape[0] == 0 or ids.shape[1] < 2:
        raise PassError(f"pass 'qat' needs calibration ids of shape [B, T] with B >= 1 and T >= 2, "
                        f"got {tuple(ids.shape)}")
    n = ids.shape[0]
    if n == 1:
        log.warning("qat: only one calibration sequence; it is used for both training and evaluation")
        return ids, ids
    n_eval = min(n - 1, max(1, round(n * eval_fraction)))
    return ids[: n - n_eval], ids[n - n_eval:]


def batch_stream(n: int, batch_size: int, seed: int) -> Iterator[torch.Tensor]:
    """Endless batches of ``batch_size`` row indices in ``[0, n)``: seeded reshuffle every epoch."""
    gen = torch.Generator().manual_seed(seed)
    queue = torch.empty(0, dtype=torch.long)
    while True:
        while len(queue) < batch_size:
            queue = torch.cat([queue, torch.randperm(n, generator=gen)])
        yield queue[:batch_size]
        queue = queue[batch_size:]


def lr_factor(step: int, warmup: int, total: int) -> float:
    """Learning-rate multiplier at ``step`` (0-based): linear warmup, then cosine decay to 0 at ``total``."""
    if step < warmup:
        return (step + 1) / (warmup + 1)
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def planned_steps(o: QATOptions, tokens_per_step: int) -> int:
    """Steps the schedule is laid out for: ``steps``, capped by the token budget."""
    if o.max_tokens is None:
        return o.steps
    return min(o.steps, o.max_tokens // tokens_per_step)


# -- the pass ------------------------------------------------------------------------------------
class Objective(Protocol):
    """What the training loop optimises: the whole model (:class:`~.whole.Models`) or one layer (``blockwise``)."""

    trainables: Trainables
    label: str  # name of the held-out metric on the progress bar

    def loss(self, rows: torch.Tensor) -> torch.Tensor:
        """Differentiable training loss on the training sequences at indices ``rows``."""

    def heldout(self) -> Any:
        """Held-out evaluation of the current weights."""

    def metric(self, e: Any) -> float:
        """The number of a :meth:`heldout` result that selects the best weights (lower is better)."""


@dataclass
class Eval:
    """Held-out metrics: mean KL to the FP model per token and mean next-token NLL."""

    kl: float
    nll: float


def evaluate(logits_fn: Callable[[torch.Tensor], torch.Tensor], teacher_fn: Callable[[torch.Tensor], torch.Tensor],
             ids: torch.Tensor, batch_size: int) -> Eval:
    """KL of ``logits_fn`` to ``teacher_fn`` and its NLL on ``ids``, in batches of ``batch_size`` sequences."""
    with torch.no_grad():
        return accumulate_eval(((part, logits_fn(part), teacher_fn(part)) for part in ids.split(batch_size)),
                               len(ids))


def accumulate_eval(batches: Iterable[tuple[torch.Tensor, torch.Tensor, torch.Tensor]], n: int) -> Eval:
    """Mean KL and NLL over ``(ids, logits, teacher_logits)`` batches covering ``n`` sequences.

    Batch results are weighted by their sequence count (all sequences have the same length).
    """
    kl = nll = 0.0
    for ids, logits, teacher in batches:
        kl += float(mean_kl(teacher, logits)) * len(ids)
        nll += float(mean_nll(logits, ids)) * len(ids)
    return Eval(kl / n, nll / n)


@dataclass
class LoopResult:
    """Counters of the training loop and the best held-out evaluation (``best_state`` None: step 0)."""

    steps: int = 0
    tokens: int = 0
    stop_reason: str = "steps"
    best_step: int = 0
    best: Any = None
    best_state: dict[Any, torch.Tensor] | None = None
    losses: list[float] = field(default_factory=list)
    postfix: dict[str, str] = field(default_factory=dict)  # what the progress bar shows


# -- which mode ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class MemoryEstimate:
    """Whole-model QAT's memory need (bytes) for ``params`` parameters; ``available`` None: unknown."""

    params: int
    need: int
    available: int | None

    @property
    def fits(self) -> bool:
        return self.available is None or self.need <= FIT_FRACTION * self.available

    def describe(self) -> str:
        avail = "unknown memory" if self.available is None else _size(self.available)
        return (f"whole-model QAT needs about {_size(self.need)} for {self.params / 1e6:.3g} M parameters, "
                f"{avail} available, limit {FIT_FRACTION:.0%}")


def _size(n: int) -> str:
    return f"{n / 2**30:.1f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def whole_model_estimate(graph: Graph, available: int | None = None) -> MemoryEstimate:
    """``BYTES_PER_PARAM`` bytes per parameter against ``available`` (default: the system's MemAvailable)."""
    n = sum(math.prod(graph.weights.shape(k)) for k in graph.weights)
    return MemoryEstimate(n, BYTES_PER_PARAM * n, available_memory_bytes() if available is None else available)


def check_fits(graph: Graph, available: int | None = None) -> MemoryEstimate:
    """Refuse whole-model QAT where it cannot fit in memory, before any work.

    Whole-model QAT keeps every weight in fp32 twice (student parameters, and a teacher that reads
    the store), with gradients and two Adam moments for the trained ones: about
    ``BYTES_PER_PARAM`` bytes per parameter. Block-wise QAT holds one layer instead.

    Returns:
        The estimate, when it fits.

    Raises:
        PassError: over ``FIT_FRACTION`` of ``available``; the message suggests block-wise QAT.
    """
    est = whole_model_estimate(graph, available)
    if not est.fits:
        raise PassError(f"QAT mode 'whole' trains the whole model in memory and does not fit: {est.describe()}; "
                        "use --qat-mode blockwise or auto (QAT option mode='blockwise' / 'auto'), which distils "
                        "one decoder layer at a time, or compile without --qat")
    return est


def choose_mode(graph: Graph, mode: str, available: int | None = None) -> tuple[str, str]:
    """``(mode that runs, why)`` for option ``mode``; ``auto``: whole when :func:`check_fits` passes.

    Raises:
        PassError: ``mode="whole"`` on a model that does not fit.
    """
    if mode == "whole":
        return "whole", f"requested; {check_fits(graph, available).describe()}"
    est = whole_model_estimate(graph, available)
    if mode == "blockwise":
        return "blockwise", f"requested; {est.describe()}"
    if est.fits:
        return "whole", f"auto: {est.describe()}: fits"
    return "blockwise", f"auto: {est.describe()}: does not fit, so layer by layer"


def _optimizer(tr: Trainables, o: QATOptions) -> torch.optim.Optimizer:
    """AdamW over the latent weights (with weight decay) and the scale multipliers (without)."""
    groups = [{"params": list(tr.params.values()), "weight_decay": o.weight_decay}]
    if tr.scales:
        groups.append({"params": list(tr.scales.values()), "weight_decay": 0.0})
    return torch.optim.AdamW(groups, lr=o.lr)


def _stop_reason(o: QATOptions, step: int, tokens: int, tokens_per_step: int, t0: float) -> str | None:
    """Why training must stop before step ``step`` (0-based), or None to go on."""
    if step >= o.steps:
        return "steps"
    if o.max_tokens is not None and tokens + tokens_per_step > o.max_tokens:
        return "max_tokens"
    if o.time_budget_s is not None and time.perf_counter() - t0 >= o.time_budget_s:
        return "time_budget_s"
    return None


def train(obj: Objective, o: QATOptions, n_train: int, seq_len: int, before: Any, ctx: PassContext,
          desc: str = "qat") -> LoopResult:
    """The optimisation loop over ``n_train`` training sequences of ``seq_len`` tokens.

    ``before`` is the step-0 held-out evaluation; returns the counters and the best weights
    (``best_state`` None: step 0 was best).
    """
    t0 = time.perf_counter()
    tr = obj.trainables
    batch_size = min(o.batch_size, n_train)
    if batch_size < o.batch_size:
        log.info("qat: batch_size %d > %d training sequences; using %d", o.batch_size, n_train, batch_size)
    tokens_per_step = batch_size * seq_len
    total = planned_steps(o, tokens_per_step)
    if total == 0:
        log.warning("qat: max_tokens=%s is below one batch (%d tokens); nothing trains", o.max_tokens,
                    tokens_per_step)
    warmup = o.warmup_steps if o.warmup_steps is not None else max(1, total // 20)
    opt = _optimizer(tr, o)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, warmup, total))
    batches = batch_stream(n_train, batch_size, ctx.seed)
    res = LoopResult(best=before)
    bar = tqdm(total=total, desc=desc, unit="step", disable=not ctx.progress, leave=False)
    while (reason := _stop_reason(o, res.steps, res.tokens, tokens_per_step, t0)) is None:
        loss = _optimize_step(obj, opt, o, next(batches))
        sched.step()
        res.steps, res.tokens = res.steps + 1, res.tokens + tokens_per_step
        res.losses.append(loss)
        bar.update(1)
        res.postfix["loss"] = f"{loss:.4f}"
        bar.set_postfix(res.postfix)
        if o.eval_every and res.steps % o.eval_every == 0:
            _consider(obj, res, bar)
    bar.close()
    res.stop_reason = reason
    if res.steps and (not o.eval_every or res.steps % o.eval_every):
        _consider(obj, res, bar)
    return res



def _optimize_step(obj: Objective, opt: torch.optim.Optimizer, o: QATOptions, rows: torch.Tensor) -> float:
    """One forward/backward/update on the training sequences ``rows``; returns the loss before the update."""
    tr = obj.trainables
    opt.zero_grad(set_to_none=True)
    loss = obj.loss(rows)
    if not torch.isfinite(loss):
        raise PassError(f"pass 'qat': training loss became {float(loss)}; lower lr (now {o.lr})")
    loss.backward()
    if o.max_grad_norm is not None:
        torch.nn.utils.clip_grad_norm_([*tr.params.values(), *tr.scales.values()], o.max_grad_norm)
    opt.step()
    tr.clamp_scales()
    return float(loss.detach())


def _consider(obj: Objective, res: LoopResult, bar) -> None:
    """Evaluate the current weights on the held-out slice and keep them if they are the best so far."""
    current = obj.heldout()
    value = obj.metric(current)
    res.postfix[obj.label] = f"{value:.4g}"
    bar.set_postfix(res.postfix)
    log.debug("qat: step %d held-out %s %.5g", res.steps, obj.label, value)
    if value < obj.metric(res.best):
        res.best, res.best_step, res.best_state = current, res.steps, obj.trainables.snapshot()


# -- write-back ----------------------------------------------------------------------------------
def write_back(graph: Graph, tr: Trainables, bake: BakeFidelity | None) -> None:
    """Store the trained weights and annotate the fake-quantized nodes' group sizes.

    ``bake`` None writes the latent weights; otherwise each fake-quantized weight is baked to its
    fake-quantized value and ``bake`` records how closely RTN re-quantization reproduces it.
    """
    baked: dict[str, tuple[torch.Tensor, Use]] = {}
    if bake is not None:
        with torch.no_grad():
            baked = {u.key: (tr.value(u).detach(), u) for u in tr.uses if u.bits < 16}
    for key, p in tr.params.items():
        value = baked[key][0] if key in baked else p.detach()
        graph.weights.set(key, value.to(graph.weights[key].dtype).clone())
    for node_id, group in tr.quantized_nodes().items():
        graph.annotate(node_id, "group_size", group)
    for key, (value, use) in baked.items():
        bake.add(graph.weights[key], value, use)


@dataclass
class BakeFidelity:
    """How closely RTN re-quantization of stored baked tensors reproduces the trained values (running sums)."""

    tensors: int = 0
    max_abs: float = 0.0
    sq_diff: float = 0.0
    sq_val: float = 0.0
    mismatched: int = 0
    total: int = 0

    def add(self, stored: torch.Tensor, value: torch.Tensor, use: Use) -> None:
        """Compare the stored tensor of ``use``, re-quantized with RTN, with its trained value."""
        w = stored.to(torch.float32)
        requant = fake_quantize(w, use.bits, use.group_size) if use.spec is None else fake_quantize_spec(w, use.spec)
        diff = (requant - value).abs()
        self.tensors += 1
        self.max_abs = max(self.max_abs, float(diff.max()))
        self.sq_diff += float(diff.double().pow(2).sum())
        self.sq_val += float(value.double().pow(2).sum())
        self.mismatched += int((diff > BAKE_TOLERANCE * float(value.abs().max())).sum())
        self.total += diff.numel()

    def stats(self) -> dict[str, Any]:
        """``bake_max_abs_diff`` (largest elementwise difference), ``bake_rel_rms_diff`` (RMS of the
        differences over RMS of the values) and ``bake_mismatch_frac`` (fraction of elements off by
        more than ``BAKE_TOLERANCE`` times their tensor's max |value|, i.e. a changed code)."""
        stats = {"bake_max_abs_diff": self.max_abs,
                 "bake_rel_rms_diff": math.sqrt(self.sq_diff / max(self.sq_val, 1e-30)),
                 "bake_mismatch_frac": self.mismatched / max(1, self.total)}
        log.info("qat: baked %d tensors; RTN re-quantization max |diff| %.3g, rel RMS %.3g, mismatched %.3g",
                 self.tensors, stats["bake_max_abs_diff"], stats["bake_rel_rms_diff"], stats["bake_mismatch_frac"])
        return stats
