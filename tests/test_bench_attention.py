"""benchmarks/bench_attention.py runs both attention ops and writes its rows; benchmarks/swap_attention.py turns an
artifact with onnxruntime's attention into one with dmpq's that computes the same logits."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from dmpq_compile.backends.ort_cpu import MODEL_FILE, kernels
from dmpq_compile.backends.ort_cpu.matmulnbits import MatMulNBitsProjection

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import bench_attention
import swap_attention


def test_bench_attention_times_both_ops_after_checking_they_agree(library, tmp_path):
    out = tmp_path / "attention.json"
    assert bench_attention.main(["--model", "qwen3-30b-a3b", "--layers", "2", "--contexts", "9", "--prefill", "7",
                                 "--capacity", "64", "--steps", "1", "--rounds", "1", "--out", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [(r["kind"], r["positions"]) for r in rows] == [("decode", 9), ("prefill", 7)]
    assert all(r["ms"]["ort"] > 0 and r["ms"]["dmpq"] > 0 for r in rows)


def test_swap_attention_gives_the_same_logits_with_dmpqs_op(library, tiny_dirs, tmp_path, monkeypatch):
    from dmpq_compile.backends.onnx_io import decoder_feed
    from test_kernel_dispatch import _emit, _graph, _ids

    graph = _graph(tiny_dirs("qwen3_moe"), (4,), nonexpert_bits=8)  # PanelMatMul: the artifact carries the library
    monkeypatch.setattr(MatMulNBitsProjection, "attention", lambda *a: False)  # onnxruntime's op, as before
    old_sess, old_model, fields = _emit(graph, tmp_path / "old", "kernel", 4)
    monkeypatch.undo()
    assert {n.domain for n in old_model.graph.node if n.op_type == "GroupQueryAttention"} == {"com.microsoft"}
    manifest = {"target": {"custom_ops_library": fields["custom_ops_library"]}, "files": {}}
    (tmp_path / "old" / "manifest.json").write_text(json.dumps(manifest))
    assert swap_attention.swap(tmp_path / "old", tmp_path / "new") == len(
        [n for n in old_model.graph.node if n.op_type == "GroupQueryAttention"])
    new = onnx.load(str(tmp_path / "new" / MODEL_FILE), load_external_data=False)
    assert {n.domain for n in new.graph.node if n.op_type == "GroupQueryAttention"} == {kernels.DOMAIN}
    recorded = json.loads((tmp_path / "new" / "manifest.json").read_text())["files"]
    assert recorded[MODEL_FILE]["bytes"] == (tmp_path / "new" / MODEL_FILE).stat().st_size
    opts = ort.SessionOptions()
    kernels.register(opts, tmp_path / "new" / kernels.ARTIFACT_PATH)
    new_sess = ort.InferenceSession(str(tmp_path / "new" / MODEL_FILE), opts, providers=["CPUExecutionProvider"])
    ids = _ids(graph, (2, 13))
    want = old_sess.run(["logits"], decoder_feed(old_sess, ids))[0]
    got = new_sess.run(["logits"], decoder_feed(new_sess, ids))[0]
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    with pytest.raises(SystemExit, match="exists; give a new folder"):
        swap_attention.swap(tmp_path / "old", tmp_path / "new")
    (tmp_path / "old" / "manifest.json").write_text(json.dumps({"target": {"custom_ops_library": None}}))
    with pytest.raises(SystemExit, match="does not carry dmpq's kernel library"):
        swap_attention.swap(tmp_path / "old", tmp_path / "other")
