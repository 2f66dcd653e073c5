"""MODEL on the command line: a folder, or a hub id found offline in the Hugging Face cache;
a bare MODEL means compile, and -o defaults to NAME-TARGET."""

from __future__ import annotations

import shutil

import pytest

from dmpq_compile.cli import main
from dmpq_compile.commands.compile import default_out
from dmpq_compile.frontend.source import ModelNotFoundError, resolve_model


def _fake_cache(root, repo, src):
    snap = root / f"models--{repo.replace('/', '--')}" / "snapshots" / "abc123"
    shutil.copytree(src, snap)
    (root / f"models--{repo.replace('/', '--')}" / "refs").mkdir()
    (root / f"models--{repo.replace('/', '--')}" / "refs" / "main").write_text("abc123")
    return snap


def test_hub_id_is_found_in_the_local_cache_and_missing_ones_name_the_cache(tmp_path, tiny_dirs, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    snap = _fake_cache(tmp_path / "hub", "acme/tiny-moe", tiny_dirs("mixtral"))
    assert resolve_model("acme/tiny-moe").resolve() == snap.resolve()
    with pytest.raises(ModelNotFoundError, match=r"acme/other.*Hugging Face cache.*hub"):
        resolve_model("acme/other")
    with pytest.raises(ModelNotFoundError, match="is a file"):
        resolve_model(snap / "config.json")


def test_default_output_is_named_after_model_and_target():
    assert str(default_out("models/OLMoE-1B-7B/", "trt-a100")) == "OLMoE-1B-7B-trt-a100"
    assert str(default_out("allenai/OLMoE-1B-7B-0924", "ort-cpu")) == "OLMoE-1B-7B-0924-ort-cpu"


def test_bare_model_means_compile_with_default_output(tmp_path, tiny_dirs, tiny_corpus, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    model = tiny_dirs("mixtral")
    rc = main([str(model), "--target", "ort-cpu", "--allocator", "uniform", "--budget-code-bits", "4",
               "--calib-corpus", str(tiny_corpus), "--calib-sequences", "2", "--seq-len", "32", "--no-progress"])
    assert rc == 0, capsys.readouterr().err
    assert (tmp_path / f"{model.name}-ort-cpu" / "manifest.json").is_file()
    assert main(["compil", "x"]) == 2 and "neither a command" in capsys.readouterr().err
