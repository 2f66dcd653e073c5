"""What the resumable passes share about their partial state (``PassContext.state_dir``; the folder,
its key and its lock come from :func:`.cache.run_cached`): the disk-space refusal when the folder is
opened, and naming the folders of other keys that a rerun cannot use. Messages go to the pass's
own logger (``log``), under its name."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path


def open_folder(state_dir: Path, name: str, need: int, log: logging.Logger) -> Path | None:
    """``state_dir``, created, when its disk has room for the ``need`` bytes of pass ``name``'s partial
    state (less what the folder holds already); else None, logged: the pass then keeps nothing, as
    without a cache, and an interruption redoes it."""
    state_dir = Path(state_dir)
    try:
        state_dir.mkdir(parents=True, exist_ok=True)
        held = sum(f.stat().st_size for f in state_dir.iterdir() if f.is_file())
        free = shutil.disk_usage(state_dir).free
    except OSError as e:
        log.warning("%s: cannot keep partial state in %s (%s); an interrupted run will start over", name, state_dir, e)
        return None
    if need - held > free:
        log.warning("%s: %s has %.1f GB free, partial state needs about %.1f GB more; not keeping it "
                    "(an interruption redoes the pass; free space or set DMPQ_CACHE_DIR to resume)",
                    name, state_dir.parent, free / 1e9, (need - held) / 1e9)
        return None
    return state_dir


def note_others(folder: Path, name: str, log: logging.Logger) -> None:
    """Name the partial states of pass ``name`` under other keys beside ``folder`` (a rerun with other
    options, checkpoint or code cannot use them; an interrupted run's stay until deleted)."""
    prefix = folder.name.rsplit("-", 1)[0]
    others = [p for p in folder.parent.glob(f"{prefix}-*.partial") if p.is_dir() and p != folder]
    if others:
        size = sum(f.stat().st_size for p in others for f in p.iterdir() if f.is_file())
        log.info("%s: %d partial state(s) of other runs with other keys (interrupted, or running now) are "
                 "in %s (%.1f GB); this run cannot resume from them: delete those of interrupted runs to free the "
                 "space", name, len(others), folder.parent, size / 1e9)
