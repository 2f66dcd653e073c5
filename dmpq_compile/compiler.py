"""The compile driver: checkpoint -> IR -> passes -> artifact (library API behind ``dmpq-compile compile``)."""

from __future__ import annotations

import dataclasses
import logging
import math
import shutil
import time
from pathlib import Path
from typing import Any

import torch

from . import pipeline
from .config import CompileConfig
from .eval.tokens import eos_token, load_tokenizer
from .extra_passes import place_passes
from .frontend import load
from .frontend.hf import chat_template_source
from .frontend.source import resolve_model
from .ir.graph import NONEXPERT_QUANTIZABLE_KINDS, Graph
from .passes import DumpIR, PassContext, PassManager, Progress, Timing, make_pass
from .passes.allocate import allocator_class
from .passes.allocate.base import DEFAULT_CODE_BITS
from .passes.infra.budget_guard import BudgetGuard
from .passes.infra.cache import PassCache
from .passes.precision import check_kinds, check_nonexpert_bits

log = logging.getLogger(__name__)


# What a compile without budget flags makes: a whole-model stored-bits budget, the target's
# ``default_budget_bits`` (ort-cpu 4.5, trt-a100 4.8: llama.cpp's Q4_K_M stores about 4.8), with
# the non-expert weights placed by the allocator; where the weights the target keeps in float make
# that infeasible (tiny models whose embedding is a large share, on trt-a100), the smallest
# feasible budget plus DEFAULT_HEADROOM_BITS. Measured: docs/defaults.md.
DEFAULT_HEADROOM_BITS = 0.25
FIXED_NONEXPERT_BITS = 4  # the default's non-expert bits for allocators that cannot place them


def resolve_defaults(cfg: CompileConfig, graph: Graph | None = None) -> CompileConfig:
    """``cfg`` with a concrete dispatch (:func:`resolve_dispatch`), budget and non-expert placement.

    Budget rules, in order: a budget without a kind is code bits (``--budget-code-bits``); a code-bits
    kind without a value is :data:`DEFAULT_CODE_BITS`; no budget at all on a target with a
    ``default_budget_bits`` is a stored-bits budget of that value, with the non-expert weights
    placed by the allocator when it can (``places_nonexperts``, sensitivity on, no cost weights), else at
    :data:`FIXED_NONEXPERT_BITS` (where the user gave no ``--nonexpert-bits``); without a target
    it is code bits. ``graph`` (shapes only) raises a default stored-bits budget that the
    weights the target keeps in float make infeasible to the smallest feasible one plus
    :data:`DEFAULT_HEADROOM_BITS`, logged.

    Raises:
        ValueError: A bytes or latency budget kind without a value, or a stored-bits one
            without a value on a target that has no default.
    """
    cfg = resolve_dispatch(cfg, graph)
    if cfg.resolved:
        return cfg
    a = cfg.allocate
    kind, budget, allocate = a.budget_kind, a.budget, a.nonexpert_allocate
    backend = target_backend(cfg)
    target_default = getattr(backend, "default_budget_bits", None)
    defaulted = budget is None and kind in (None, "stored-bits") and target_default is not None
    if kind is None:
        kind = "stored-bits" if defaulted else "bits"
    if budget is None:
        if kind == "bits":
            budget = DEFAULT_CODE_BITS
        elif defaulted:
            budget = target_default
        else:
            raise ValueError(f"a {kind!r} budget needs a value" + (
                f"; target {cfg.target!r} has no default stored-bits budget" if kind == "stored-bits" else ""))
    fields: dict[str, Any] = {"budget_kind": kind, "budget": float(budget)}
    untouched = a.nonexpert_bits == 16 and not a.nonexpert_kinds
    if allocate is None:
        placing = allocator_class(a.allocator).places_nonexperts and cfg.sensitivity.enabled and not a.weights_cost
        allocate = defaulted and untouched and placing
        if defaulted and untouched and not placing:
            fields["nonexpert_bits"] = FIXED_NONEXPERT_BITS
    fields["nonexpert_allocate"] = allocate
    out = cfg.replace(allocate=fields)
    if defaulted and graph is not None:
        check_nonexpert_target(out, backend)  # before the storage of bits it cannot run is asked for
        smallest = smallest_stored_bits(out, graph, backend)
        if smallest + DEFAULT_HEADROOM_BITS > out.allocate.budget:
            log.warning("default budget: %.2f stored bits per weight is infeasible for this model on %s (the "
                        "weights it keeps in float alone make it store at least %.2f); using %.2f. Give "
                        "--budget-bits to choose", out.allocate.budget, cfg.target, smallest,
                        smallest + DEFAULT_HEADROOM_BITS)
            out = out.replace(allocate={"budget": math.ceil(100 * (smallest + DEFAULT_HEADROOM_BITS)) / 100})
    if defaulted:
        log.info("no budget given: --budget-bits %.2f with %s non-expert weights (the %s default)", out.allocate.budget,
                 "allocated" if out.allocate.nonexpert_allocate else f"{out.allocate.nonexpert_bits}-bit", cfg.target)
    return out


