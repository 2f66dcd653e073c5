"""Per-layer progress of long passes in the log: step k of n, wall and CPU time so far, and an ETA.

Progress bars (tqdm) disappear with ``--no-progress`` and in log files; a compile of a real
checkpoint runs for tens of minutes, so the passes that loop over layers also log, at most every
``every`` seconds (and always at the last step), a line such as::

    sensitivity: step 12/48 (backward L4), 95 s elapsed (cpu 171 s), 4.2 s a step, ETA 2:31

The ETA assumes the remaining work costs what the finished work did: by default every step is
one unit (steps of one pass are layers of the same shape, so this is the per-layer time); a pass
whose phases differ (the sensitivity pass: a backward layer costs about eight forward layers)
gives each step its ``work`` and the total in the same units. A pass that resumes after an
interruption counts the steps it loaded instead of running as ``resumed``, and steps another
pass already did (:meth:`LayerClock.skip`) are done the same way: they take no part in the time
a unit costs.
"""

from __future__ import annotations

import logging
import time

log = logging.getLogger(__name__)


def _clock(seconds: float) -> str:
    m, s = divmod(round(seconds), 60)
    h, m = divmod(m, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


class LayerClock:
    """Counts steps of a pass and logs progress with an ETA (see module docstring)."""

    def __init__(self, name: str, total: int, every: float = 10.0, resumed: int = 0,
                 work: float | None = None, resumed_work: float | None = None) -> None:
        """``total`` steps (``work`` units in all, default one a step), ``resumed`` of them
        (``resumed_work`` units) done before this run."""
        self.name, self.total, self.every = name, max(1, int(total)), every
        self.resumed = max(0, int(resumed))  # steps done before this run (loaded, not timed)
        self.done = self.resumed
        self.work = float(work) if work is not None else float(self.total)
        self.work_done = float(resumed_work) if resumed_work is not None else float(self.resumed)
        self._untimed = self.work_done  # units done without this run's time
        self._t0, self._c0 = time.perf_counter(), time.process_time()
        self._last = self._t0

    def skip(self, steps: int = 1, work: float | None = None) -> None:
        """``steps`` steps (``work`` units) done at no cost here, e.g. taken from another pass."""
        w = float(steps if work is None else work)
        self.done += steps
        self.work_done += w
        self._untimed += w

    def step(self, label: str = "", work: float = 1.0) -> None:
        self.done += 1
        self.work_done += work
        now = time.perf_counter()
        if now - self._last < self.every and self.done < self.total:
            return
        self._last = now
        elapsed, cpu = now - self._t0, time.process_time() - self._c0
        timed = self.work_done - self._untimed
        per = elapsed / max(1, self.done - self.resumed)
        left = max(0.0, self.work - self.work_done) * elapsed / timed if timed > 0 else 0.0
        notes = ", ".join(x for x in (label, f"{self.resumed} resumed" if self.resumed else "") if x)
        log.info("%s: step %d/%d%s, %.0f s elapsed (cpu %.0f s), %.1f s a step, ETA %s", self.name, self.done,
                 self.total, f" ({notes})" if notes else "", elapsed, cpu, per, _clock(left))
