"""The default compile pipeline, declared once as data.

Each :class:`Step` names a registered pass, the stage it belongs to, when it runs and how its
options come from the compile's :class:`~dmpq_compile.compiler.CompileConfig`. The driver builds
the pass lists from :data:`PIPELINE` (:func:`build`); ``--pass NAME --after STEP`` anchors insert
registered passes between the steps (:mod:`dmpq_compile.extra_passes`).

Stages: ``analysis`` results do not depend on the budget (cacheable, run once even with
co-design rounds); ``allocation`` steps run per allocation round; ``final`` runs once, last.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .passes import make_pass
from .passes.allocate import allocator_class
from .passes.precision import PrecisionOptions

STAGES = ("analysis", "allocation", "final")


def _always(cfg: Any, backend: Any) -> bool:
    return True


def _no_options(cfg: Any) -> dict[str, Any]:
    return {}


@dataclass(frozen=True)
class Step:
    """One pass of the default pipeline.

    Attributes:
        name: The registered pass's name.
        stage: One of :data:`STAGES`.
        when: ``(cfg, backend) -> bool``: whether the step runs for this compile.
        options: ``cfg -> {option: value}`` of the pass's ``Options``.
    """

    name: str
    stage: str
    when: Callable[[Any, Any], bool] = _always
    options: Callable[[Any], dict[str, Any]] = _no_options


def _needs_sensitivity(cfg: Any, backend: Any) -> bool:
    """The sensitivity pass runs unless turned off and nothing needs what it provides."""
    needs = allocator_class(cfg.allocator).needs
    if cfg.allocated_kinds and not cfg.sensitivity:
        raise ValueError("--nonexpert-bits auto allocates non-expert weights by their measured sensitivity; "
                         "drop --no-sensitivity")
    return cfg.sensitivity or bool(set(needs) - {"freq", "cost"})  # it provides every other annotation


def _sensitivity(cfg: Any) -> dict[str, Any]:
    return {"max_sequences": cfg.sensitivity_sequences, "flips": cfg.flip_probe, "min_tokens": cfg.min_routed_tokens,
            "rare": cfg.rare_sensitivity, "compute_dtype": cfg.calib_dtype,
            "gradvar": "router_grad_change" in allocator_class(cfg.allocator).needs,
            **({"nonexpert": cfg.allocated_kinds} if cfg.allocated_kinds else {})}


def _precision_active(cfg: Any, backend: Any) -> bool:
    """``precision`` (the fixed non-expert bits) runs only when it quantizes something."""
    return PrecisionOptions(cfg.nonexpert_bits, dict(cfg.nonexpert_kinds)).active


def _precision(cfg: Any) -> dict[str, Any]:
    return {"nonexpert_bits": cfg.nonexpert_bits, "kinds": dict(cfg.nonexpert_kinds)}


def _allocate(cfg: Any) -> dict[str, Any]:
    return {"allocator": cfg.allocator, "budget_kind": cfg.budget_kind, "budget": cfg.budget, "w_acc": cfg.w_acc,
            "w_lat": cfg.w_lat, "w_mem": cfg.w_mem, "w_eng": cfg.w_eng, "bits": cfg.bits, "metric": cfg.metric,
            "allocator_options": dict(cfg.allocator_options),
            **({"nonexpert": cfg.allocated_kinds} if cfg.allocated_kinds else {})}


def _qat(cfg: Any) -> dict[str, Any]:
    return {"steps": cfg.qat_steps, "time_budget_s": cfg.qat_time_budget_s, "lr": cfg.qat_lr, "mode": cfg.qat_mode,
            "group_size": cfg.group_size}


def _quantize(cfg: Any) -> dict[str, Any]:
    return {"method": cfg.quant_method, "group_size": cfg.group_size}


PIPELINE: tuple[Step, ...] = (
    Step("profile", "analysis", options=lambda cfg: {"compute_dtype": cfg.calib_dtype}),
    Step("sensitivity", "analysis", _needs_sensitivity, _sensitivity),
    Step("cost", "analysis", lambda cfg, backend: backend is not None),
    Step("precision", "allocation", _precision_active, _precision),
    Step("allocate", "allocation", options=_allocate),
    Step("qat", "allocation", lambda cfg, backend: bool(cfg.qat or cfg.codesign_rounds), _qat),
    Step("quantize", "final", options=_quantize),
)
ANALYSIS_STEPS = tuple(s.name for s in PIPELINE if s.stage == "analysis")  # before the budget is known
STEP_NAMES = tuple(s.name for s in PIPELINE)


def step(name: str) -> Step:
    """The pipeline's step called ``name``."""
    return next(s for s in PIPELINE if s.name == name)


def build(cfg: Any, backend: Any, stages: tuple[str, ...]) -> list:
    """The pass objects of ``stages`` that run for ``cfg`` on ``backend``, in pipeline order."""
    unknown = sorted(set(stages) - set(STAGES))
    if unknown:
        raise ValueError(f"unknown pipeline stage(s) {unknown}; stages: {STAGES}")
    return [make_pass(s.name, **s.options(cfg)) for s in PIPELINE if s.stage in stages and s.when(cfg, backend)]