def calibration_ids(model_dir: str | Path, corpus: str, sequences: int, seq_len: int,
                    split: str | None = "auto") -> torch.Tensor:
    """``[sequences, seq_len]`` token ids from a corpus split, tokenized with the model's tokenizer.

    ``split="auto"``: the ``calib`` split of the built-in corpus, all of a user's own corpus
    (:func:`~dmpq_compile.eval.resolve_split`); None: the whole corpus.
    """
    from .eval import load_corpus, resolve_split, tokenize_corpus

    split = resolve_split(corpus, split, "calib")
    tok = load_tokenizer(model_dir)
    eos = eos_token(tok)
    ids = tokenize_corpus(load_corpus(corpus, split), tok, separator=eos, max_tokens=sequences * seq_len)
    n = len(ids) // seq_len
    log.info("calibration: %d sequences of %d tokens from corpus %s (%s)", min(n, sequences), seq_len, corpus,
             f"split {split}" if split else "whole corpus")
    if n == 0:
        raise ValueError(f"corpus {corpus!r} ({f'split {split}' if split else 'whole'}) has only {len(ids)} tokens; "
                         f"need at least one sequence of {seq_len}")
    if n < sequences:
        log.warning("calibration: only %d sequences of %d tokens available (asked %d)", n, seq_len, sequences)
    return torch.from_numpy(ids[: n * seq_len].reshape(n, seq_len).astype("int64"))


def _note_sensitivity_sequences(cfg: CompileConfig, available: int) -> None:
    """Say when the sensitivity pass will measure on fewer sequences than ``[sensitivity] sequences``
    asks (it takes the first ones of the calibration): a warning when the count was chosen, a note
    when it is the default."""
    asked = cfg.sensitivity.sequences
    if not cfg.sensitivity.enabled or asked <= available:
        return
    default = type(cfg.sensitivity)().sequences
    (log.warning if asked != default else log.info)(
        "sensitivity: measures on %d sequences, all the calibration has (asked %d); raise --calib-sequences "
        "to measure on more", available, asked)


def _calibration(cfg: CompileConfig) -> tuple[str, int, int]:
    """The corpus, sequences and sequence length of ``cfg``'s calibration (``calibration_ids``' arguments)."""
    c = cfg.calibration
    return c.corpus, c.sequences, c.seq_len


def analysis_passes(cfg: CompileConfig, backend: Any) -> list:
    """Passes whose results do not depend on the budget: the ``analysis`` steps of
    :data:`~dmpq_compile.pipeline.PIPELINE` (profile, [sensitivity], [cost]) plus the extras."""
    allocator_class(cfg.allocate.allocator)  # ValueError naming the registered ones
    return place_passes(pipeline.build(cfg, backend, ("analysis",)), cfg.extra_passes, analysis=True)


def sensitivity_pass(cfg: CompileConfig):
    return make_pass("sensitivity", **pipeline.step("sensitivity").options(cfg))


