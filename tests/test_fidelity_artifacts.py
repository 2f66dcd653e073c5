"""Artifact hygiene: long prompts are refused or truncated aloud, `check` verifies checksums first,
`eval` recognises an artifact without its manifest, stale `.partial` folders are cleaned, and the
artifact-only commands run without torch and transformers."""

import json
import logging
import os
import shutil
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

from dmpq_compile import runtime
from dmpq_compile.cli import main

MAX_POS = 24
PROMPT = "the expert router sends each token to a few experts and the model adds their weighted outputs"


@pytest.fixture(scope="module")
def artifact(tmp_path_factory):
    """A tiny OLMoE artifact with a short context (24 positions) and its weights in model.onnx.data."""
    from dmpq_compile.backends.ort_cpu import OrtCpuBackend
    from dmpq_compile.passes.infra.base import PassContext
    from dmpq_compile.passes.quantize import QuantizePass

    from dmpq_compile.artifact import write_artifact
    from dmpq_compile.frontend import load
    from dmpq_compile.testing import make_tiny_checkpoint

    root = tmp_path_factory.mktemp("fid")
    graph = load(make_tiny_checkpoint("olmoe", root / "ckpt", max_position_embeddings=MAX_POS))
    for i, node in enumerate(graph.experts()):
        graph.annotate(node.id, "bits", (4, 8)[i % 2])
    QuantizePass(group_size=32).call(graph, PassContext(progress=False))
    out = write_artifact(graph, OrtCpuBackend(), root / "art", emit_options={"external_data": True})
    assert (out / "model.onnx.data").is_file()
    return out


@pytest.fixture(scope="module")
def model(artifact):
    return runtime.load(artifact, threads=1)


@pytest.fixture
def copy(artifact, tmp_path):
    return shutil.copytree(artifact, tmp_path / "copy")


# -- 2: long prompts ---------------------------------------------------------------------------
def test_runtime_refuses_positions_past_the_context(model):
    ids = model.encode(PROMPT)
    assert model.max_positions == MAX_POS and len(ids) + 4 > MAX_POS
    with pytest.raises(ValueError, match=f"max_position_embeddings {MAX_POS}.*truncate=True"):
        model.generate(PROMPT, max_new_tokens=4)
    with pytest.raises(ValueError, match=f"max_position_embeddings {MAX_POS}"):
        list(model.generate_ids(ids, max_new_tokens=4))
    with pytest.raises(ValueError, match=r"exceed this model's max_position_embeddings"):
        model.logits(np.zeros(MAX_POS + 1, dtype=np.int64))
    _, past = model.forward(np.zeros(MAX_POS, dtype=np.int64))
    with pytest.raises(ValueError, match=rf"{MAX_POS + 1} positions \({MAX_POS} cached \+ 1 new\)"):
        model.forward([[1]], past)
    with pytest.raises(ValueError, match="score needs the text to fit"):
        model.score_ids(list(range(MAX_POS + 1)))
    with pytest.raises(ValueError, match="leaves no room for the prompt"):
        model.generate("the", max_new_tokens=MAX_POS, truncate=True)


def test_truncate_keeps_the_newest_prompt_tokens_and_warns(model, caplog):
    ids = model.encode(PROMPT)
    kept = ids[len(ids) + 4 - MAX_POS:]
    model.eos_token_ids = frozenset()
    try:
        with caplog.at_level(logging.WARNING, logger="dmpq_compile.runtime"):
            got = list(model.generate_ids(ids, max_new_tokens=4, truncate=True))
        assert got == list(model.generate_ids(kept, max_new_tokens=4))
        assert f"dropped the oldest {len(ids) + 4 - MAX_POS}" in caplog.text
        assert model.generate(PROMPT, max_new_tokens=4, truncate=True) == model.decode(got)
    finally:
        model.eos_token_ids = frozenset(model.manifest["tokenizer"]["eos_token_ids"])


def test_cli_run_says_whether_it_refuses_or_truncates(artifact, capsys, caplog):
    """The refusal is the error line; the truncation warning goes to stderr through logging
    (seen in a real process in test_artifact_commands_run_without_torch_or_transformers)."""
    assert main(["run", str(artifact), PROMPT, "--max-new-tokens", "4", "--threads", "1"]) == 1
    err = capsys.readouterr().err
    assert f"max_position_embeddings {MAX_POS}" in err and "run --truncate" in err
    with caplog.at_level(logging.WARNING, logger="dmpq_compile.runtime"):
        assert main(["run", str(artifact), PROMPT, "--max-new-tokens", "4", "--threads", "1", "--truncate"]) == 0
    assert "dropped the oldest" in caplog.text


def test_eval_refuses_windows_longer_than_the_context(artifact, capsys):
    assert main(["eval", str(artifact), "--corpus", "unused", "--context", str(MAX_POS + 1), "--no-progress"]) == 1
    assert f"--context {MAX_POS + 1} is longer than" in capsys.readouterr().err


# -- 3: check verifies checksums, and hands onnx.checker a path --------------------------------
def _flip_byte(path, offset=100):
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


def _check(argv, capsys):
    """(exit status, stdout, stderr) of `dmpq-compile check`; reaching the verdict of the ort-cpu
    checks means verification passed."""
    rc = main(["check", *argv])
    out, err = capsys.readouterr()
    return rc, out, err


def test_check_fails_on_a_flipped_byte_in_the_weights(copy, capsys):
    rc, out, _ = _check([str(copy)], capsys)
    assert rc == 0 and "passes ort-cpu checks" in out
    _flip_byte(copy / "model.onnx.data")
    rc, out, err = _check([str(copy)], capsys)
    assert rc == 1 and "model.onnx.data does not match its sha256" in err and "ort-cpu checks" not in out
    rc, out, err = _check([str(copy / "model.onnx")], capsys)  # the model file itself: its folder is verified
    assert rc == 1 and "does not match its sha256" in err
    rc, out, err = _check([str(copy), "--no-verify"], capsys)
    assert "ort-cpu checks" in out and "sha256" not in err


