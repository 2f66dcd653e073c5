"""An interrupted sensitivity pass resumes at its first unfinished layer and gives the annotations
an uninterrupted run gives, bit for bit (passes/sensitivity/resume.py)."""

from __future__ import annotations

import json
import logging

import pytest
import torch
from dmpq_compile.backends import get_backend
from dmpq_compile.passes import PassContext, make_pass
from dmpq_compile.passes.infra import partial
from dmpq_compile.passes.infra.cache import PassCache, _annotations, run_cached
from dmpq_compile.passes.sensitivity import local, resume

from dmpq_compile.frontend import load
from dmpq_compile.ir.stream import SpilledBoundaries

LAYERS = 4


@pytest.fixture(scope="module")
def deep(tmp_path_factory, tiny_corpus):
    """A 4-layer tiny OLMoE checkpoint and 6 calibration sequences of 32 tokens."""
    from dmpq_compile.compiler import calibration_ids
    from dmpq_compile.testing import make_tiny_checkpoint

    model = make_tiny_checkpoint("olmoe", tmp_path_factory.mktemp("olmoe4"), num_hidden_layers=LAYERS)
    return model, calibration_ids(model, str(tiny_corpus), 6, 32, split="train")


OPTIONS = {"label_samples": 2, "nonexpert": ("attention", "lm_head", "embed"), "bits": (2, 4, 8),
           "gradvar": False}


def _profiled(model, ids):
    graph = load(model)
    graph.meta["group_size"] = 32
    ctx = PassContext(calibration=ids, target="ort-cpu", backend=get_backend("ort-cpu"), seed=3, progress=False)
    return run_cached(make_pass("profile"), graph, ctx, None).graph, ctx


def _sensitivity(model, ids, cache, **options):
    """The annotations the sensitivity pass writes (canonical JSON per node) and its stats."""
    graph, ctx = _profiled(model, ids)
    result = run_cached(make_pass("sensitivity", **{**OPTIONS, **options}), graph, ctx, cache)
    return _annotations(result.graph), result.stats


class Counter:
    """Counts the layers :func:`local.expert_scores` scores; raises KeyboardInterrupt when the
    ``stop``-th layer of the backward has been kept (``resume.PartialState.layer_done``)."""

    def __init__(self, monkeypatch, stop: int | None = None) -> None:
        self.scored: list[int] = []
        self.kept = 0
        scores, done = local.expert_scores, resume.PartialState.layer_done

        def expert_scores(graph, interp, layer, *args, **kwargs):
            self.scored.append(layer)
            return scores(graph, interp, layer, *args, **kwargs)

        def layer_done(state, layer, g_in):
            done(state, layer, g_in)
            self.kept += 1
            if self.kept == stop:
                raise KeyboardInterrupt

        monkeypatch.setattr(local, "expert_scores", expert_scores)
        monkeypatch.setattr(resume.PartialState, "layer_done", layer_done)


@pytest.fixture(scope="module")
def reference(deep):
    """The annotations of an uninterrupted run without the cache (no partial state at all)."""
    model, ids = deep
    return _sensitivity(model, ids, None)[0]


def _partials(folder):
    return sorted(p.name for p in folder.glob("*.partial")) if folder.exists() else []


def _interrupted(model, ids, folder, monkeypatch, stop: int = 3):
    """A run interrupted once ``stop`` backward layers were kept, with its cache in ``folder``; the cache."""
    cache = PassCache(folder)
    Counter(monkeypatch, stop)
    with pytest.raises(KeyboardInterrupt):
        _sensitivity(model, ids, cache)
    return cache


@pytest.mark.parametrize("stop", [1, 4, 6, 8])  # in sample 0, at the samples' boundary, in sample 1, after both
def test_interrupted_backward_resumes_at_the_first_unfinished_layer(deep, reference, tmp_path, monkeypatch,
                                                                    caplog, stop):
    model, ids = deep
    cache = PassCache(tmp_path / "cache")
    first = Counter(monkeypatch, stop)
    with pytest.raises(KeyboardInterrupt):
        _sensitivity(model, ids, cache)
    assert first.scored == [3, 2, 1, 0, 3, 2, 1, 0][:stop]
    (folder,) = (tmp_path / "cache").glob("sensitivity-*.partial")
    assert (folder / "h_last.pt").is_file() and len(list(folder.glob("b*.pt"))) == stop
    assert len(list(folder.glob("g*.pt"))) <= 2  # only the newest gradients are kept

    rerun = Counter(monkeypatch)
    with caplog.at_level(logging.INFO, logger="dmpq_compile.passes.sensitivity.resume"):
        annotations, stats = _sensitivity(model, ids, cache)
    assert rerun.scored == [3, 2, 1, 0, 3, 2, 1, 0][stop:]  # the finished layers are not scored again
    assert stats["resumed_layers"] == LAYERS + stop  # the forward and the finished backward layers
    where = (f"the backward at layer {[3, 2, 1, 0][stop % 4]} of {LAYERS} (label sample {stop // 4 + 1} of 2)"
             if stop < 8 else "after the backward")
    assert f"resuming {where}, {LAYERS + stop} layers loaded from {folder}" in caplog.text
    assert annotations == reference  # bit for bit
    assert not folder.exists() and list((tmp_path / "cache").glob("sensitivity-*.json"))  # finished: removed