def allocation_passes(cfg: CompileConfig, final: bool = True) -> list:
    """Passes that depend on the allocator and budget: the ``allocation`` steps of
    :data:`~dmpq_compile.pipeline.PIPELINE` ([precision], allocate, [qat]), the ``final`` one
    (quantize), plus the extras.

    ``final=False``: without quantize and the extras anchored after it (a co-design round).
    """
    passes = pipeline.build(cfg, None, ("allocation", "final") if final else ("allocation",))
    return place_passes(passes, cfg.extra_passes, analysis=False, optional=() if final else ("quantize",))


def get_backend(target: str | None, scale_dtype: str | None = None, dispatch: str | None = None):
    """The compile's target backend (None without a target), with ``scale_dtype`` and ``dispatch`` (ort-cpu's,
    resolved: not ``auto``) where given."""
    if target is None:
        return None
    from .backends import get_backend as _get

    options = {k: v for k, v in (("scale_dtype", scale_dtype), ("dispatch", dispatch)) if v is not None}
    return _get(target, **options)


def target_backend(cfg: CompileConfig):
    """``cfg``'s backend as the compile uses it: its scale dtype and its resolved dispatch
    (:func:`resolve_dispatch`), whose layout the stored-bits budget counts."""
    return get_backend(cfg.target, cfg.quantize.scale_dtype, cfg.emit.dispatch)


def resolve_dispatch(cfg: CompileConfig, graph: Graph | None = None) -> CompileConfig:
    """``cfg`` with ort-cpu's ``auto`` dispatch (the default) made concrete, logged with the reason: ``kernel``
    where some expert of ``graph`` fits dmpq's kernel and its library builds and has a vector path on this
    machine, else ``fused`` (``backends.ort_cpu.backend.auto_dispatch``). Other targets, and a dispatch given,
    are left alone."""
    if cfg.target != "ort-cpu" or cfg.emit.dispatch not in (None, "auto"):
        return cfg
    from .backends.ort_cpu.backend import auto_dispatch

    dispatch, why, warn = auto_dispatch(graph, cfg.quantize.group_size, cfg.quantize.scale_dtype)
    if dispatch == "kernel":
        log.info("dispatch: kernel (%s); the artifact runs on Linux x86-64 with the library it carries. Give "
                 "--dispatch fused for one that runs wherever onnxruntime does", why)
    elif warn:
        log.warning("dispatch: fused, not the faster kernel: %s. Give --dispatch fused to choose it and "
                    "silence this", why)
    else:
        log.info("dispatch: fused: %s", why)
    return cfg.replace(emit={"dispatch": dispatch})


def open_artifact(graph: Graph, backend: Any, folder: Path) -> Any:
    """Write ``graph`` as an artifact into ``folder`` and load it (what passes get as ``ctx.open_artifact``)."""
    from .artifact import write_artifact
    from .runtime import load

    return load(write_artifact(graph, backend, folder), verify=False)


def run_passes(graph: Graph, passes: list, model_dir: str | Path, cfg: CompileConfig, backend: Any,
               progress: bool = True, dump_dir: str | Path | None = None,
               calibration: torch.Tensor | None = None, previous: list | None = None,
               work_dir: str | Path | None = None, cache: PassCache | None = None,
               executor: Any = None) -> tuple[Graph, list]:
    """Run ``passes`` on ``graph`` with calibration loaded only if one needs it.

    ``previous``: records of passes already run on ``graph`` (named in error messages).
    ``work_dir``: scratch folder where passes put large results (see ``PassContext.work_dir``).
    ``cache``: where cacheable passes (profile, sensitivity) reuse earlier results, and resumable
    ones (sensitivity, quantize) keep partial state; None: off.
    ``executor``: where per-layer tasks run (:mod:`dmpq_compile.distributed`); None: here.
    """
    timing = Timing()
    instruments = [timing, Progress(len(passes), progress)]
    if dump_dir:
        instruments.append(DumpIR(dump_dir))
    instruments.append(BudgetGuard(backend, cfg.allow_budget_overrun))  # last: the breaking pass is dumped
    manager = PassManager(passes, instruments, previous=[r.name for r in previous or []], cache=cache)
    manager.check(graph)
    if manager.needs_calibration and calibration is None:
        calibration = calibration_ids(model_dir, *_calibration(cfg))
    torch.manual_seed(cfg.seed)
    ctx = PassContext(calibration=calibration, target=cfg.target, backend=backend, seed=cfg.seed,
                      progress=progress, open_artifact=open_artifact,
                      work_dir=Path(work_dir) if work_dir else None, executor=executor)
    return manager.run(graph, ctx), timing.records


