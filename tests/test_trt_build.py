"""Engine build and execution for trt-a100 artifacts.

Tests marked ``tensorrt`` need the TensorRT Python package and a CUDA GPU and are skipped
elsewhere; the error raised without TensorRT, the profile/trtexec helpers and the manifest update
are tested everywhere.
"""

import importlib.util
import json
import sys

import numpy as np
import pytest
import torch
from dmpq_compile.backends import BackendError, get_backend
from dmpq_compile.backends.trt.backend import keep_fp32_names
from dmpq_compile.backends.trt.build import (
    ENGINE_FILE,
    TensorRTNotInstalled,
    default_profile,
    import_tensorrt,
    trtexec_command,
)
from dmpq_compile.backends.trt.qdq import reference_weights
from dmpq_compile.passes import PassContext, make_pass

from dmpq_compile.artifact import write_artifact
from dmpq_compile.cli import main as cli
from dmpq_compile.engine import build_engine, open_engine, update_manifest
from dmpq_compile.frontend import load
from dmpq_compile.ir.interpreter import Interpreter, RunOptions
from dmpq_compile.runtime.manifest import load_manifest, sha256_file

HAS_TRT = importlib.util.find_spec("tensorrt") is not None
SKIP_REASON = "tensorrt is not installed" if not HAS_TRT else "no CUDA GPU"


@pytest.fixture(scope="module")
def artifact(tiny_dirs, tmp_path_factory):
    g = load(tiny_dirs("qwen3_moe"))
    for i, n in enumerate(g.experts()):
        g.annotate(n.id, "bits", (4, 8, 16)[i % 3])
    backend = get_backend("trt-a100")
    g = make_pass("quantize", group_size=32).call(g, PassContext(progress=False, backend=backend)).graph
    out = write_artifact(g, backend, tmp_path_factory.mktemp("trt") / "art")
    return g, out


def test_missing_tensorrt_says_what_to_install(monkeypatch, artifact, capsys):
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # makes `import tensorrt` raise ImportError
    with pytest.raises(TensorRTNotInstalled) as e:
        import_tensorrt()
    msg = str(e.value)
    assert "pip install 'dmpq-compile[trt]'" in msg and "NVIDIA" in msg and "TensorRT 10.x" in msg
    assert "trtexec --onnx=" in msg and "--stronglyTyped" in msg
    with pytest.raises(TensorRTNotInstalled):
        build_engine(artifact[1])
    assert cli(["build", str(artifact[1])]) == 1
    assert "dmpq-compile[trt]" in capsys.readouterr().err


def test_profile_and_trtexec_command(artifact):
    target = load_manifest(artifact[1])["target"]
    prof = default_profile(target["io"], 256, max_sequence=64, max_context=128)
    assert prof["input_ids"] == {"min": [1, 1], "opt": [1, 1], "max": [1, 64]}
    key = target["io"]["kv_cache"][0]["past_key"]
    assert prof[key]["min"][2] == 0 and prof[key]["max"][2] == 127
    cmd = trtexec_command(prof)
    assert cmd.startswith("trtexec --onnx=model.onnx --stronglyTyped --saveEngine=engine.plan")
    assert f"--maxShapes=input_ids:1x64,{key}:1x2x127x16" in cmd
    with pytest.raises(BackendError, match="max_sequence"):
        default_profile(target["io"], 256, max_sequence=300, max_context=128)


def test_manifest_update_is_atomic_and_verifiable(artifact, tmp_path):
    import shutil

    root = tmp_path / "copy"
    shutil.copytree(artifact[1], root)
    (root / ENGINE_FILE).write_bytes(b"not really a plan")
    update_manifest(root, {"file": ENGINE_FILE, "sha256": sha256_file(root / ENGINE_FILE),
                           "bytes": (root / ENGINE_FILE).stat().st_size, "tensorrt_version": "10.x-test"})
    manifest = load_manifest(root, verify=True)  # every listed file, engine.plan included, verifies
    assert manifest["target"]["engine"]["tensorrt_version"] == "10.x-test"
    assert ENGINE_FILE in manifest["files"] and not list(root.glob(".manifest.json.*"))


@pytest.mark.tensorrt
@pytest.mark.skipif(not (HAS_TRT and torch.cuda.is_available()), reason=SKIP_REASON)
def test_build_and_run_engine_matches_reference(artifact):
    g, root = artifact
    plan = build_engine(root, workspace_gb=2.0, max_sequence=16, max_context=64)
    manifest = load_manifest(root, verify=True)
    engine = manifest["target"]["engine"]
    assert plan.name == ENGINE_FILE and engine["sha256"] == sha256_file(plan)
    assert engine["tensorrt_version"].startswith("10.") and engine["gpu"]["name"]
    assert (root / "timing.cache").stat().st_size > 0
    ids = ((np.arange(10).reshape(1, 10) * 7 + 3) % 96).astype(np.int64)
    runner = open_engine(root)
    logits, past = runner.forward(ids)
    override = reference_weights(g, "fp16", keep_fp32_names(g))
    with torch.no_grad():
        ref = Interpreter(g).run(torch.from_numpy(ids), RunOptions(weight_override=override))["lm_head"].numpy()
    assert np.abs(logits.float().cpu().numpy() - ref).max() < 2e-2
    step, _ = runner.forward(ids[:, -1:], [p[:, :, :-1] for p in past])
    assert np.abs(step.float().cpu().numpy()[:, 0] - logits.float().cpu().numpy()[:, -1]).max() < 2e-2
    assert json.loads((root / "manifest.json").read_text())["files"][ENGINE_FILE]["bytes"] == plan.stat().st_size
