"""benchmarks/bench_gptq.py end to end on a small shape: the stacked and per-role GPTQ runs it
times must give the same codes, and the JSON must carry what the README's table quotes."""

from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import bench_gptq


def test_bench_gptq_runs_and_records(tmp_path, capsys):
    out = tmp_path / "gptq.json"
    bench_gptq.main(["--shapes", "256x128", "--rounds", "1", "--tokens", "256", "--out", str(out)])
    result = json.loads(out.read_text())
    (row,) = result["rows"]
    assert row["same_codes"] is True and row["shape"] == "256x128"
    assert set(row["median_s"]) == set(bench_gptq.VARIANTS) and all(v > 0 for v in row["median_s"].values())
    assert row["stacked_over_per_role"] > 0 and "factorise K=256 s" in row and "factorise K=128 s" in row
    assert result["command"].startswith("python benchmarks/bench_gptq.py") and result["commit"]
    assert "same codes: True" in capsys.readouterr().out
