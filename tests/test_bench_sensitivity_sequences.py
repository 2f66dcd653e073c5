"""benchmarks/sensitivity_sequences.py: its variants name the calibration rows the sensitivity pass
measures on, a compile of a variant measures on exactly those rows (the profile on all of them), and
the per-size summary averages what the README's table quotes."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import sensitivity_sequences as ss
from dmpq_compile.passes.sensitivity.base import SensitivityPass

from dmpq_compile import compiler

MODEL = str(ROOT / "samples" / "mixtral-tiny")


def test_variants_name_their_rows():
    assert ss.chosen_rows("s4") == [0, 1, 2, 3]
    assert ss.chosen_rows("s3@16") == [16, 17, 18]
    assert ss.chosen_rows("s4/8") == [0, 8, 16, 24]
    assert ss.chosen_rows("s2@1/2") == [1, 3]
    for bad in ("16", "s0", "s4/0", "s4@x", "t4"):
        with pytest.raises(SystemExit, match="variant"):
            ss.parse_variant(bad)


def test_front_keeps_every_row():
    ids = torch.arange(6).reshape(6, 1)
    assert ss.front(ids, [4, 1]).flatten().tolist() == [4, 1, 0, 2, 3, 5]


def test_compile_measures_on_the_chosen_rows(tmp_path, monkeypatch):
    seen = []
    run = SensitivityPass.run

    def spy(self, graph, ctx):
        seen.append((ctx.calibration[: self.options.max_sequences].clone(), ctx.calibration.clone()))
        return run(self, graph, ctx)

    monkeypatch.setattr(SensitivityPass, "run", spy)
    original = compiler.calibration_ids
    info = ss.compile_variant(MODEL, "s2@1/2", tmp_path / "art", 4)
    assert compiler.calibration_ids is original
    ids = original(MODEL, "pydoc", 4, 128)
    (measured, whole), = seen
    assert torch.equal(measured, ids[[1, 3]])
    assert sorted(map(tuple, whole.tolist())) == sorted(map(tuple, ids.tolist()))  # the profile sees all 4
    assert info["sensitivity_tokens"] == 2 * 128
    report = json.loads((tmp_path / "art" / "report.json").read_text())
    assert len(report["experts"]) == 32 and all(r["bits"] < 16 for r in report["experts"])
    with pytest.raises(SystemExit, match="needs"):
        ss.compile_variant(MODEL, "s2@3", tmp_path / "no", 4)


def test_size_summary_counts_the_baseline_as_one():
    def row(v, n, r):
        q = {"a": {"kl_ratio": {"value": r}}} if r is not None else {"a": {}}
        return {"variant": v, "sequences": n, "experts_differ": 0, "quality": q}

    out = ss.size_summary([row("s16", 16, None), row("s16@16", 16, 1.2), row("s8", 8, 1.1), row("s8/4", 8, 0.9)])
    assert out["16 contiguous"]["mean_kl_ratio"]["a"] == pytest.approx(1.1)
    assert out["8 contiguous"]["mean_kl_ratio"]["a"] == pytest.approx(1.1)
    assert out["8 strided"]["variants"] == ["s8/4"]
