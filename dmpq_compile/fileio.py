"""Small file helpers shared by the artifact writer, the caches, the engine builder and manifest updates."""

from __future__ import annotations

import os
import secrets
import stat
import tempfile
from pathlib import Path

MODEL_FILE = "model.onnx"
"""An ONNX artifact's model file (the emitters, the baseline packager, the runtime and the bench read this name)."""
DATA_FILE = "model.onnx.data"
"""Its external weight data, present when the weights were too large to keep inside ``MODEL_FILE``."""

CACHE_ENV = "DMPQ_CACHE_DIR"
"""Environment variable naming the cache root (cost tables, pass results); default ``~/.cache/dmpq-compile``."""


def cache_root() -> Path:
    """``$DMPQ_CACHE_DIR`` if set, else ``~/.cache/dmpq-compile``."""
    root = os.environ.get(CACHE_ENV)
    return Path(root).expanduser() if root else Path.home() / ".cache" / "dmpq-compile"


def default_modes(folder: str | Path) -> tuple[int, int]:
    """``(file_mode, folder_mode)`` that a plain new file and folder created in ``folder`` get.

    That is ``0o666`` / ``0o777`` less the umask, or whatever the folder's default ACL decides.
    It is found by creating (and removing) one probe of each in ``folder``: reading the umask
    with ``os.umask`` would set it process-wide for a moment, racing with any thread that
    creates a file meanwhile.
    """
    probe = Path(folder) / f".dmpq-mode-probe.{os.getpid()}.{secrets.token_hex(6)}"
    fd = os.open(probe, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666)
    try:
        file_mode = stat.S_IMODE(os.fstat(fd).st_mode)
    finally:
        os.close(fd)
        probe.unlink()
    probe.mkdir(0o777)
    try:
        folder_mode = stat.S_IMODE(probe.stat().st_mode)
    finally:
        probe.rmdir()
    return file_mode, folder_mode


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    """Write ``data`` to ``path`` through a temporary file in the same folder and ``os.replace``.

    Readers see either the old file or the complete new one, never a partial write. The file
    keeps the mode of the file it replaces; a new file gets the mode any plain new file there
    gets (:func:`default_modes`), not the 0600 of ``mkstemp``.
    """
    path = Path(path)
    try:
        mode = stat.S_IMODE(path.stat().st_mode)
    except FileNotFoundError:
        mode = default_modes(path.parent)[0]
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), mode)
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path
