"""Stored bits per weight: what the model files hold per parameter (codes, scales, zero points and
float tensors), reported in the compile report, the manifest and `inspect`, checked against the
files themselves and against an independent count of every ONNX initializer."""

from __future__ import annotations

import json
import math

import onnx
import pytest

from dmpq_compile.cli import main
from dmpq_compile.compiler import CompileConfig, compile_model
from dmpq_compile.frontend import load


@pytest.mark.parametrize("target", ["ort-cpu", "trt-a100"])
def test_stored_bits_match_the_files(tmp_path, tiny_dirs, tiny_corpus, target, capsys):
    model = tiny_dirs("mixtral")
    cfg = CompileConfig.from_dict({"target": target, "allocate": {"allocator": "uniform", "budget": 4.0},
                                   "calibration": {"corpus": str(tiny_corpus), "sequences": 2, "seq_len": 32},
                                   "sensitivity": {"enabled": False}})
    art = compile_model(model, tmp_path / "art", cfg, progress=False)
    storage = json.loads((art / "report.json").read_text())["storage"]
    manifest = json.loads((art / "manifest.json").read_text())
    assert manifest["storage"] == storage
    files = sum(f.stat().st_size for f in art.glob("model.onnx*"))
    assert storage["bytes"] == files
    graph = load(model)
    params = sum(math.prod(graph.weights.shape(k)) for k in graph.weights)
    assert storage["params"] == params
    assert storage["bits_per_weight"] == pytest.approx(8 * files / params, abs=1e-3)
    experts = storage["experts"]
    assert experts["code_bits"] == pytest.approx(4.0)
    # 4-bit codes plus one scale and one zero point per 64 weights: above 4, below 4 + 2 * 32 / 64
    assert 4.0 < experts["bits_per_weight"] < 5.0
    proto = onnx.load(str(art / "model.onnx"), load_external_data=False)
    init_bytes = 0
    for t in proto.graph.initializer:
        loc = {e.key: e.value for e in t.external_data}
        init_bytes += int(loc["length"]) if "length" in loc else len(t.raw_data) or onnx.numpy_helper.to_array(t).nbytes
    assert experts["bytes"] <= init_bytes < files  # the graph's structure is the rest
    assert storage["other"]["bytes"] == files - experts["bytes"]
    per_expert = [e["bits_per_weight"] for e in manifest["experts"].values()]
    assert min(per_expert) > 4.0 and max(per_expert) < 5.0
    assert main(["inspect", str(art)]) == 0
    text = capsys.readouterr().out
    assert f"stored bits per weight: {storage['bits_per_weight']:.3f}" in text and "code bits" in text


def test_group_size_storage_ort_cpu():
    """What docs/defaults.md ("Group size") quotes: a 4-bit weight stores 4.31 bits at group 64 and 4.16 at
    group 128 (float16 scales, 4-bit zero points), and a K narrower than the group is padded to a whole
    group, so olmoe-tiny's 64-wide down projections store about twice the bits at group 128."""
    from dmpq_compile.compiler import get_backend

    b = get_backend("ort-cpu")

    def bpw(n: int, k: int, group: int) -> float:
        return 8 * b.weight_bytes(n, k, 4, group) / (n * k)

    assert bpw(1024, 2048, 64) == pytest.approx(4 + (16 + 4) / 64)
    assert bpw(1024, 2048, 128) == pytest.approx(4 + (16 + 4) / 128)
    assert bpw(128, 64, 64) == pytest.approx(bpw(1024, 2048, 64) + 0.0625)  # one group per row: its zero point fills a byte
    assert bpw(128, 64, 128) > 1.9 * bpw(128, 64, 64)  # the padded half stores codes too