def test_check_runs_the_onnx_checker_on_the_path(copy, monkeypatch, capsys):
    """onnx.checker on a loaded proto fails past 2 GB; on a path it streams the external data."""
    import onnx

    seen = []
    real = onnx.checker.check_model
    monkeypatch.setattr(onnx.checker, "check_model", lambda model, *a, **k: (seen.append(model), real(model, *a, **k)))
    _, out, _ = _check([str(copy)], capsys)
    assert "ort-cpu checks" in out
    assert seen and all(isinstance(m, str) for m in seen)


def test_check_reports_an_invalid_onnx_model(copy, capsys):
    import onnx

    model = onnx.load(str(copy / "model.onnx"), load_external_data=False)
    model.graph.node[0].input[0] = "no_such_tensor"
    onnx.save(model, str(copy / "model.onnx"))
    rc, out, _ = _check([str(copy), "--no-verify"], capsys)
    assert rc == 1 and "[onnx-checker]" in out and "FAILS onnx.checker" in out


# -- 4: eval on an artifact whose manifest is missing ----------------------------------------
def test_eval_names_the_missing_manifest(copy, capsys):
    (copy / "manifest.json").unlink()
    assert main(["eval", str(copy), "--corpus", str(copy), "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert "manifest.json is missing" in err and "artifact" in err and "config.json" not in err


# -- 6: stale temporary folders of a killed write --------------------------------------------
def test_a_new_write_removes_stale_partials_only(tmp_path):
    from dmpq_compile.backends.ort_cpu import OrtCpuBackend

    from dmpq_compile.artifact import OWNER_FILE, _owner_record, write_artifact
    from dmpq_compile.frontend import load
    from dmpq_compile.testing import make_tiny_checkpoint

    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True,
                          check=True)
    dead = {**_owner_record(), "pid": int(done.stdout), "start": None}  # a process that has exited
    folders = {  # name -> (owner record or None, expected to survive)
        ".art.k1l2m3n4.partial": (dead, False),
        ".art.a1b2c3d4.partial": (_owner_record(), True),  # this (live) process
        ".art.reused00.partial": ({**_owner_record(), "start": -1}, False),  # our pid, another process's start
        ".art.v2.x9y8z7w6.partial": (dead, True),  # the temp folder of another artifact, art.v2
        ".art.legacy00.partial": (None, True),  # no owner record, recent: may still be written
        ".art.legacy11.partial": (None, False),  # no owner record, untouched for two days
    }
    for name, (owner, _) in folders.items():
        (tmp_path / name).mkdir()
        if owner is not None:
            (tmp_path / name / OWNER_FILE).write_text(json.dumps(owner))
    two_days_ago = time.time() - 2 * 86400
    os.utime(tmp_path / ".art.legacy11.partial", (two_days_ago, two_days_ago))
    graph = load(make_tiny_checkpoint("olmoe", tmp_path / "ckpt"))
    for node in graph.experts():
        graph.annotate(node.id, "bits", 16)
    out = write_artifact(graph, OrtCpuBackend(), tmp_path / "art")
    assert {name: (tmp_path / name).exists() for name in folders} == {n: keep for n, (_, keep) in folders.items()}
    assert OWNER_FILE not in json.loads((out / "manifest.json").read_text())["files"]
    assert not (out / OWNER_FILE).exists()
    runtime.load(out)


# -- 7: artifact-only commands need neither torch nor transformers ---------------------------
BLOCKER = """
import sys

class _Block:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("torch", "transformers"):
            raise ImportError("blocked in this test: " + name)
        return None

sys.meta_path.insert(0, _Block())
"""


def test_artifact_commands_run_without_torch_or_transformers(artifact, tmp_path):
    from dmpq_compile.testing import write_tiny_corpus

    (tmp_path / "block").mkdir()
    (tmp_path / "block" / "sitecustomize.py").write_text(textwrap.dedent(BLOCKER))
    corpus = write_tiny_corpus(tmp_path / "corpus", n_files=4, sentences=10)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path / "block"), os.environ.get("PYTHONPATH", "")])}
    probe = subprocess.run([sys.executable, "-c", "import torch"], env=env, capture_output=True, text=True, check=False)
    assert probe.returncode != 0 and "blocked in this test" in probe.stderr
    art = str(artifact)
    commands = [
        ["run", art, PROMPT, "--max-new-tokens", "3", "--threads", "1", "--truncate"],
        ["inspect", art],
        ["check", art],
        ["eval", art, "--corpus", str(corpus), "--split", "all", "--context", "16", "--max-doc-share", "0.5",
         "--no-progress"],
        ["bench", art, "--corpus", str(corpus), "--rounds", "1", "--prefill-tokens", "8",
         "--decode-tokens", "2", "--windows", "8", "--context", "16", "--max-doc-share", "0.5", "--threads", "1",
         "--no-rss", "--no-progress"],
    ]
    for argv in commands:
        done = subprocess.run([sys.executable, "-m", "dmpq_compile.cli", *argv], env=env, capture_output=True,
                              text=True, check=False, timeout=300)
        assert "Traceback" not in done.stderr and "blocked in this test" not in done.stderr, (argv[0], done.stderr)
        assert done.returncode == 0, (argv[0], done.stdout[-2000:], done.stderr[-2000:])
        if argv[0] == "check":
            assert "passes ort-cpu checks" in done.stdout, done.stdout[-500:]
        if argv[0] == "run":
            assert "dropped the oldest" in done.stderr