def run_pipeline(graph: Graph, model_dir: str | Path, cfg: CompileConfig, progress: bool = True,
                 dump_dir: str | Path | None = None, work_dir: str | Path | None = None,
                 cache: PassCache | None = None, executor: Any = None) -> tuple[Graph, list]:
    """The whole pass pipeline for ``cfg``; returns the annotated graph and per-pass records.

    ``cache``: reuse profile and sensitivity results of an earlier compile with the same
    checkpoint, calibration and options (:mod:`dmpq_compile.passes.infra.cache`), and resume the
    sensitivity and quantize passes of one that was interrupted; None: off.

    With ``codesign_rounds`` > 0, allocation and QAT alternate: each round allocates bits with
    the current sensitivities, fine-tunes at those bits, and re-measures sensitivity on the
    fine-tuned model, so the next allocation sees the recovered model; a final round then
    allocates, fine-tunes and quantizes.
    """
    graph.meta["group_size"] = cfg.quantize.group_size  # one group size for cost tables, QAT and quantize
    cfg = resolve_defaults(cfg, graph)
    backend = target_backend(cfg)
    analysis = analysis_passes(cfg, backend)
    calib = None
    if any(p.needs_calibration for p in analysis + allocation_passes(cfg)):
        calib = calibration_ids(model_dir, *_calibration(cfg))
        _note_sensitivity_sequences(cfg, len(calib))
    graph, records = run_passes(graph, analysis, model_dir, cfg, backend, progress, dump_dir, calib,
                                work_dir=work_dir, cache=cache, executor=executor)
    for r in range(cfg.qat.codesign_rounds):
        round_passes = allocation_passes(cfg, final=False)  # allocate, [extras], qat — no quantize yet
        round_passes.append(sensitivity_pass(cfg))
        graph, recs = run_passes(graph, round_passes, model_dir, cfg, backend, progress, None, calib, records,
                                 work_dir, cache, executor)
        records += recs
        log.info("co-design round %d/%d done", r + 1, cfg.qat.codesign_rounds)
    graph, recs = run_passes(graph, allocation_passes(cfg), model_dir, cfg, backend, progress, dump_dir, calib,
                             records, work_dir, cache, executor)
    return graph, records + recs


def expert_table(graph: Graph) -> list[dict[str, Any]]:
    """One row per expert with its annotations (what ``inspect`` prints and reports store)."""
    rows = []
    for n in graph.experts():
        row = {"id": n.id, "layer": n.attrs["layer"], "expert": n.attrs["expert"]}
        for key in ("freq", "mass", "tokens", "sensitivity", "kl", "flip_kl", "contribution", "router_grad_change",
                    "neuron_variance", "sensitivity_tokens", "sensitivity_estimated", "bits", "group_size"):
            if key in n.ann:
                row[key] = n.ann[key]
        if "quant" in n.ann:
            row["method"] = n.ann["quant"]["spec"].get("method")
        rows.append(row)
    return rows


def nonexpert_table(graph: Graph) -> list[dict[str, Any]]:
    """One row per quantizable node outside the routed experts (attention, shared experts, dense
    MLPs, lm_head, embedding) with its bits and, under ``--nonexpert-bits auto``, its measured KL
    per bits (what ``inspect`` prints and reports store)."""
    rows = []
    for n in graph.nodes():
        if n.kind in NONEXPERT_QUANTIZABLE_KINDS:
            row = {"id": n.id, "kind": n.kind, **({"layer": n.attrs["layer"]} if "layer" in n.attrs else {}),
                   "bits": n.ann.get("bits", 16)}
            if "kl" in n.ann:
                row["kl"] = n.ann["kl"]
            rows.append(row)
    return rows


