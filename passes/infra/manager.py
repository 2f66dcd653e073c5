"""The pass manager: validates a pipeline up front, runs it, and applies instruments."""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from tqdm.auto import tqdm

from ...ir.graph import Graph
from ...ir.serialize import save_graph
from ...ir.stream import SharedForward
from ...sysinfo import peak_rss_mb, reset_peak_rss
from .base import Pass, PassContext, PassError, PassResult
from .cache import PassCache, run_cached

log = logging.getLogger(__name__)


class Instrument:
    """Hooks around every pass: timing, memory, dumps, progress. Passes never do these themselves."""

    def before(self, index: int, p: Pass, graph: Graph) -> None:
        pass

    def after(self, index: int, p: Pass, result: PassResult) -> None:
        pass


@dataclass
class PassRecord:
    name: str
    seconds: float
    modified: bool
    peak_rss_mb: float
    stats: dict = field(default_factory=dict)
    cpu_seconds: float | None = None  # the process's CPU time (all threads): robust to other load, unlike wall time


class Timing(Instrument):
    """Records wall time, the pass's own peak RSS and stats per pass (``records``)."""

    def __init__(self) -> None:
        self.records: list[PassRecord] = []
        self._t0 = 0.0

    def before(self, index, p, graph):
        reset_peak_rss()
        self._t0, self._c0 = time.perf_counter(), time.process_time()

    def after(self, index, p, result):
        dt, cpu = time.perf_counter() - self._t0, time.process_time() - self._c0
        rss = peak_rss_mb()
        self.records.append(PassRecord(p.name, dt, result.modified, rss, dict(result.stats), round(cpu, 3)))
        log.info("pass %-12s %7.2fs (cpu %.1fs)  modified=%s  peak_rss=%.0f MB", p.name, dt, cpu, result.modified, rss)


class DumpIR(Instrument):
    """Saves the IR after the named passes (all when ``after`` is None) into ``folder/NN-name``."""

    def __init__(self, folder: str | Path, after: Sequence[str] | None = None) -> None:
        self.folder, self.after_names = Path(folder), set(after) if after else None

    def after(self, index, p, result):
        if self.after_names is None or p.name in self.after_names:
            path = save_graph(result.graph, self.folder / f"{index:02d}-{p.name}")
            log.info("dumped IR after %s to %s", p.name, path)


class Progress(Instrument):
    """One progress bar over the pipeline (passes show their own inner bars)."""

    def __init__(self, total: int, enabled: bool = True) -> None:
        self.bar = tqdm(total=total, desc="pipeline", unit="pass", disable=not enabled, leave=False)

    def before(self, index, p, graph):
        self.bar.set_postfix_str(p.name)

    def after(self, index, p, result):
        self.bar.update(1)
        if self.bar.n == self.bar.total:
            self.bar.close()


class PassManager:
    """Runs passes in order after checking that every requirement is met by the input or an earlier pass."""

    def __init__(self, passes: Sequence[Pass], instruments: Sequence[Instrument] = (),
                 previous: Sequence[str] = (), cache: PassCache | None = None) -> None:
        """``previous`` names passes an earlier manager already ran on the graph (for error messages);
        ``cache`` reuses the results of cacheable passes (see :mod:`.cache`), None runs every pass."""
        self.passes = list(passes)
        self.cache = cache
        self.instruments = list(instruments)
        self.previous = list(previous)

    @property
    def needs_calibration(self) -> bool:
        return any(p.needs_calibration for p in self.passes)

    def check(self, graph: Graph) -> None:
        """Raise PassError naming the first pass whose requirements nothing before it provides."""
        experts = graph.experts()
        keys = {k for n in experts for k in n.ann}
        available = {k for k in keys if all(k in n.ann for n in experts)}  # on every expert
        for i, p in enumerate(self.passes):
            missing = [k for k in p.requires if k not in available]
            if missing:
                before = self.previous + [q.name for q in self.passes[:i]] or ["(none)"]
                raise PassError(f"pipeline invalid: pass {p.name!r} (#{len(self.previous) + i + 1}) requires {missing}, "
                                "which neither "
                                f"the input graph nor the passes before it ({', '.join(before)}) provide")
            available.update(p.provides)

    def run(self, graph: Graph, ctx: PassContext) -> Graph:
        self.check(graph)
        share = None  # one calibration forward for the passes that would each run it
        if ctx.calibration is not None and ctx.forward_share is None:
            wants = [w for p in self.passes if (w := p.forward_rows(graph, ctx)) is not None]
            if wants:
                share = ctx.forward_share = SharedForward(*wants[0])
        try:
            return self._run(graph, ctx)
        finally:
            if share is not None:  # what no pass took (e.g. the taker's result came from the cache)
                share.close()
                ctx.forward_share = None

    def _run(self, graph: Graph, ctx: PassContext) -> Graph:
        for i, p in enumerate(self.passes):
            step = len(self.previous) + i  # position in the whole pipeline (dump folder numbering)
            for inst in self.instruments:
                inst.before(step, p, graph)
            try:
                result = run_cached(p, graph, ctx, self.cache)
            except PassError:
                raise
            except Exception as e:
                before = ", ".join(self.previous + [q.name for q in self.passes[:i]]) or "none"
                raise PassError(f"pass {p.name!r} (#{len(self.previous) + i + 1}; passes run before it: {before}) "
                                f"failed: {type(e).__name__}: {e}") from e
            for inst in self.instruments:
                inst.after(step, p, result)
            graph = result.graph
        return graph
