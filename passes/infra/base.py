"""The pass contract: a pass declares what it needs and provides; the base class enforces it."""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch

from ...ir.graph import Graph

log = logging.getLogger(__name__)


class PassError(RuntimeError):
    """A pass failed or broke its contract; the message names the pass."""


@dataclass
class PassContext:
    """Everything a pass may read besides the graph.

    Attributes:
        calibration: token ids ``[B, T]`` for passes with ``needs_calibration`` (loaded by the
            driver only when one is in the pipeline).
        target: the backend name the artifact is for (``ort-cpu``, ``trt-a100``), or None.
        backend: the backend object (cost tables, supported bits), or None.
        seed: base random seed; passes derive theirs from it.
        progress: show progress bars.
        open_artifact: ``(quantized graph, backend, folder) -> session`` that writes an artifact
            into ``folder`` and loads it with the runtime (``session.forward``, ``.manifest``).
            The artifact writer and the runtime sit above the passes, so the driver injects this;
            None where no driver gave it (passes that need it say so).
        work_dir: a scratch folder for the compile (removed by the driver afterwards) where
            passes put large results on disk instead of in memory, e.g. quantized codes
            (:meth:`WeightStore.spill`); None keeps them in memory.
        executor: where per-layer tasks run (:class:`dmpq_compile.distributed.RayExecutor`, from
            ``compile --ray``); None runs them in this process. Passes that use it must write
            exactly what they write without it.
        state_dir: where a resumable pass may keep partial state, to resume after an interruption
            without redoing finished work (the sensitivity and quantize passes' finished layers, see
            :mod:`dmpq_compile.passes.sensitivity.resume`, :mod:`dmpq_compile.passes.quantize_resume`).
            The pass cache gives each run a
            folder named by the run's cache key (so only a run on the same checkpoint,
            options, calibration and code resumes from it) and removes it once the pass
            finished; None (no cache, ``--no-cache``): keep nothing.
    """

    calibration: torch.Tensor | None = None
    target: str | None = None
    backend: Any = None
    seed: int = 0
    progress: bool = True
    work_dir: Path | None = None
    open_artifact: Callable[[Graph, Any, Path], Any] | None = None
    executor: Any = None
    state_dir: Path | None = None
    forward_share: Any = None


@dataclass(frozen=True)
class PassResult:
    graph: Graph
    modified: bool
    stats: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class NoOptions:
    pass


class Pass:
    """Base class. Subclasses set the class attributes and implement :meth:`run`.

    ``requires`` / ``provides`` name expert annotations (see ``ir.annotations.SCHEMA``): the
    manager checks the whole pipeline against them before anything runs, and :meth:`call`
    checks them again on the real graph around :meth:`run`.
    """

    name: ClassVar[str] = ""
    requires: ClassVar[tuple[str, ...]] = ()
    provides: ClassVar[tuple[str, ...]] = ()
    needs_calibration: ClassVar[bool] = False
    cacheable: ClassVar[bool] = False  # results may be reused from the pass cache (see passes/infra/cache.py)
    resumable: ClassVar[bool] = False  # keeps partial state in ``ctx.state_dir`` (given only to these)
    Options: ClassVar[type] = NoOptions
    description: ClassVar[str] = ""

    def __init__(self, options: Any = None, **kwargs: Any) -> None:
        if options is not None and kwargs:
            raise TypeError("give options either as an Options object or as keywords, not both")
        self.options = options if isinstance(options, self.Options) else make_options(self, options or kwargs)

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:  # pragma: no cover - abstract
        raise NotImplementedError(f"pass {self.name!r} does not implement run()")

    def environment(self, graph: Graph) -> Any:
        """What the result depends on besides the options, graph, context and code (part of the
        pass cache's key), e.g. an option ``auto`` resolved on this machine; None: nothing."""
        return None

    def forward_rows(self, graph: Graph, ctx: PassContext) -> tuple[int, torch.dtype | None] | None:
        """The calibration forward this pass would reuse from an earlier pass, as ``(sequences, products'
        dtype)`` (:class:`~dmpq_compile.ir.stream.SharedForward`); None: none."""
        return None

    def call(self, graph: Graph, ctx: PassContext) -> PassResult:
        """Run the pass with its contract checked before and after."""
        missing = [k for k in self.requires if not graph.has_annotation(k)]
        if missing:
            raise PassError(f"pass {self.name!r} needs annotations {missing} on every expert; "
                            f"run a pass that provides them first")
        if self.needs_calibration and ctx.calibration is None:
            raise PassError(f"pass {self.name!r} needs calibration data (give --calib-corpus)")
        result = self.run(graph, ctx)
        if not isinstance(result, PassResult):
            raise PassError(f"pass {self.name!r} returned {type(result).__name__}, expected PassResult")
        absent = [k for k in self.provides if not result.graph.has_annotation(k)]
        if absent:
            raise PassError(f"pass {self.name!r} promised annotations {absent} but did not write them")
        return result


def make_options(p: Pass | type[Pass], values: dict[str, Any]) -> Any:
    """Build a pass's frozen Options from a dict, rejecting unknown keys with the valid ones."""
    cls = p.Options
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise PassError(f"pass {p.name!r}: unknown option(s) {unknown}; valid options: {sorted(known) or 'none'}")
    try:
        return cls(**values)
    except (TypeError, ValueError) as e:
        raise PassError(f"pass {p.name!r}: bad options {values}: {e}") from None


def options_doc(p: type[Pass]) -> str:
    fields = dataclasses.fields(p.Options)
    return ", ".join(f"{f.name}={f.default!r}" if f.default is not dataclasses.MISSING else f.name
                     for f in fields)
