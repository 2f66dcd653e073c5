"""Per-layer progress of long passes in the log: step k of n, wall and CPU time so far, and an ETA.

Progress bars (tqdm) disappear with ``--no-progress`` and in log files; a compile of a real
checkpoint runs for tens of minutes, so the passes that loop over layers also log, at most every
``every`` seconds (and always at the last step), a line such as::

    sensitivity: step 12/48 (backward L4), 95 s elapsed (cpu 171 s), 4.2 s a step, ETA 2:31

The ETA assumes the remaining steps cost what the finished ones did on average (steps of one
pass are layers of the same shape, so this is the per-layer time). A pass that resumes after an
interruption counts the steps it loaded instead of running as ``resumed``: they are done, but
take no part in the time a step costs.
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

    def __init__(self, name: str, total: int, every: float = 10.0, resumed: int = 0) -> None:
        self.name, self.total, self.every = name, max(1, int(total)), every
        self.resumed = max(0, int(resumed))  # steps done before this run (loaded, not timed)
        self.done = self.resumed
        self._t0, self._c0 = time.perf_counter(), time.process_time()
        self._last = self._t0

    def step(self, label: str = "") -> None:
        self.done += 1
        now = time.perf_counter()
        if now - self._last < self.every and self.done < self.total:
            return
        self._last = now
        elapsed, cpu = now - self._t0, time.process_time() - self._c0
        per = elapsed / (self.done - self.resumed)
        left = max(0, self.total - self.done) * per
        notes = ", ".join(x for x in (label, f"{self.resumed} resumed" if self.resumed else "") if x)
        log.info("%s: step %d/%d%s, %.0f s elapsed (cpu %.0f s), %.1f s a step, ETA %s", self.name, self.done,
                 self.total, f" ({notes})" if notes else "", elapsed, cpu, per, _clock(left))
