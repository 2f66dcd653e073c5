"""The one home of system probes answers on this machine and degrades to None/fallbacks elsewhere."""

import os
import platform
import subprocess
import sys

import pytest

from dmpq_compile import sysinfo


def test_probes_answer():
    assert sysinfo.peak_rss_mb() > 1
    assert sysinfo.cpu_model() and sysinfo.available_cpus() >= 1
    assert "load" in sysinfo.load_average()
    free = sysinfo.available_memory_bytes()
    assert free is None or free > 0
    assert set(sysinfo.machine()) == {"cpu", "cpus", "load", "python"}


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_proc_status_and_the_peak_window():
    assert sysinfo.proc_status()["VmHWM"] >= sysinfo.proc_status()["VmRSS"] > 0
    assert sysinfo.proc_status(pid=2**22 + 1) == {}  # no such process: empty, not an error
    sysinfo.reset_peak_rss()
    block = bytearray(64 * 2**20)  # touched: counted in the new window
    assert sysinfo.peak_rss_mb() >= 64 and block[-1] == 0


def test_git_commit_of_this_checkout():
    commit = sysinfo.git_commit()
    assert commit is None or len(commit) == 40


_FAULTS = """
import resource, sys, torch
from dmpq_compile import sysinfo
kept = sysinfo.keep_freed_heap() if sys.argv[1] == "keep" else None
torch.ones(1)  # torch's own start-up allocations first
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(20):  # 8 MB and 100 MB tensors allocated, written and freed, as a compile's loops do
    blocks = [torch.empty(n).fill_(1.0) for n in (2 * 2**20, 2 * 2**20, 25 * 2**20, 2 * 2**20)]
    del blocks
print(kept, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc",
                    reason="glibc's mallopt")
def test_keep_freed_heap_reuses_pages_and_respects_the_users_settings():
    """With keep_freed_heap, blocks freed and allocated again (8 MB, and 100 MB: above glibc's
    largest mmap threshold) reuse their pages: a few rounds' page faults in all (the heap settles), where glibc's
    default maps the large ones afresh each time, a fault per 4 KB page and round. A user's own
    MALLOC_* setting wins: nothing is changed then."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_") and k != "GLIBC_TUNABLES"}

    def faults(mode: str, **extra: str) -> tuple[str, int]:
        out = subprocess.run([sys.executable, "-c", _FAULTS, mode], env={**env, **extra}, capture_output=True,
                             text=True, check=True).stdout.split()
        return out[0], int(out[1])

    round_pages = (3 * 8 + 100) * 2**20 // 4096
    kept, n_kept = faults("keep")
    default, n_default = faults("default")
    assert kept == "True" and default == "None"
    assert n_default > 10 * 100 * 2**20 // 4096  # the default faults every round, at least for the 100 MB
    assert n_kept < 4 * round_pages and 4 * n_kept < n_default, (n_kept, n_default)  # a few rounds' worth, once
    assert faults("keep", MALLOC_MMAP_MAX_="65536")[0] == "False"
    assert faults("keep", GLIBC_TUNABLES="glibc.malloc.trim_threshold=131072")[0] == "False"


def test_the_onednn_cache_is_bounded_unless_the_user_chose(monkeypatch):
    monkeypatch.delenv(sysinfo.ONEDNN_CACHE_ENV, raising=False)
    assert sysinfo.bound_onednn_cache() and os.environ[sysinfo.ONEDNN_CACHE_ENV] == str(sysinfo.ONEDNN_CACHE_CAPACITY)
    monkeypatch.setenv(sysinfo.ONEDNN_CACHE_ENV, "1024")
    assert not sysinfo.bound_onednn_cache() and os.environ[sysinfo.ONEDNN_CACHE_ENV] == "1024"


def test_the_compile_command_bounds_it_before_compiling(monkeypatch, tmp_path):
    """oneDNN reads the variable at its first primitive, so the command must set it before any pass runs."""
    from dmpq_compile import compiler
    from dmpq_compile.cli import main

    monkeypatch.delenv(sysinfo.ONEDNN_CACHE_ENV, raising=False)
    seen = []

    def compile_model(*a, **k):
        seen.append(os.environ.get(sysinfo.ONEDNN_CACHE_ENV))
        raise RuntimeError("stop here")

    monkeypatch.setattr(compiler, "compile_model", compile_model)
    try:
        rc = main(["compile", str(tmp_path), "--target", "ort-cpu", "-o", str(tmp_path / "out")])
    except SystemExit as e:
        rc = e.code
    assert rc and seen == [str(sysinfo.ONEDNN_CACHE_CAPACITY)]
