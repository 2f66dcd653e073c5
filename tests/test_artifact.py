"""The artifact folder: layout, manifest contents, atomic writing and refusals."""

import hashlib
import json
import logging
from pathlib import Path

import numpy as np
import pytest
from dmpq_compile.backends.base import BackendError
from dmpq_compile.backends.ort_cpu import OrtCpuBackend
from dmpq_compile.passes.infra.base import PassContext
from dmpq_compile.passes.quantize import QuantizePass

from dmpq_compile.artifact import write_artifact
from dmpq_compile.frontend import load
from dmpq_compile.runtime.manifest import ArtifactError

BITS_CYCLE = (2, 4, 8, 16)


@pytest.fixture(scope="module")
def graph(tiny_dirs):
    g = load(tiny_dirs("olmoe"))
    for i, node in enumerate(g.experts()):
        g.annotate(node.id, "bits", BITS_CYCLE[i % 4])
    QuantizePass(group_size=32).call(g, PassContext(progress=False, backend=OrtCpuBackend()))
    return g


def leftovers(folder):
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


def test_layout_and_manifest(graph, tmp_path):
    report = {"ppl": np.float32(12.5), "bits": np.array([2, 4])}
    out = write_artifact(graph, OrtCpuBackend(), tmp_path / "art", report=report)
    names = sorted(p.name for p in out.iterdir())
    assert {"manifest.json", "report.json", "model.onnx", "tokenizer.json"} <= set(names)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["format"] == "dmpq-artifact" and manifest["format_version"] == 1
    assert manifest["created"].endswith("Z")
    assert manifest["source"]["config"] == graph.meta["source_config"]
    assert manifest["source"]["model_type"] == "olmoe"
    assert manifest["target"]["backend"] == "ort-cpu" and manifest["target"]["model_file"] == "model.onnx"
    assert len(manifest["target"]["io"]["kv_cache"]) == graph.meta["num_layers"]
    assert set(manifest["versions"]) == {"dmpq-compile", "onnx", "onnxruntime", "torch", "transformers"}
    assert manifest["versions"]["onnx"]
    for node in graph.experts():
        entry = manifest["experts"][node.id]
        assert entry["bits"] == node.ann["bits"] and entry["layer"] == node.attrs["layer"]
        assert entry["group_size"] == (None if node.ann["bits"] == 16 else 32)
        assert entry["method"] == (None if node.ann["bits"] == 16 else "rtn")
        assert entry["spec"]["bits"] == node.ann["bits"]
    assert manifest["quantization"]["bits_histogram"] == {"2": 3, "4": 3, "8": 3, "16": 3}
    assert set(manifest["files"]) == set(names) - {"manifest.json"}
    for rel, entry in manifest["files"].items():
        data = (out / rel).read_bytes()
        assert entry == {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
    report = json.loads((out / "report.json").read_text())
    emitted = report.pop("emit")  # the writer adds the emission's own wall time and peak RSS
    storage = report.pop("storage")  # and the files' stored bits per weight
    assert report == {"ppl": 12.5, "bits": [2, 4]} and emitted["seconds"] > 0 and emitted["peak_rss_mb"] > 0
    assert storage == manifest["storage"] and storage["bytes"] == (out / "model.onnx").stat().st_size
    assert storage["scales"] == {"float16": 9}  # the 2/4/8-bit experts, in ort-cpu's format
    assert leftovers(tmp_path) == []


def test_refuses_to_overwrite_unless_asked(graph, tmp_path):
    out = write_artifact(graph, OrtCpuBackend(), tmp_path / "art", report={"run": 1})
    with pytest.raises(ArtifactError, match="already exists"):
        write_artifact(graph, OrtCpuBackend(), out, report={"run": 2})
    assert json.loads((out / "report.json").read_text())["run"] == 1
    write_artifact(graph, OrtCpuBackend(), out, report={"run": 3}, overwrite=True)
    assert json.loads((out / "report.json").read_text())["run"] == 3
    assert leftovers(tmp_path) == []
    (tmp_path / "file").write_text("x")
    with pytest.raises(ArtifactError, match="not a folder"):
        write_artifact(graph, OrtCpuBackend(), tmp_path / "file", overwrite=True)


def test_failures_leave_nothing_behind(graph, tmp_path):
    broken = graph.copy()
    node = broken.experts()[0]
    broken.annotate(node.id, "bits", 3)
    with pytest.raises(BackendError, match="supports bits"):
        write_artifact(broken, OrtCpuBackend(), tmp_path / "a")
    unquantized = graph.copy()
    unquantized.annotate(node.id, "bits", 8 if node.ann["bits"] != 8 else 4)
    with pytest.raises(BackendError, match="quantize pass"):
        write_artifact(unquantized, OrtCpuBackend(), tmp_path / "b")
    with pytest.raises(ArtifactError, match="JSON"):
        write_artifact(graph, OrtCpuBackend(), tmp_path / "c", report={"x": object()})
    missing_tok = graph.copy()
    missing_tok.meta["tokenizer_files"] = ["tokenizer.json", "vocab-that-vanished.json"]
    with pytest.raises(ArtifactError, match="vocab-that-vanished.json"):
        write_artifact(missing_tok, OrtCpuBackend(), tmp_path / "d")
    assert list(tmp_path.iterdir()) == []


def test_emit_options_reach_the_backend(graph, tmp_path):
    out = write_artifact(graph, OrtCpuBackend(), tmp_path / "art",
                         emit_options={"dispatch": "dense", "accuracy_level": 0, "external_data": True})
    target = json.loads((out / "manifest.json").read_text())["target"]
    assert target["dispatch"] == "dense" and target["accuracy_level"] == 0
    assert target["external_data_file"] == "model.onnx.data"
    assert "model.onnx.data" in json.loads((out / "manifest.json").read_text())["files"]


def test_without_tokenizer_warns(graph, tmp_path, caplog):
    bare = graph.copy()
    bare.meta["tokenizer_files"] = []
    with caplog.at_level(logging.WARNING, logger="dmpq_compile.artifact"):
        out = write_artifact(bare, OrtCpuBackend(), tmp_path / "art")
    assert "no tokenizer.json" in caplog.text
    assert json.loads((out / "manifest.json").read_text())["tokenizer"]["tokenizer_file"] is None


def test_tokenizer_json_is_written_compact_and_tokenizes_the_same(graph, tmp_path):
    from tokenizers import Tokenizer

    src = Path(graph.meta["source"])
    indented = src / "tokenizer.json"
    assert b"\n  " in indented.read_bytes()  # the checkpoint's file, as Hugging Face writes it
    out = write_artifact(graph, OrtCpuBackend(), tmp_path / "art")
    compact = out / "tokenizer.json"
    assert json.loads(compact.read_text()) == json.loads(indented.read_text())
    assert compact.stat().st_size < 0.8 * indented.stat().st_size and b"\n" not in compact.read_bytes()
    text = "def f(x):\n    return x ** 2  # ünïcode"
    assert Tokenizer.from_file(str(compact)).encode(text).ids == Tokenizer.from_file(str(indented)).encode(text).ids
    for name in graph.meta["tokenizer_files"]:  # every file is there; a non-JSON one byte for byte
        if not name.endswith(".json"):
            assert (out / name).read_bytes() == (src / name).read_bytes()


def test_backend_must_be_an_instance(graph, tmp_path):
    with pytest.raises(TypeError, match="Backend instance"):
        write_artifact(graph, "ort-cpu", tmp_path / "art")


def test_prebuilt_files_become_an_artifact_the_runtime_runs(graph, tmp_path):
    """Model files built elsewhere (a peer baseline) are moved in, listed, checksummed and runnable."""
    from dmpq_compile.artifact import write_prebuilt_artifact
    from dmpq_compile.runtime import load as load_artifact

    made = write_artifact(graph, OrtCpuBackend(), tmp_path / "made")
    target = json.loads((made / "manifest.json").read_text())["target"]
    staged = tmp_path / "staged"
    staged.mkdir()
    (made / "model.onnx").rename(staged / "model.onnx")
    target = {**target, "producer": {"tool": "elsewhere"}}
    first = graph.experts()[0].id
    weights = {first: {"tensors": ["w.a", "w.b"], "bytes": 123}}  # as the packager measured them
    out = write_prebuilt_artifact(graph, [staged / "model.onnx"], {**target, "expert_weights": weights},
                                  tmp_path / "pre", report={"peer": 1})
    assert not (staged / "model.onnx").exists()  # moved, not copied
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["target"] == target and next(iter(manifest["target"])) == "backend"
    assert manifest["experts"][first]["tensors"] == ["w.a", "w.b"] and manifest["experts"][first]["bytes"] == 123
    assert {"model.onnx", "report.json", "tokenizer.json"} <= set(manifest["files"])
    assert json.loads((out / "report.json").read_text())["peer"] == 1
    assert manifest["experts"][graph.experts()[0].id]["bits"] == graph.experts()[0].ann["bits"]
    session = load_artifact(out)
    logits, _ = session.forward(np.zeros((1, 3), dtype=np.int64))
    assert logits.shape[:2] == (1, 3)
    assert leftovers(tmp_path) == []


def test_prebuilt_needs_a_backend_and_its_files(graph, tmp_path):
    from dmpq_compile.artifact import write_prebuilt_artifact

    (tmp_path / "model.onnx").write_bytes(b"x")
    with pytest.raises(ArtifactError, match="target\\['backend'\\]"):
        write_prebuilt_artifact(graph, [tmp_path / "model.onnx"], {"format": "onnx"}, tmp_path / "a")
    with pytest.raises(ArtifactError, match="missing model files"):
        write_prebuilt_artifact(graph, [tmp_path / "gone.onnx"], {"backend": "ort-cpu"}, tmp_path / "b")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx"]
