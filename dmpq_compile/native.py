"""Building dmpq's C++ libraries on first use: compiled from the sources this package ships, cached by the
hash of the sources, flags, compiler version (and, for libraries tuned to this CPU, its feature flags), and
written whole or not at all (another process may build the same file at once).

Two libraries use it: the onnxruntime custom-op library artifacts carry (``backends/ort_cpu/kernels.py``) and the
compile-time helpers the passes call through ctypes (:mod:`dmpq_compile.quant.native`).
"""

from __future__ import annotations

import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

log = logging.getLogger(__name__)


class NativeBuildError(RuntimeError):
    """A library cannot be built here: not Linux x86-64, no C++ compiler, or the compile failed."""


def compiler(purpose: str) -> str:
    cxx = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++") or shutil.which("clang++")
    if not cxx:
        raise NativeBuildError(f"{purpose} builds from C++ and found no compiler: install g++ "
                               "(apt-get install g++) or set CXX")
    return cxx


def cache_dir() -> Path:
    """``$DMPQ_KERNEL_CACHE``, else ``$XDG_CACHE_HOME/dmpq-compile/kernels`` (``~/.cache`` by default)."""
    root = os.environ.get("DMPQ_KERNEL_CACHE")
    if root:
        return Path(root)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "dmpq-compile" / "kernels"


def cpu_flags() -> str:
    """This CPU's feature flags (Linux), for libraries compiled with ``-march=native``."""
    try:
        with open("/proc/cpuinfo") as f:
            return next((line for line in f if line.startswith("flags")), "")
    except OSError:
        return ""


def build_library(name: str, source_dir: Path, sources: tuple[str, ...], flags: tuple[str, ...],
                  purpose: str, cache: Path | None = None, native_cpu: bool = False) -> Path:
    """The shared library ``name`` built from ``sources[0]`` (the others are headers it includes), compiled now
    if the cache lacks it; its path. ``native_cpu``: the flags tune it to this CPU, so the key includes its
    features (a cache shared by machines with other CPUs then builds one per CPU).

    Raises:
        NativeBuildError: not Linux x86-64, no C++ compiler, or the compile failed (with its output).
    """
    if platform.system() != "Linux" or platform.machine().lower() not in ("x86_64", "amd64"):
        raise NativeBuildError(f"{purpose} is written for Linux x86-64, not {platform.system()} {platform.machine()}")
    cxx = compiler(purpose)
    try:
        version = subprocess.run([cxx, "--version"], capture_output=True, text=True, timeout=60, check=False).stdout
    except (OSError, subprocess.SubprocessError) as e:
        raise NativeBuildError(f"cannot run the C++ compiler {cxx!r}: {e}") from e
    digest = hashlib.sha256()
    for source in sources:
        digest.update((source_dir / source).read_bytes())
    digest.update(" ".join(flags).encode())
    digest.update(version.encode())
    if native_cpu:
        digest.update(cpu_flags().encode())
    folder = (cache or cache_dir()) / digest.hexdigest()[:16]
    target = folder / name
    if target.is_file():
        return target
    folder.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".build-", suffix=".so", dir=folder)
    os.close(fd)
    cmd = [cxx, *flags, "-o", tmp, str(source_dir / sources[0])]
    log.info("building %s: %s", purpose, " ".join(cmd))
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, check=False)
        if done.returncode != 0:
            raise NativeBuildError(f"building {purpose} failed ({' '.join(cmd)}):\n{(done.stderr or done.stdout)[-4000:]}")
        os.replace(tmp, target)  # whole or absent
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target
