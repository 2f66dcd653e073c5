"""benchmarks/bench_scale.py records the environment its compiles inherit; bench_kv_dtype.py's prototype computes
attention (it refuses to time one that does not) and its graphs run."""

import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import bench_kv_dtype
import bench_scale


def test_scale_results_record_the_tuning_environment(monkeypatch):
    monkeypatch.setenv("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "64")
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    monkeypatch.setenv("HOME_UNRELATED_X", "1")
    env = bench_scale.tuning_env()
    assert env["ONEDNN_PRIMITIVE_CACHE_CAPACITY"] == "64" and env["OMP_NUM_THREADS"] == "2"
    assert "HOME_UNRELATED_X" not in env


@pytest.mark.parametrize("widths", [(2, 4, 4, 64), (2, 8, 2, 64)])
def test_the_kv_prototype_matches_numpy_and_the_onnxruntime_op_runs(widths):
    runners = bench_kv_dtype.prototypes(widths, capacity=96, threads=1)
    if not runners:
        pytest.skip("no C++ compiler for the prototype")
    for runner in runners.values():
        assert runner.check(total=41) < 1e-5
        assert runner.steps(context=8, n=2, warm=1) > 0
    stack = bench_kv_dtype.Stack(widths, "fp32", capacity=96, threads=1)
    assert stack.steps(context=8, n=2, warm=1) > 0
    out = np.asarray(stack.session.run(None, {
        "x": stack.x, "seqlens_k": np.array([0], np.int32), "total_sequence_length": np.array(1, np.int32),
        **{f"{n}.{layer}": np.zeros((1, widths[2], 1, widths[3]), np.float32)
           for layer in range(widths[0]) for n in ("past_key", "past_value")}})[0])
    assert out.shape == (1, 1, widths[1] * widths[3]) and np.isfinite(out).all()
