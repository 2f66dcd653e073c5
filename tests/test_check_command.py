"""`dmpq-compile check` checks an artifact against its own target: an ort-cpu artifact with
onnxruntime (and onnxruntime-genai where it has a genai_config.json), never with TensorRT's rules.
The trt-a100 checks themselves are tested in test_trt_emit.py and test_trt_compat.py."""

import json
import shutil
import sys
from pathlib import Path

import onnx
import pytest

from dmpq_compile.cli import main

SAMPLE = Path(__file__).resolve().parents[1] / "samples" / "mixtral-tiny"
TRT_WORDS = ("TensorRT", "UINT8", "is not an ONNX operator")


@pytest.fixture(scope="module")
def artifact(tmp_path_factory):
    """samples/mixtral-tiny compiled for ort-cpu (4-bit experts), as a user compiles it."""
    out = tmp_path_factory.mktemp("check") / "art"
    assert main(["compile", str(SAMPLE), "-o", str(out), "--target", "ort-cpu", "--allocator", "uniform",
                 "--no-sensitivity", "--calib-sequences", "4", "--seq-len", "32", "--no-progress", "--no-cache"]) == 0
    return out


@pytest.fixture
def copy(artifact, tmp_path):
    return shutil.copytree(artifact, tmp_path / "copy")


@pytest.fixture
def no_genai(monkeypatch):
    """onnxruntime-genai as if it were not installed (its import raises ImportError)."""
    monkeypatch.setitem(sys.modules, "onnxruntime_genai", None)


def _check(capsys, *argv):
    rc = main(["check", *map(str, argv)])
    out, err = capsys.readouterr()
    return rc, out, err


def test_an_ort_cpu_artifact_passes_with_onnxruntime(artifact, no_genai, capsys):
    assert (artifact / "genai_config.json").is_file()  # every ort-cpu emit writes it
    rc, out, err = _check(capsys, artifact)
    assert rc == 0, out + err
    last = out.strip().splitlines()[-1]
    assert last.startswith(f"{artifact / 'model.onnx'}: passes ort-cpu checks (onnx.checker, onnxruntime ")
    assert last.endswith("(0 errors, 1 warnings)")
    assert "warning: [genai] onnxruntime-genai is not installed" in out and "pip install onnxruntime-genai" in out
    assert not any(word in out + err for word in TRT_WORDS)


def test_an_ort_cpu_artifact_passes_with_onnxruntime_genai(artifact, capsys):
    og = pytest.importorskip("onnxruntime_genai", reason="onnxruntime-genai is not installed")
    rc, out, err = _check(capsys, artifact)
    assert rc == 0, out + err
    assert f"onnxruntime-genai {og.__version__}) (0 errors" in out
    assert not any(word in out + err for word in TRT_WORDS)
    rc, out, _ = _check(capsys, artifact, "--json")
    assert rc == 0 and json.loads(out) == []


def test_a_genai_config_that_onnxruntime_genai_refuses_fails(copy, capsys):
    pytest.importorskip("onnxruntime_genai", reason="onnxruntime-genai is not installed")
    (copy / "genai_config.json").write_text("{not json")
    rc, out, _ = _check(capsys, copy, "--no-verify")
    assert rc == 1 and "error: [genai] onnxruntime-genai" in out and "cannot parse" in out
    assert "FAILS ort-cpu checks" in out


def test_a_changed_model_file_fails_its_checksum(copy, capsys):
    data = bytearray((copy / "model.onnx").read_bytes())
    data[-100] ^= 0xFF
    (copy / "model.onnx").write_bytes(bytes(data))
    rc, out, err = _check(capsys, copy)
    assert rc == 1 and "model.onnx does not match its sha256" in err and out == ""


def test_a_model_onnxruntime_cannot_load_fails(copy, no_genai, capsys):
    """onnx.checker does not know com.microsoft operators, so only loading the model finds this one."""
    model = onnx.load(str(copy / "model.onnx"), load_external_data=False)
    node = next(n for n in _nodes(model.graph) if n.domain == "com.microsoft")
    node.op_type += "Typo"
    onnx.save(model, str(copy / "model.onnx"))
    rc, out, _ = _check(capsys, copy, "--no-verify")
    assert rc == 1 and "error: [onnxruntime] onnxruntime" in out and "cannot load model.onnx on the CPU" in out
    assert node.op_type in out and "FAILS ort-cpu checks" in out


def _nodes(graph):
    """Every node of ``graph`` and of its subgraphs (If branches)."""
    for node in graph.node:
        yield node
        for attr in node.attribute:
            yield from (n for g in [attr.g, *attr.graphs] for n in _nodes(g))


def test_a_bare_onnx_file_is_checked_as_target(artifact, tmp_path, capsys):
    """Without a manifest beside it, a .onnx file gets the TensorRT checks, as before, or --target's."""
    bare = tmp_path / "bare"
    bare.mkdir()
    for f in artifact.glob("model.onnx*"):
        shutil.copy(f, bare / f.name)
    rc, out, _ = _check(capsys, bare / "model.onnx", "--target", "ort-cpu")
    assert rc == 0 and "passes ort-cpu checks" in out
    rc, out, _ = _check(capsys, bare / "model.onnx")
    assert rc == 1 and "FAILS TensorRT 10.x checks" in out
    rc, out, _ = _check(capsys, artifact / "model.onnx")  # inside the artifact: its manifest names the target
    assert "ort-cpu checks" in out and "TensorRT" not in out


def test_target_must_match_the_manifest(artifact, capsys):
    rc, _, err = _check(capsys, artifact, "--target", "trt-a100")
    assert rc == 1 and "names target 'ort-cpu', not --target trt-a100" in err


def test_an_unknown_target_is_a_clear_error(copy, capsys):
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["target"]["backend"] = "npu-x1"
    (copy / "manifest.json").write_text(json.dumps(manifest))
    rc, out, err = _check(capsys, copy)
    assert rc == 1 and out == ""
    assert err.strip() == f"dmpq-compile check: error: {copy} targets 'npu-x1'; check knows the targets ort-cpu, " \
                          "trt-a100"


def test_help_names_both_targets(capsys):
    with pytest.raises(SystemExit) as done:
        main(["check", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert done.value.code == 0
    assert "ort-cpu" in out and "trt-a100" in out and "onnxruntime-genai" in out and "--target" in out