def test_interrupted_forward_resumes_at_its_last_boundary(deep, reference, tmp_path, monkeypatch, caplog):
    model, ids = deep
    cache = PassCache(tmp_path / "cache")
    calls = []
    run_layer = resume.run_layer

    def counted(interp, layer, h, opts):
        calls.append(layer)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return run_layer(interp, layer, h, opts)

    monkeypatch.setattr(resume, "run_layer", counted)
    with pytest.raises(KeyboardInterrupt):
        _sensitivity(model, ids, cache)
    (folder,) = (tmp_path / "cache").glob("sensitivity-*.partial")
    assert sorted(p.name for p in folder.glob("*.pt")) == ["h0.pt", "h1.pt", "h2.pt"]
    calls.clear()
    with caplog.at_level(logging.INFO, logger="dmpq_compile.passes.sensitivity.resume"):
        annotations, stats = _sensitivity(model, ids, cache)
    assert calls == [2, 3]  # layers 0 and 1 are not run again
    assert "resuming the forward at layer 2 of 4, 2 layers loaded" in caplog.text
    assert stats["resumed_layers"] == 2
    assert annotations == reference


@pytest.mark.parametrize("damaged, scored", [
    ("b0-1.pt", [1, 0, 3, 2, 1, 0]),  # the newest layer: redone from the gradient the layer above kept
    ("b0-2.pt", [3, 2, 1, 0, 3, 2, 1, 0]),  # an older one: its gradient is gone, the sample starts over
    ("h_last.pt", [0, 3, 2, 1, 0]),  # the forward's last layer is run again, the backward resumes
])
def test_a_truncated_file_is_redone(deep, reference, tmp_path, monkeypatch, caplog, damaged, scored):
    model, ids = deep
    cache = _interrupted(model, ids, tmp_path / "cache", monkeypatch)
    (folder,) = (tmp_path / "cache").glob("sensitivity-*.partial")
    path = folder / damaged
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    rerun = Counter(monkeypatch)
    with caplog.at_level(logging.WARNING, logger="dmpq_compile.passes.sensitivity.resume"):
        annotations, _ = _sensitivity(model, ids, cache)
    assert f"ignoring unreadable partial state {path}" in caplog.text
    assert rerun.scored == scored
    assert annotations == reference


def test_another_key_does_not_resume_and_no_cache_keeps_nothing(deep, tmp_path, monkeypatch, caplog):
    model, ids = deep
    cache = _interrupted(model, ids, tmp_path / "cache", monkeypatch)
    (stale,) = _partials(tmp_path / "cache")
    rerun = Counter(monkeypatch)
    with caplog.at_level(logging.INFO, logger="dmpq_compile.passes.sensitivity.resume"):
        _, stats = _sensitivity(model, ids, cache, bits=(2, 4))  # another option: another key
    assert rerun.scored == [3, 2, 1, 0, 3, 2, 1, 0] and "resumed_layers" not in stats
    assert "1 partial state(s) of other runs with other keys" in caplog.text
    assert _partials(tmp_path / "cache") == [stale]  # left for its own rerun, not read

    # without the cache the boundaries go to a temporary folder and nothing is kept
    monkeypatch.setattr(resume, "PartialState", None)  # would fail if anything opened partial state
    made = []
    boundaries = SpilledBoundaries.__init__

    def init(self):
        boundaries(self)
        made.append(self._dir.name)

    monkeypatch.setattr(SpilledBoundaries, "__init__", init)
    _sensitivity(model, ids, None)
    assert len(made) == 1


