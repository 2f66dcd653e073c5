"""benchmarks/group_size_budget.py end to end on mixtral-tiny (few windows, one domain): both group sizes
compile at the same default stored-bits budget, the controls store fewer bits at the larger group, and
the JSON carries the paired ratios and what the docs quote."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from dmpq_compile.eval import CorpusError
from dmpq_compile.eval.corpus import pydoc_dir

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import group_size_budget


@pytest.mark.corpus
@pytest.mark.slow
def test_group_size_budget_runs_and_records(tmp_path, capsys):
    try:
        pydoc_dir()
    except CorpusError:
        pytest.skip("python3.11-doc is not installed")
    out = tmp_path / "gs.json"
    group_size_budget.main(["--models", str(ROOT / "samples" / "mixtral-tiny"), "--corpora", "pydoc",
                            "--windows", "8", "--json", str(out)])
    result = json.loads(out.read_text())
    assert result["command"].startswith("python benchmarks/group_size_budget.py") and result["commit"]
    assert result["split"] == "dev" and result["groups"] == [64, 128]
    (m,) = result["models"]
    arts = m["artifacts"]
    assert set(arts) == {"default-g64", "default-g128", "uniform4-g64", "uniform4-g128"}
    assert {arts[n]["group_size"] for n in ("default-g64", "uniform4-g64")} == {64}
    assert {arts[n]["group_size"] for n in ("default-g128", "uniform4-g128")} == {128}
    # the same stored-bits budget for both defaults, and both within it
    assert arts["default-g64"]["budget"] == arts["default-g128"]["budget"] == "4.5 stored-bits"
    assert max(arts["default-g64"]["weights_bpw"], arts["default-g128"]["weights_bpw"]) <= 4.5
    # every weight at 4 bits: a group of 128 stores fewer scales and zero points (K is 128 or 256 here)
    assert arts["uniform4-g64"]["experts_by_bits"] == arts["uniform4-g128"]["experts_by_bits"] == {"4": 32}
    assert arts["uniform4-g128"]["weights_bpw"] < arts["uniform4-g64"]["weights_bpw"]
    s = m["sets"]["pydoc/dev"]
    assert 0 < s["windows"] <= 8 and s["set"] == "pydoc/dev"
    for key in ("default-g128/default-g64", "uniform4-g128/uniform4-g64"):
        r = s["pairs"][key]
        assert r["kl_ratio"]["lo"] <= r["kl_ratio"]["value"] <= r["kl_ratio"]["hi"]
        assert r["ppl_ratio"]["lo"] <= r["ppl_ratio"]["value"] <= r["ppl_ratio"]["hi"]
        pooled = result["pooled"][f"pydoc/dev {key}"]
        assert pooled["models"] == 1  # one model: the pooled ratio is its own
        assert pooled["kl_ratio_geomean"]["value"] == pytest.approx(r["kl_ratio"]["value"])
    assert all(q["kl"]["value"] > 0 for q in s["models"].values())
    assert "pooled over 1 models" in capsys.readouterr().out
