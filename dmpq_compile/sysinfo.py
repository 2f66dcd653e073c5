"""System probes: peak and current memory, available memory, CPU model and count, load, commit.

The one home for what the passes, the artifact writer, the bench and the benchmark scripts read
from the system. Standard library only (the runtime's probes may use it); Linux figures come from
``/proc``, with portable fallbacks where one exists and None where none does.
"""

from __future__ import annotations

import ctypes
import os
import platform
import resource
import subprocess
from pathlib import Path


def release_free_heap() -> None:
    """Hand memory that ``free`` kept in the heap back to the system (glibc ``malloc_trim``; no-op elsewhere).

    Measured on the OLMoE-1B-7B shape: about 2 GB that the sensitivity pass had freed stayed
    resident through the later passes and emission without this.
    """
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


# glibc mallopt parameters (malloc.h) and the values keep_freed_heap sets
_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4
HEAP_TRIM_THRESHOLD = 2**30  # free heap top kept mapped up to this
_MALLOC_ENV = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_MMAP_MAX_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_",
               "GLIBC_TUNABLES")


def keep_freed_heap() -> bool:
    """Let glibc reuse freed memory for the next tensors instead of returning it to the system at
    once (``mallopt``: every block comes from the heap, none from a private ``mmap``, and up to
    :data:`HEAP_TRIM_THRESHOLD` of free heap top stays mapped); returns whether it did (not where
    the user set glibc's ``MALLOC_*`` variables or ``GLIBC_TUNABLES``, nor off glibc).
    ``dmpq-compile compile`` calls it only with ``DMPQ_KEEP_FREED_HEAP=1``: on the quiet 16-layer
    OLMoE-shape A/B it saved 81 % of the page faults but no wall time, for 12 % more peak memory.

    Why: a compile allocates and frees weight- and logit-sized tensors thousands of times (an
    OLMoE expert matrix is 8 MB in fp32, the LM head 412 MB, a chunk of its logits 103 MB). By
    default glibc maps every block above its threshold (at most 32 MB) afresh and unmaps it on
    ``free``, and trims the heap's top, so each use pays a page fault and a zeroed page per 4 KB
    before any arithmetic: 10.9 million faults and 50 s of system time in a 4-layer OLMoE-shape
    compile, 2.4 million and 14 s with this (docs/scaling.md). Where the memory comes from can change
    the rounding of fp32 GEMMs (on an Intel Xeon, 2 of 1024 OLMoE experts took another bit-width),
    not what is computed. Memory: what a pass frees stays resident until it is reused or
    :func:`release_free_heap` hands it back at the pass's end, and the head-sized blocks of the
    sensitivity pass fragment its heap: its peak was 19 % higher at 4 OLMoE layers (3954 MB
    against 3311 MB). ``GLIBC_TUNABLES=glibc.malloc.perturb=0`` (a tunable at its default value)
    keeps glibc's own behaviour; a ``MALLOC_*`` setting is taken as the user's choice (glibc then
    also stops adapting its mmap threshold)."""
    if any(k in os.environ for k in _MALLOC_ENV):
        return False
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    return bool(mallopt(_M_MMAP_MAX, 0)) and bool(mallopt(_M_TRIM_THRESHOLD, HEAP_TRIM_THRESHOLD))


ONEDNN_CACHE_ENV = "ONEDNN_PRIMITIVE_CACHE_CAPACITY"
ONEDNN_CACHE_CAPACITY = 64
"""Compiled oneDNN primitives a compile keeps (oneDNN's default: 1024)."""