def test_a_run_with_the_same_key_at_the_same_time_leaves_the_state_alone(deep, reference, tmp_path, monkeypatch,
                                                                         caplog):
    import fcntl
    import os

    model, ids = deep
    cache = _interrupted(model, ids, tmp_path / "cache", monkeypatch)
    (folder,) = (tmp_path / "cache").glob("sensitivity-*.partial")
    files = {p.name: p.read_bytes() for p in folder.glob("*.pt")}
    fd = os.open(folder / ".lock", os.O_RDWR)  # as another compile running this key holds it
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        other = Counter(monkeypatch)
        with caplog.at_level(logging.INFO, logger="dmpq_compile.passes.infra.cache"):
            annotations, stats = _sensitivity(model, ids, cache)
        assert "is locked); this run keeps no partial state" in caplog.text
        assert other.scored == [3, 2, 1, 0, 3, 2, 1, 0] and "resumed_layers" not in stats
        assert annotations == reference
        assert {p.name: p.read_bytes() for p in folder.glob("*.pt")} == files  # neither read, written nor removed
    finally:
        os.close(fd)
    (entry,) = (tmp_path / "cache").glob("sensitivity-*.json")
    entry.unlink()  # the result is cached now: drop it to see the state resume
    rerun = Counter(monkeypatch)
    assert _sensitivity(model, ids, cache)[0] == reference
    assert rerun.scored == [0, 3, 2, 1, 0] and not folder.exists()


def test_a_disk_without_room_keeps_no_partial_state(deep, reference, tmp_path, monkeypatch, caplog):
    from collections import namedtuple

    model, ids = deep
    usage = namedtuple("usage", "total used free")
    room = resume.room_needed(LAYERS, tuple(ids.shape), 64)
    assert room == int(1.15 * (LAYERS + 3) * 6 * 32 * 64 * 4)  # boundaries, last output, gradients, records
    monkeypatch.setattr(partial.shutil, "disk_usage", lambda path: usage(10**12, 10**12 - room + 1, room - 1))
    cache = PassCache(tmp_path / "cache")
    with caplog.at_level(logging.WARNING, logger="dmpq_compile.passes.sensitivity.resume"):
        annotations, _ = _sensitivity(model, ids, cache)
    assert "partial state needs about" in caplog.text and "not keeping it" in caplog.text
    assert annotations == reference and _partials(tmp_path / "cache") == []


class InProcess:
    """The executor interface (dmpq_compile.distributed.RayExecutor), run here: each task when submitted."""

    def __init__(self) -> None:
        self.submitted: list[int] = []  # each expert_scores task's layer

    def put(self, value):
        return value

    def submit(self, fn, *args):  # as many threads as the driver (the task sets them)
        self.submitted.append(args[2])
        return fn(*args, torch.get_num_threads())

    def get(self, futures):
        return list(futures)

    def done(self, futures, block=False):
        return list(range(len(futures)))


def _sensitivity_remote(model, ids, cache, executor):
    from dmpq_compile.passes.infra import remote_tasks

    graph, ctx = _profiled(model, ids)
    ctx.executor = executor
    with pytest.MonkeyPatch.context() as m:
        m.setattr(remote_tasks, "sendable", lambda graph: True)
        result = run_cached(make_pass("sensitivity", **OPTIONS), graph, ctx, cache)
    return _annotations(result.graph), result.stats


def test_an_executor_resumes_partial_state_and_keeps_its_own(deep, reference, tmp_path, monkeypatch, caplog):
    """With --ray the expert scores come from executor tasks: the layers a previous run finished (here a
    serial one, then an executor run) are not scored again, and each layer is kept as its scores come."""
    model, ids = deep
    cache = _interrupted(model, ids, tmp_path / "cache", monkeypatch, stop=3)  # serial: sample 0's layers 3, 2, 1
    monkeypatch.undo()
    (folder,) = (tmp_path / "cache").glob("sensitivity-*.partial")
    deliver = resume.PartialState.deliver
    delivered = []

    def interrupt_after_two(state, sample, layer, *args):
        deliver(state, sample, layer, *args)
        delivered.append((sample, layer))
        if len(delivered) == 2:
            raise KeyboardInterrupt

    first = InProcess()
    with monkeypatch.context() as m:
        m.setattr(resume.PartialState, "deliver", interrupt_after_two)
        with pytest.raises(KeyboardInterrupt):
            _sensitivity_remote(model, ids, cache, first)
    assert first.submitted == [0, 3] and delivered == [(0, 0), (1, 3)]  # not the serial run's layers
    assert len(list(folder.glob("b*.pt"))) == 5  # kept as the scores came

    rerun = InProcess()
    with caplog.at_level(logging.INFO, logger="dmpq_compile.passes.sensitivity.resume"):
        annotations, stats = _sensitivity_remote(model, ids, cache, rerun)
    assert f"resuming the backward at layer 2 of {LAYERS} (label sample 2 of 2), {LAYERS + 5} layers" in caplog.text
    assert rerun.submitted == [2, 1, 0]  # the finished layers are not scored again
    assert stats["remote_tasks"] == 3 and stats["resumed_layers"] == LAYERS + 5
    assert annotations == reference  # bit for bit
    assert not folder.exists()