def compile_model(model_dir: str | Path, out: str | Path, cfg: CompileConfig, progress: bool = True,
                  overwrite: bool = False, dump_dir: str | Path | None = None, cache: bool = False,
                  ray: str | None = None) -> Path:
    """Compile ``model_dir`` (a folder, or a hub id in the local HF cache) for ``cfg.target`` into
    the artifact folder ``out`` (atomic).

    ``cache``: reuse (and store) profile and sensitivity results in the pass cache
    (``$DMPQ_CACHE_DIR/passes``), so a compile of the same checkpoint at another budget or with
    another allocator skips them. The command line turns it on unless ``--no-cache``.

    ``ray``: a Ray cluster address (``auto``, ``HOST:PORT``, ``local:N``) where the per-layer
    sensitivity and quantization tasks run (:mod:`dmpq_compile.distributed`); the artifact is the
    same as without it.

    The checkpoint is checked whole (every shard present and as long as its header says) and
    the output disk for room before any pass runs. Large intermediate results (quantized codes)
    live in a scratch folder beside ``out`` that is removed afterwards, whatever happens. A
    checkpoint with a tokenizer but no chat template compiles, with a warning.
    """
    out = Path(out)
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} already exists; choose another -o or pass --overwrite")
    t0 = time.perf_counter()
    model_dir = resolve_model(model_dir)
    graph = load(model_dir)
    if (Path(model_dir) / "tokenizer.json").is_file() and chat_template_source(model_dir) is None:
        log.warning("%s has no chat template (neither chat_template.jinja nor a chat_template key in "
                    "tokenizer_config.json): apply_chat_template on the artifact will fail; pass a template "
                    "yourself, or add one to the checkpoint and compile again", model_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    graph.meta["group_size"] = cfg.quantize.group_size
    requested_dispatch = cfg.emit.dispatch or "auto"
    cfg = resolve_defaults(cfg, graph)
    check_bits_budget(cfg, graph)
    check_disk_space(graph, cfg, out.parent)
    check_memory(graph, cfg)
    from .artifact import scratch_folder
    from .distributed import connect

    executor = connect(ray)
    work = scratch_folder(out, ".work")  # removes .work folders that killed compiles left here
    try:
        graph, records = run_pipeline(graph, model_dir, cfg, progress, dump_dir, work,
                                      PassCache() if cache else None, executor)
        return emit(graph, cfg, out, records, time.perf_counter() - t0, overwrite, requested_dispatch)
    finally:
        shutil.rmtree(work, ignore_errors=True)
        if executor is not None:
            executor.close()


def check_nonexpert_target(cfg: CompileConfig, backend: Any) -> None:
    """Refuse ``nonexpert_bits`` and ``nonexpert_kinds`` the target cannot run (``ValueError``)."""
    a = cfg.allocate
    if backend is not None and a.nonexpert_bits < 16:
        check_nonexpert_bits(a.nonexpert_bits, backend.supported_bits_for("attention"), cfg.target)
    if backend is not None:
        check_kinds(a.nonexpert_kinds, backend)


def check_bits_budget(cfg: CompileConfig, graph: Graph | None = None) -> None:
    """Refuse, before hours of analysis, a bits budget no allocation can meet (code bits below the
    target's smallest bits; stored bits below what the weights outside the experts plus every
    expert at its smallest bits store, computed from ``graph``'s shapes), and ``nonexpert_bits``
    the target cannot run."""
    backend = target_backend(cfg)
    check_nonexpert_target(cfg, backend)
    a = cfg.allocate
    if a.allocated_kinds:
        from .passes.allocate.base import check_nonexpert_allocation

        check_nonexpert_allocation(a.allocator, a.budget_kind, a.weights_cost)
    supported = a.bits or getattr(backend, "supported_bits", None) or ()
    if a.budget_kind == "bits" and supported and a.budget < min(supported):
        raise ValueError(f"budget {a.budget:.2f} average bits is infeasible for {cfg.target} (bits "
                         f"{tuple(supported)}): the smallest feasible budget is {min(supported):.2f} average bits; "
                         "raise --budget-code-bits")
    if a.budget_kind == "stored-bits" and graph is not None:
        smallest, fixed = smallest_stored_bits(cfg, graph, backend, with_fixed=True)
        choices = tuple(sorted(supported or (16,)))
        if a.budget < smallest:
            alone = f"the weights outside the experts alone store {fixed:.2f} bits per weight of the model"
            floats = a.nonexpert_bits == 16 and not a.nonexpert_kinds and not a.nonexpert_allocate
            hint = (f"or lower --nonexpert-bits to quantize them ({alone} in float)" if floats else
                    f"({alone})")
            lowest = "expert and allocated non-expert weight" if a.allocated_kinds else "expert"
            raise ValueError(f"--budget-bits {a.budget:.2f} is infeasible for {cfg.target}: with every {lowest} at "
                             f"{min(choices)} bits the model stores {smallest:.2f} bits per weight; raise the budget "
                             f"{hint}")


def smallest_stored_bits(cfg: CompileConfig, graph: Graph, backend: Any, with_fixed: bool = False):
    """The smallest whole-model stored bits per weight ``cfg`` can reach on ``graph``: the weights
    outside the allocation as ``cfg`` fixes them plus every allocated item at its cheapest bits
    (with ``with_fixed``: also the fixed part alone). Shapes only."""
    from .passes.allocate.base import stored_bits_budget
    from .passes.precision import allocatable

    a = cfg.allocate
    choices = tuple(sorted(a.bits or getattr(backend, "supported_bits", None) or (16,)))
    budget, stored = stored_bits_budget(graph, backend, a.budget, choices, a.nonexpert_bits,
                                        a.nonexpert_kinds, allocatable(graph, backend, a.allocated_kinds, choices))
    smallest = budget.fixed + 8 * sum(min(v.values()) for v in stored.values()) / budget.params
    return (smallest, budget.fixed) if with_fixed else smallest


def check_disk_space(graph: Graph, cfg: CompileConfig, folder: Path) -> None:
    """Refuse to start when ``folder``'s disk cannot hold the artifact plus the scratch codes.

    Estimated before any pass has chosen a bit-width, so an upper bound, plus 10 %: a whole-model
    stored-bits budget (``--budget-bits``) bounds the artifact, and the scratch codes are at most
    that again. Otherwise the experts count twice (scratch codes, then the artifact) at the budget
    (``--budget-mb``: its bytes; ``--budget-code-bits``: its bits plus 1 bit of scales and zero
    points; a latency budget: 8 + 1 bits) and the non-expert weights once, at ``--nonexpert-bits``
    plus 1 bit when one width is fixed for all of them, else in fp32 (what the targets keep in float).
    """
    a = cfg.allocate
    expert_keys = {k for n in graph.experts() for k in n.params.values()}
    n_expert = sum(math.prod(graph.weights.shape(k)) for k in expert_keys)
    n_other = sum(math.prod(graph.weights.shape(k)) for k in graph.weights if k not in expert_keys)
    if a.budget_kind == "stored-bits":
        need = 1.1 * 2 * (n_expert + n_other) * a.budget / 8
    else:
        fixed = a.nonexpert_bits < 16 and not a.nonexpert_kinds and not a.nonexpert_allocate
        other = n_other * ((a.nonexpert_bits + 1) / 8 if fixed else 4)
        experts = a.budget if a.budget_kind == "bytes" else \
            n_expert * ((a.budget if a.budget_kind == "bits" else 8.0) + 1) / 8
        need = 1.1 * (other + 2 * experts)
    free = shutil.disk_usage(folder).free
    if need > free:
        raise OSError(f"{folder} has {free / 1e9:.1f} GB free but this compile needs about {need / 1e9:.1f} GB "
                      f"(artifact + scratch codes); free space or choose another -o")


def available_memory() -> int | None:
    """Bytes this process may still allocate: the smaller of the kernel's MemAvailable and the
    room left under an address-space limit (``ulimit -v``); None where neither is known."""
    import resource

    avail = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                avail = int(line.split()[1]) * 1024
    except OSError:
        pass
    soft, _ = resource.getrlimit(resource.RLIMIT_AS)
    if soft != resource.RLIM_INFINITY:
        try:
            used = int(Path("/proc/self/statm").read_text().split()[0]) * resource.getpagesize()
        except OSError:
            used = 0
        avail = soft - used if avail is None else min(avail, soft - used)
    return avail


def check_memory(graph: Graph, cfg: CompileConfig) -> None:
    """Refuse to start when memory cannot hold what any compile of ``graph`` holds at once.

    A floor, not a forecast (measured peaks are higher: OLMoE-1B-7B shape 3.5-4.4 GB against a
    floor of 1.5 GB): the largest weight (the LM head or embedding table) read and converted to
    fp32 (6 bytes a weight from a bf16 checkpoint, counted as 4 x 1.5), three chunks of 4
    sequences' logits ``[4, T, V]`` in fp32 (logits, log-probabilities, their gradient), eight
    residual streams of the sensitivity sequences and 0.5 GB for the libraries.
    """
    avail = available_memory()
    if avail is None:
        return
    largest = max((math.prod(graph.weights.shape(k)) for k in graph.weights), default=0)
    vocab = int(graph.meta.get("vocab_size") or 0)
    hidden = int(graph.meta.get("hidden_size") or 0)
    seqs = min(cfg.sensitivity.sequences, cfg.calibration.sequences)
    seq_len = cfg.calibration.seq_len
    need = 4 * (1.5 * largest + 3 * 4 * seq_len * vocab + 8 * seqs * seq_len * hidden) + 2**29
    if need > avail:
        raise MemoryError(f"this compile needs at least {need / 2**30:.1f} GiB of memory at once (the largest weight "
                          f"in fp32, logits of 4 sequences over a {vocab}-token vocabulary, the "
                          f"calibration residual streams) but {avail / 2**30:.1f} GiB is available; free memory, "
                          "raise the limit (ulimit -v) or lower --calib-sequences/--seq-len")


def emit(graph: Graph, cfg: CompileConfig, out: str | Path, records: list, seconds: float,
         overwrite: bool = False, requested_dispatch: str | None = None) -> Path:
    """Write the artifact for an annotated, quantized graph (atomic), with its report.

    An ort-cpu ``cfg`` whose dispatch is still ``auto`` is resolved as ``run_pipeline`` resolved it (the layout
    the budget and the cost table counted); the report records what was asked (``requested_dispatch``, else
    ``cfg``'s) and what was emitted."""
    from .artifact import write_artifact
    from .rare_counts import rare_counts

    requested = requested_dispatch or cfg.emit.dispatch or "auto"
    cfg = resolve_dispatch(cfg, graph)
    experts = expert_table(graph)
    rare = cfg.sensitivity.min_routed_tokens
    report = {"config": cfg.to_dict(), "passes": [dataclasses.asdict(r) for r in records],
              "experts": experts, "nonexpert": nonexpert_table(graph),
              "rare_experts": {"min_routed_tokens": rare, "mode": cfg.sensitivity.rare,
                               "per_layer": {str(k): v for k, v in rare_counts(experts, rare).items()}},
              "compile_seconds": round(seconds, 3),
              # each pass resets the kernel's high-water mark (sysinfo.reset_peak_rss), so the compile's
              # peak is the largest pass's; the process's ru_maxrss (e.g. /usr/bin/time's maximum
              # resident size) only sees what came after the last reset
              "peak_rss_mb": round(max((r.peak_rss_mb for r in records), default=0.0), 1)}
    if cfg.target == "ort-cpu":
        report["dispatch"] = {"requested": requested, "emitted": cfg.emit.dispatch}
    return write_artifact(graph, target_backend(cfg), out, report=report,
                          overwrite=overwrite, emit_options=cfg.emit.options())
