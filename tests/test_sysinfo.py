"""The one home of system probes answers on this machine and degrades to None/fallbacks elsewhere."""

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