def test_an_executor_keeps_records_in_the_backward_order(deep, tmp_path):
    """Scores that come out of order wait: a layer's record is written once every layer before it
    in the backward's order is, and its gradient is on disk from the moment the driver made it."""
    model, ids = deep
    ids = ids[:2]
    graph, _ = _profiled(model, ids)
    state = resume.open_state(tmp_path / "s", graph, 1, ids, remote=True)
    state.begin(0, torch.Generator())
    g = torch.ones(*ids.shape, graph.meta["hidden_size"])
    for layer in (3, 2, 1):
        state.layer_done(layer, g * layer, wait=True)
    assert sorted(p.name for p in state.folder.glob("*.pt")) == ["g0-1.pt", "g0-2.pt", "g0-3.pt"]
    state.deliver(0, 2, {"L2.E0": {"kl": {2: 1.0}}}, None)  # layer 3's scores are still out
    assert not list(state.folder.glob("b*.pt"))
    state.deliver(0, 3, {"L3.E0": {"kl": {2: 3.0}}}, None)
    assert sorted(p.name for p in state.folder.glob("b*.pt")) == ["b0-2.pt", "b0-3.pt"]
    assert sorted(p.name for p in state.folder.glob("g*.pt")) == ["g0-1.pt", "g0-2.pt", "g0-3.pt"]
    rerun = resume.PartialState(state.folder, LAYERS, 1, tuple(ids.shape))  # interrupted here: resumes at layer 1
    assert rerun.point == (0, 1) and torch.equal(rerun.g, g * 2)
    state.deliver(0, 1, {"L1.E0": {"kl": {2: 1.0}}}, None)
    assert sorted(p.name for p in state.folder.glob("g*.pt")) == ["g0-1.pt", "g0-2.pt"]  # the newest two


def test_compile_interrupted_in_sensitivity_resumes_to_the_same_artifact(tiny_dirs, tiny_corpus, tmp_path,
                                                                         monkeypatch, capsys):
    """End to end: Ctrl-C in the sensitivity pass of ``dmpq-compile compile``, then the same command
    again, gives the files a clean compile gives; with --no-cache nothing is kept."""
    from dmpq_compile.passes.infra import cache as cache_mod

    from dmpq_compile.cli import main

    folder = cache_mod.default_folder()
    args = [str(tiny_dirs("qwen2_moe")), "--calib-corpus", str(tiny_corpus), "--calib-sequences", "4",
            "--seq-len", "32", "--no-progress", "--budget-code-bits", "3"]
    scores = local.expert_scores

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(local, "expert_scores", interrupted)
    assert main([*args, "--no-cache", "-o", str(tmp_path / "x")]) == 130
    assert _partials(folder) == [] and not (tmp_path / "x").exists()

    monkeypatch.setattr(local, "expert_scores", scores)
    kept = Counter(monkeypatch, 1)  # the first (last) layer finished, then Ctrl-C
    assert main([*args, "-o", str(tmp_path / "a")]) == 130
    assert "rerun the same command" in capsys.readouterr().err
    assert len(_partials(folder)) == 1 and not (tmp_path / "a").exists() and kept.scored == [1]
    monkeypatch.setattr(local, "expert_scores", scores)
    rerun = Counter(monkeypatch)
    assert main([*args, "-o", str(tmp_path / "a")]) == 0
    assert rerun.scored == [0] and _partials(folder) == []
    assert main([*args, "--no-cache", "-o", str(tmp_path / "b")]) == 0
    report = json.loads((tmp_path / "a" / "report.json").read_text())
    assert {p["name"]: p["stats"] for p in report["passes"]}["sensitivity"]["resumed_layers"] == 3
    assert report["experts"] == json.loads((tmp_path / "b" / "report.json").read_text())["experts"]
    for f in (tmp_path / "b").glob("model.onnx*"):
        assert (tmp_path / "a" / f.name).read_bytes() == f.read_bytes(), f.name


def test_only_resumable_passes_get_a_partial_state_folder(tmp_path, monkeypatch):
    """A cacheable pass that keeps no partial state (profile) gets state_dir None and no folder."""
    from dmpq_compile.passes.profile import ProfilePass

    from dmpq_compile.testing import make_tiny_checkpoint

    seen = []

    def run(self, graph, ctx):
        seen.append(ctx.state_dir)
        raise RuntimeError("stop")

    monkeypatch.setattr(ProfilePass, "run", run)
    graph = load(make_tiny_checkpoint("olmoe", tmp_path / "m"))
    with pytest.raises(RuntimeError, match="stop"):
        run_cached(make_pass("profile"), graph, PassContext(calibration=torch.zeros(2, 8, dtype=torch.long),
                                                             progress=False), PassCache(tmp_path / "cache"))
    assert seen == [None] and not list((tmp_path / "cache").glob("*.partial"))
