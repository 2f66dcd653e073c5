"""A compile's scratch folder (.NAME.*.work beside -o): removed after success and failure alike,
and a stale one left by a killed compile is removed by the next compile into the same place."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from dmpq_compile.artifact import OWNER_FILE, _owner_record
from dmpq_compile.compiler import CompileConfig, compile_model


def test_scratch_is_removed_and_stale_scratch_of_killed_compiles_too(tmp_path, tiny_dirs, tiny_corpus):
    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True, check=True)
    stale = tmp_path / ".art.dead0000.work"
    stale.mkdir()
    (stale / OWNER_FILE).write_text(json.dumps({**_owner_record(), "pid": int(done.stdout), "start": None}))
    (stale / "quantized-L0.safetensors").write_bytes(b"x" * 1000)
    calibration = {"corpus": str(tiny_corpus), "sequences": 2, "seq_len": 32}
    cfg = CompileConfig.from_dict({"allocate": {"allocator": "uniform", "budget": 4.0}, "calibration": calibration})
    compile_model(tiny_dirs("olmoe"), tmp_path / "art", cfg, progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["art"]
    report = json.loads((tmp_path / "art" / "report.json").read_text())  # the compile's peak: its largest pass's
    assert report["peak_rss_mb"] == round(max(p["peak_rss_mb"] for p in report["passes"]), 1) > 0
    bad = CompileConfig.from_dict({"target": "trt-a100", "calibration": calibration,  # 3 bits: trt-a100 refuses
                                   "allocate": {"allocator": "uniform", "budget": 3.0, "bits": (3,)}})
    with pytest.raises(Exception):  # noqa: B017 - any refusal; what matters is what it leaves
        compile_model(tiny_dirs("olmoe"), tmp_path / "art2", bad, progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["art"]


def test_an_infeasible_bits_budget_is_refused_before_any_pass(tmp_path, tiny_dirs, monkeypatch):
    from dmpq_compile import compiler

    monkeypatch.setattr(compiler, "run_pipeline", lambda *a, **k: pytest.fail("a pass ran"))
    cfg = CompileConfig.from_dict({"target": "trt-a100", "allocate": {"budget": 3.5}})  # trt-a100 emits 4, 8 and 16 bits
    with pytest.raises(ValueError, match=r"3.50 average bits is infeasible for trt-a100.*smallest feasible budget is 4.00"):
        compile_model(tiny_dirs("olmoe"), tmp_path / "art", cfg, progress=False)
    assert not any(tmp_path.iterdir())


def test_compile_refuses_before_any_pass_when_memory_cannot_suffice(tiny_dirs, tmp_path, monkeypatch):
    """A clear error naming the need and what is available, before profiling starts."""
    import pytest

    from dmpq_compile import compiler
    from dmpq_compile.compiler import CompileConfig, compile_model

    monkeypatch.setattr(compiler, "available_memory", lambda: 2**20)
    monkeypatch.setattr(compiler, "run_pipeline", lambda *a, **k: pytest.fail("a pass ran"))
    with pytest.raises(MemoryError, match=r"needs at least .* GiB of memory .* 0\.0 GiB is available"):
        compile_model(tiny_dirs("olmoe"), tmp_path / "art", CompileConfig(), progress=False)
    assert not (tmp_path / "art").exists()
    monkeypatch.undo()
    assert compiler.available_memory() is None or compiler.available_memory() > 0


@pytest.mark.parametrize("budget, nonexpert, expect", [
    ({"budget_kind": "bytes", "budget": 2**20}, {"nonexpert_bits": 4}, "bytes"),
    ({"budget_kind": "bits", "budget": 3.0}, {}, "bits"),
    ({"budget_kind": "stored-bits", "budget": 4.5}, {"nonexpert_allocate": True}, "stored"),
])
def test_the_disk_check_bounds_the_artifact_by_its_budget(tiny_dirs, tmp_path, monkeypatch, budget, nonexpert, expect):
    """The space asked for before any pass: the budget's bound on the artifact, plus the scratch codes,
    plus 10 %; one byte less is refused with the need named, that much passes."""
    import math
    import shutil

    from dmpq_compile import compiler
    from dmpq_compile.frontend import load

    graph = load(tiny_dirs("olmoe"))
    cfg = CompileConfig.from_dict({"target": "ort-cpu", "allocate": {**budget, **nonexpert}})
    keys = {k for n in graph.experts() for k in n.params.values()}
    n_e = sum(math.prod(graph.weights.shape(k)) for k in keys)
    n_o = sum(math.prod(graph.weights.shape(k)) for k in graph.weights if k not in keys)
    need = {"bytes": 1.1 * (n_o * 5 / 8 + 2 * 2**20), "bits": 1.1 * (4 * n_o + 2 * n_e * 4 / 8),
            "stored": 1.1 * 2 * (n_e + n_o) * 4.5 / 8}[expect]
    usage = shutil.disk_usage(tmp_path)
    for free, ok in ((math.ceil(need), True), (math.floor(need) - 1, False)):
        monkeypatch.setattr(compiler.shutil, "disk_usage", lambda p, free=free: usage._replace(free=free))
        if ok:
            compiler.check_disk_space(graph, cfg, tmp_path)
        else:
            with pytest.raises(OSError, match=rf"needs about {need / 1e9:.1f} GB \(artifact \+ scratch codes\)"):
                compiler.check_disk_space(graph, cfg, tmp_path)


def test_a_sensitivity_count_above_the_calibration_is_said_not_cut_silently(caplog):
    """--sensitivity-sequences above what the calibration has: a warning when chosen, a note when
    it is the default; nothing when it fits."""
    import logging

    from dmpq_compile.compiler import _note_sensitivity_sequences

    with caplog.at_level(logging.INFO, logger="dmpq_compile.compiler"):
        _note_sensitivity_sequences(CompileConfig.from_dict({"sensitivity": {"sequences": 40}}), 32)
        _note_sensitivity_sequences(CompileConfig.from_dict({}), 8)  # the default 16 on 8 sequences
        _note_sensitivity_sequences(CompileConfig.from_dict({"sensitivity": {"sequences": 12}}), 32)
        _note_sensitivity_sequences(CompileConfig.from_dict({"sensitivity": {"sequences": 40, "enabled": False}}), 8)
    said = "sensitivity: measures on {} sequences, all the calibration has (asked {}); raise --calib-sequences to measure on more"
    assert [(r.levelname, r.getMessage()) for r in caplog.records] == [
        ("WARNING", said.format(32, 40)), ("INFO", said.format(8, 16))]