def bound_onednn_cache(capacity: int = ONEDNN_CACHE_CAPACITY) -> bool:
    """Keep at most ``capacity`` compiled oneDNN primitives in this process, unless the user set
    ``ONEDNN_PRIMITIVE_CACHE_CAPACITY`` (kept as their choice); returns whether it set it. oneDNN reads the
    variable when it first builds a primitive, so this must run before the first bf16 product; later it
    changes nothing (checked: set after ``import torch`` and before any product, it took effect).

    Why: torch runs bf16 matrix products through oneDNN, which compiles a primitive per shape and keeps
    up to 1024 of them with their buffers. A calibration run's expert products have a new shape for
    each routed-token count, so a bf16 compile's memory grew with depth: about 40 MB a layer at
    Qwen3-30B-A3B's widths on an Intel Xeon with AMX (5.9 GB at 4 layers, 6.7 GB at 24). With 64, a
    12-layer compile of that shape peaked at 5537 MB against 6266 MB, in the same time (335.9 against 339.6
    s; docs/scaling.md). Nothing computed changes: a primitive built again computes what it computed.
    """
    if ONEDNN_CACHE_ENV in os.environ:
        return False
    os.environ[ONEDNN_CACHE_ENV] = str(int(capacity))
    return True


def reset_peak_rss() -> None:
    """Start a new peak-RSS window (Linux: writing 5 to /proc/self/clear_refs resets VmHWM), after
    :func:`release_free_heap`, so the window starts from what is really in use. The reset also
    lowers what the process's ``ru_maxrss`` reports at exit (``/usr/bin/time``'s maximum resident
    size then covers only the last window): a compile's peak is its report's ``peak_rss_mb``."""
    release_free_heap()
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def proc_status(pid: int | str = "self") -> dict[str, int]:
    """The ``kB`` fields of ``/proc/PID/status`` (``VmHWM``, ``VmRSS``, ``RssAnon``, ...); {} where absent."""
    try:
        lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    except OSError:
        return {}
    out = {}
    for line in lines:
        key, _, value = line.partition(":")
        parts = value.split()
        if len(parts) == 2 and parts[1] == "kB":
            out[key] = int(parts[0])
    return out


def peak_rss_mb() -> float:
    """Peak resident memory since the last :func:`reset_peak_rss` (else since the start), MB.

    ``VmHWM``, not ``ru_maxrss`` where Linux gives it: a child's ``ru_maxrss`` carries over the
    (possibly large) parent's peak.
    """
    hwm = proc_status().get("VmHWM")
    if hwm is not None:
        return hwm / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def available_memory_bytes() -> int | None:
    """``MemAvailable`` of ``/proc/meminfo`` in bytes (None where the system does not say)."""
    try:
        lines = Path("/proc/meminfo").read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    return None


def cpu_model() -> str:
    """The CPU model name from ``/proc/cpuinfo`` (falls back to :func:`platform.processor`)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown-cpu"


SIMD_FLAGS = ("sse4_2", "fma", "f16c", "avx", "avx2", "avx_vnni", "avx512f", "avx512bw", "avx512vl", "avx512_vnni",
              "avx512_bf16", "avx512_fp16", "amx_tile", "amx_int8", "amx_bf16", "asimd", "asimddp", "sve", "sve2", "i8mm")


def cpu_flags() -> list[str]:
    """The SIMD features of the CPU that matter to the kernels (AVX2, AVX-512, VNNI, AMX, NEON dot product,
    ...), from ``/proc/cpuinfo`` (``flags`` on x86, ``Features`` on Arm); empty when it cannot be read."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.lower().startswith(("flags", "features")):
                    have = set(line.split(":", 1)[1].split())
                    return [flag for flag in SIMD_FLAGS if flag in have]
    except OSError:
        pass
    return []


def available_cpus() -> int:
    """CPUs this process may run on (affinity-aware)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def load_average() -> str:
    """``uptime``'s line (time, users, load averages): what timings are recorded beside."""
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True, check=False).stdout.strip()
    except OSError:
        return "load averages: " + " ".join(f"{x:.2f}" for x in os.getloadavg())


def git_commit(folder: str | Path | None = None) -> str | None:
    """The checked-out commit of the repository holding ``folder`` (default: this package), or None."""
    folder = Path(folder) if folder else Path(__file__).resolve().parent
    try:
        out = subprocess.run(["git", "-C", str(folder), "rev-parse", "HEAD"], capture_output=True, text=True,
                             check=False)
    except OSError:
        return None
    return out.stdout.strip() or None


def machine() -> dict[str, object]:
    """CPU model, usable CPUs, load and Python version: what a benchmark's results carry."""
    return {"cpu": cpu_model(), "cpus": available_cpus(), "load": load_average(),
            "python": platform.python_version()}
