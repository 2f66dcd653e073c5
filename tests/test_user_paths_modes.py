"""Every file of an artifact gets the mode a plain new file gets (umask), with
the process-wide umask never touched (setting it, even for a moment, races with other threads)."""

import os
import stat

import pytest
from dmpq_compile.backends import get_backend
from dmpq_compile.passes import PassContext, make_pass

from dmpq_compile.artifact import write_artifact
from dmpq_compile.fileio import atomic_write_bytes
from dmpq_compile.frontend import load

_set_umask = os.umask  # the tests' own: no_umask_calls replaces os.umask


@pytest.fixture(params=[0o022, 0o027])
def umask(request):
    old = _set_umask(request.param)
    yield request.param
    _set_umask(old)


@pytest.fixture
def no_umask_calls(monkeypatch):
    """Fail on any os.umask call: os.umask(x) sets the umask process-wide, even just to read it."""
    monkeypatch.setattr(os, "umask", lambda *_: pytest.fail("os.umask called: it changes the umask process-wide"))


def _modes(root):
    files, folders = {}, {oct(stat.S_IMODE(root.stat().st_mode))}
    for p in root.rglob("*"):
        mode = oct(stat.S_IMODE(p.stat().st_mode))
        if p.is_dir():
            folders.add(mode)
        else:
            files[p.relative_to(root).as_posix()] = mode
    return files, folders


@pytest.fixture(scope="module")
def quantized(tiny_dirs):
    """target -> the tiny Mixtral at 4 and 8 bits, quantized in that target's weight formats."""
    graphs = {}

    def get(target):
        if target not in graphs:
            g = load(tiny_dirs("mixtral"))
            for i, n in enumerate(g.experts()):
                g.annotate(n.id, "bits", (4, 8)[i % 2])
            ctx = PassContext(progress=False, backend=get_backend(target))
            graphs[target] = make_pass("quantize", group_size=32).call(g, ctx).graph
        return graphs[target]

    return get


@pytest.mark.parametrize("target", ["trt-a100", "ort-cpu"])
def test_every_artifact_file_follows_the_umask(quantized, tmp_path, umask, target):
    g = quantized(target)
    opts = {"external_data": True} if target == "ort-cpu" else {}
    out = write_artifact(g, get_backend(target), tmp_path / "art", emit_options=opts)
    files, folders = _modes(out)
    assert "model.onnx.data" in files  # written 0600 by onnx before the fix
    assert set(files.values()) == {oct(0o666 & ~umask)}, files
    assert folders == {oct(0o777 & ~umask)}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["art"]  # no probe or partial folder left


def test_writer_never_sets_the_umask(quantized, tmp_path, umask, no_umask_calls):
    out = write_artifact(quantized("trt-a100"), get_backend("trt-a100"), tmp_path / "art")
    assert stat.S_IMODE((out / "model.onnx.data").stat().st_mode) == 0o666 & ~umask


def test_atomic_write_gives_new_files_the_default_mode_and_keeps_an_existing_one(tmp_path, umask, no_umask_calls):
    new = atomic_write_bytes(tmp_path / "engine.plan", b"x")  # mkstemp alone made it 0600
    assert stat.S_IMODE(new.stat().st_mode) == 0o666 & ~umask
    new.chmod(0o640)
    atomic_write_bytes(new, b"y")
    assert stat.S_IMODE(new.stat().st_mode) == 0o640 and new.read_bytes() == b"y"
    assert [p.name for p in tmp_path.iterdir()] == ["engine.plan"]


def test_default_modes_probe_leaves_nothing(tmp_path, umask, no_umask_calls):
    from dmpq_compile.fileio import default_modes

    assert default_modes(tmp_path) == (0o666 & ~umask, 0o777 & ~umask)
    assert list(tmp_path.iterdir()) == []
