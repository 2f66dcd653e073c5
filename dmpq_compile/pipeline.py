"""The default compile pipeline, declared once as data.

Each :class:`Step` names a registered pass, the stage it belongs to, when it runs and which
section of the compile's :class:`~dmpq_compile.config.CompileConfig` its options come from
(fields forwarded by name, so a new option of a pass is one new field of its section). The driver builds
the pass lists from :data:`PIPELINE` (:func:`build`); ``--pass NAME --after STEP`` anchors insert
registered passes between the steps (:mod:`dmpq_compile.extra_passes`).

Stages: ``analysis`` results do not depend on the budget (cacheable, run once even with
co-design rounds); ``allocation`` steps run per allocation round; ``final`` runs once, last.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from .passes import PASSES, make_pass
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
        section: The :class:`~dmpq_compile.config.CompileConfig` section whose fields are
            forwarded to the pass's ``Options`` fields of the same name (None: none).
        renames: ``{section field: option}`` where the two names differ.
        derived: ``cfg -> {option: value}``: options computed from other settings.
    """

    name: str
    stage: str
    when: Callable[[Any, Any], bool] = _always
    section: str | None = None
    renames: Mapping[str, str] = field(default_factory=dict)
    derived: Callable[[Any], dict[str, Any]] = _no_options

    def options(self, cfg: Any) -> dict[str, Any]:
        """The pass's options for ``cfg``: the section's fields its ``Options`` declares, then :attr:`derived`."""
        out: dict[str, Any] = {}
        if self.section is not None:
            declared = {f.name for f in dataclasses.fields(PASSES.get(self.name).Options)}
            section = getattr(cfg, self.section)
            for f in dataclasses.fields(section):
                key = self.renames.get(f.name, f.name)
                if key in declared:
                    out[key] = copy.copy(getattr(section, f.name))  # dicts not shared with the config
        return {**out, **self.derived(cfg)}


def _needs_sensitivity(cfg: Any, backend: Any) -> bool:
    """The sensitivity pass runs unless turned off and nothing needs what it provides."""
    needs = allocator_class(cfg.allocate.allocator).needs
    if cfg.allocate.allocated_kinds and not cfg.sensitivity.enabled:
        raise ValueError("--nonexpert-bits auto allocates non-expert weights by their measured sensitivity; "
                         "drop --no-sensitivity")
    return cfg.sensitivity.enabled or bool(set(needs) - {"freq", "cost"})  # it provides every other annotation


def _sensitivity(cfg: Any) -> dict[str, Any]:
    kinds = cfg.allocate.allocated_kinds
    return {"gradvar": "router_grad_change" in allocator_class(cfg.allocate.allocator).needs,
            "compute_dtype": cfg.calibration.dtype, **({"nonexpert": kinds} if kinds else {})}


def _precision_active(cfg: Any, backend: Any) -> bool:
    """``precision`` (the fixed non-expert bits) runs only when it quantizes something."""
    return PrecisionOptions(cfg.allocate.nonexpert_bits, dict(cfg.allocate.nonexpert_kinds)).active


def _dispatch(cfg: Any) -> dict[str, Any]:
    """The expert dispatch the emitter will use (``--dispatch``, made concrete by ``compiler.resolve_dispatch``):
    the layout the cost table measures and the allocator's latency term prices (without one, the backend's)."""
    return {"dispatch": cfg.emit.dispatch} if cfg.emit.dispatch is not None else {}


def _allocate(cfg: Any) -> dict[str, Any]:
    """Non-expert kinds placed with the experts, and the dispatch (:func:`_dispatch`)."""
    kinds = cfg.allocate.allocated_kinds
    return {**({"nonexpert": kinds} if kinds else {}), **_dispatch(cfg)}


def _group_size(cfg: Any) -> dict[str, Any]:
    return {"group_size": cfg.quantize.group_size}


PIPELINE: tuple[Step, ...] = (
    Step("profile", "analysis", section="calibration", renames={"dtype": "compute_dtype"}),
    Step("sensitivity", "analysis", _needs_sensitivity, "sensitivity",
         {"sequences": "max_sequences", "flip_probe": "flips", "min_routed_tokens": "min_tokens"}, _sensitivity),
    Step("cost", "analysis", lambda cfg, backend: backend is not None, derived=_dispatch),
    Step("precision", "allocation", _precision_active, "allocate", {"nonexpert_kinds": "kinds"}),
    Step("allocate", "allocation", section="allocate", derived=_allocate),
    Step("qat", "allocation", lambda cfg, backend: cfg.qat.runs, "qat", derived=_group_size),
    Step("quantize", "final", section="quantize"),
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
