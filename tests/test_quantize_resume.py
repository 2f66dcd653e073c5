"""An interrupted quantize pass resumes at its first unfinished unit (layer, lm_head, non-expert
node) and gives the codes, annotations and artifact an uninterrupted run gives, bit for bit
(passes/quantize_resume.py)."""

from __future__ import annotations

import json
import logging

import pytest
import torch
from dmpq_compile.backends import get_backend
from dmpq_compile.passes import PassContext, make_pass, quantize_resume
from dmpq_compile.passes import quantize as quantize_mod
from dmpq_compile.passes.infra import partial
from dmpq_compile.passes.infra.cache import PassCache, _annotations, run_cached
from dmpq_compile.passes.quantize import QuantizePass

from dmpq_compile.frontend import load
from dmpq_compile.ir.graph import NONEXPERT_QUANTIZABLE_KINDS

LAYERS = 4
LOGGER = "dmpq_compile.passes.quantize"


@pytest.fixture(scope="module")
def deep(tmp_path_factory):
    """A 4-layer tiny OLMoE checkpoint and 4 calibration sequences of 16 tokens."""
    from dmpq_compile.testing import make_tiny_checkpoint

    model = make_tiny_checkpoint("olmoe", tmp_path_factory.mktemp("olmoe4"), num_hidden_layers=LAYERS)
    return model, torch.randint(0, 50, (4, 16), generator=torch.Generator().manual_seed(0))


def _graph(model):
    """The checkpoint with mixed expert bits (some kept at 16) and 8-bit non-expert weights."""
    graph = load(model)
    graph.meta["group_size"] = 32
    for i, n in enumerate(graph.experts()):
        graph.annotate(n.id, "bits", (2, 3, 4, 8, 16)[i % 5])
    for n in graph.nodes():
        if n.kind in NONEXPERT_QUANTIZABLE_KINDS:
            graph.annotate(n.id, "bits", 8)
    return graph


def _quantize(deep, cache, work, method="rtn", **options):
    """What the pass leaves: annotations, the weight store (keys in order, bytes) and its stats."""
    model, ids = deep
    work.mkdir(parents=True, exist_ok=True)
    ctx = PassContext(calibration=ids, target="ort-cpu", backend=get_backend("ort-cpu"), seed=0, progress=False,
                      work_dir=work)
    result = run_cached(make_pass("quantize", **{"method": method, "group_size": 32, **options}), _graph(model), ctx,
                        cache)
    g = result.graph
    assert all(g.weights.ref(k) is None or not g.weights.ref(k).path.endswith(".partial") for k in g.weights)
    return _annotations(g), [(k, g.weights[k].numpy().tobytes()) for k in g.weights], result.stats


# the units in the order the pass finishes them: under rtn the layers' experts, then each non-expert
# node apart; under gptq each layer's experts with its attention, the lm_head, then the embedding (rtn)
UNITS = {"rtn": [f"L{i}" for i in range(LAYERS)] + ["embed"] + [f"L{i}.attn" for i in range(LAYERS)] + ["lm_head"],
         "gptq": [f"L{i}" for i in range(LAYERS)] + ["head", "embed"]}


class Counter:
    """Counts the nodes the pass quantizes; raises KeyboardInterrupt once the ``stop``-th unit is kept."""

    def __init__(self, monkeypatch, stop: int | None = None) -> None:
        self.quantized: list[str] = []
        self.kept: list[str] = []
        node, save = QuantizePass.quantize_node, quantize_resume.QuantizeState.save

        def quantize_node(qp, graph, n, *args, **kwargs):
            self.quantized.append(n.id)
            return node(qp, graph, n, *args, **kwargs)

        def keep(state, name, graph, keys):
            ok = save(state, name, graph, keys)
            self.kept.append(name)
            if len(self.kept) == stop:
                raise KeyboardInterrupt
            return ok

        monkeypatch.setattr(QuantizePass, "quantize_node", quantize_node)
        monkeypatch.setattr(quantize_resume.QuantizeState, "save", keep)


@pytest.fixture(scope="module")
def reference(deep, tmp_path_factory):
    """Per method: an uninterrupted run without the cache (no partial state at all)."""
    work = tmp_path_factory.mktemp("reference")
    return {m: _quantize(deep, None, work / m, m) for m in ("rtn", "gptq")}


def _nodes(model, method, units):
    """The nodes the pass quantizes for ``units``, in order."""
    g = _graph(model)
    layer = {f"L{i}": [n.id for n in g.experts() if n.attrs["layer"] == i and n.ann["bits"] < 16]
             + ([f"L{i}.attn"] if method == "gptq" else []) for i in range(LAYERS)}
    return [n for u in units for n in layer.get(u, [u if u != "head" else "lm_head"])]


@pytest.mark.parametrize("method, stop", [("rtn", 2), ("rtn", 6), ("gptq", 2), ("gptq", 5)])
def test_interrupted_quantize_resumes_at_the_first_unfinished_unit(deep, reference, tmp_path, monkeypatch, caplog,
                                                                  method, stop):
    cache = PassCache(tmp_path / "cache")
    first = Counter(monkeypatch, stop)
    with pytest.raises(KeyboardInterrupt):
        _quantize(deep, cache, tmp_path / "w1", method)
    assert first.kept == UNITS[method][:stop]
    (folder,) = (tmp_path / "cache").glob("quantize-*.partial")
    assert sorted(p.name for p in folder.glob("quantized-*")) == sorted(
        f"quantized-{u}.safetensors" for u in UNITS[method][:stop])
    assert len(list(folder.glob("h*.pt"))) == (method == "gptq")  # gptq: only the newest boundary

    runs = []
    if method == "gptq":  # the calibration forward restarts at the kept boundary, not at the embedding
        run_layer = quantize_mod.run_layer
        monkeypatch.setattr(quantize_mod, "run_layer", lambda interp, layer, h, opts: (
            runs.append(layer), run_layer(interp, layer, h, opts))[1])
    rerun = Counter(monkeypatch)
    with caplog.at_level(logging.INFO, logger=LOGGER):
        annotations, weights, stats = _quantize(deep, cache, tmp_path / "w2", method)
    model = deep[0]
    assert rerun.quantized == _nodes(model, method, UNITS[method][stop:])  # the finished units are not quantized again
    assert rerun.kept == UNITS[method][stop:]
    if method == "gptq":
        # from the boundary kept before the last unit; nothing once every layer and the lm_head are kept
        assert runs == (list(range(stop - 1, LAYERS)) if stop <= LAYERS else [])
    assert stats["resumed_units"] == stop
    todo = len(UNITS[method]) - stop
    assert (f"resuming, {stop} of {len(UNITS[method])} units (layers, and non-expert nodes quantized apart) loaded "
            f"from {folder}; quantizing from {UNITS[method][stop]} on ({todo} units)") in caplog.text
    ref = reference[method]
    assert annotations == ref[0] and weights == ref[1]  # the same store, in the same order, bit for bit
    assert {k: v for k, v in stats.items() if k != "resumed_units"} == ref[2]
    assert not folder.exists() and not list((tmp_path / "cache").glob("quantize-*"))  # finished: removed
    assert sorted(p.name for p in (tmp_path / "w2").glob("quantized-*")) == sorted(
        f"quantized-{u}.safetensors" for u in UNITS[method])  # moved into the scratch folder


def _interrupted(deep, tmp_path, monkeypatch, stop=3, method="rtn", **options):
    cache = PassCache(tmp_path / "cache")
    Counter(monkeypatch, stop)
    with pytest.raises(KeyboardInterrupt):
        _quantize(deep, cache, tmp_path / "w1", method, **options)
    (folder,) = (tmp_path / "cache").glob("quantize-*.partial")
    return cache, folder


def _flip_last_byte(path):
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("damage, why", [
    ("truncate", "is truncated"),
    ("flip", "its bytes do not match the checksum its header gives (damaged)"),
    ("foreign", "written in another state folder"),
    ("stranger", "a unit this run does not have"),
])
def test_a_damaged_or_foreign_file_is_refused_and_redone(deep, reference, tmp_path, monkeypatch, caplog, damage, why):
    cache, folder = _interrupted(deep, tmp_path, monkeypatch)
    path = folder / "quantized-L1.safetensors"
    if damage == "truncate":
        path.write_bytes(path.read_bytes()[: path.stat().st_size - 7])
    elif damage == "flip":
        _flip_last_byte(path)
    elif damage == "foreign":  # the same unit from another run's folder (another key: another group size)
        with monkeypatch.context() as m:
            _, other = _interrupted(deep, tmp_path / "other", m, group_size=16)
        path.write_bytes((other / "quantized-L1.safetensors").read_bytes())
    else:
        path = folder / "quantized-L9.safetensors"
        path.write_bytes((folder / "quantized-L1.safetensors").read_bytes())
    rerun = Counter(monkeypatch)
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        annotations, weights, stats = _quantize(deep, cache, tmp_path / "w2")
    assert f"ignoring partial state {path}" in caplog.text and why in caplog.text
    assert "deleting it and quantizing that unit again" in caplog.text
    redone = ["L1", "L3"] if damage != "stranger" else ["L3"]
    assert rerun.kept[: len(redone)] == redone and stats["resumed_units"] == 3 - (damage != "stranger")
    assert (annotations, weights) == reference["rtn"][:2]


def test_a_damaged_boundary_restarts_the_forward_further_back(deep, reference, tmp_path, monkeypatch, caplog):
    cache, folder = _interrupted(deep, tmp_path, monkeypatch, stop=3, method="gptq")
    (boundary,) = folder.glob("h*.pt")
    data = bytearray(boundary.read_bytes())
    data[len(data) // 2] ^= 0xFF
    boundary.write_bytes(bytes(data))
    runs = []
    run_layer = quantize_mod.run_layer
    monkeypatch.setattr(quantize_mod, "run_layer", lambda interp, layer, h, opts: (
        runs.append(layer), run_layer(interp, layer, h, opts))[1])
    rerun = Counter(monkeypatch)
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        annotations, weights, _ = _quantize(deep, cache, tmp_path / "w2", "gptq")
    assert f"ignoring partial state {boundary}" in caplog.text
    assert runs == list(range(LAYERS)) and rerun.kept == ["L3", "head", "embed"]  # from the embedding
    assert (annotations, weights) == reference["gptq"][:2]


def test_no_cache_keeps_nothing_and_another_key_does_not_resume(deep, reference, tmp_path, monkeypatch, caplog):
    cache, folder = _interrupted(deep, tmp_path, monkeypatch)
    monkeypatch.setattr(quantize_resume, "QuantizeState", None)  # would fail if anything opened partial state
    assert _quantize(deep, None, tmp_path / "w0")[:2] == reference["rtn"][:2]
    monkeypatch.undo()
    rerun = Counter(monkeypatch)
    with caplog.at_level(logging.INFO, logger=LOGGER):
        _, _, stats = _quantize(deep, cache, tmp_path / "w2", group_size=16)  # another option: another key
    assert "resumed_units" not in stats and rerun.kept == UNITS["rtn"]
    assert "1 partial state(s) of other runs with other keys" in caplog.text
    assert [p.name for p in (tmp_path / "cache").glob("quantize-*.partial")] == [folder.name]  # left alone


def test_a_disk_without_room_keeps_no_partial_state(deep, reference, tmp_path, monkeypatch, caplog):
    from collections import namedtuple

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(partial.shutil, "disk_usage", lambda path: usage(10**12, 10**12 - 1000, 1000))
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        annotations, weights, _ = _quantize(deep, PassCache(tmp_path / "cache"), tmp_path / "w")
    assert "quantize: " in caplog.text and "partial state needs about" in caplog.text
    assert (annotations, weights) == reference["rtn"][:2]
    assert not list((tmp_path / "cache").glob("quantize-*.partial/quantized-*"))


def test_compile_interrupted_in_quantize_resumes_to_the_same_artifact(tiny_dirs, tiny_corpus, tmp_path,
                                                                      monkeypatch, capsys):
    """End to end: Ctrl-C in the quantize pass of ``dmpq-compile compile``, then the same command
    again, gives the files a clean compile gives; with --no-cache nothing is kept."""
    from dmpq_compile.passes.infra import cache as cache_mod

    from dmpq_compile.cli import main

    folder = cache_mod.default_folder()
    args = [str(tiny_dirs("qwen2_moe")), "--calib-corpus", str(tiny_corpus), "--calib-sequences", "4",
            "--seq-len", "32", "--no-progress", "--budget-code-bits", "3"]

    def partials():
        return sorted(p.name for p in folder.glob("quantize-*.partial"))

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr(QuantizePass, "quantize_node", interrupted)
        assert main([*args, "--no-cache", "-o", str(tmp_path / "x")]) == 130
    assert partials() == [] and not (tmp_path / "x").exists()

    with monkeypatch.context() as m:
        first = Counter(m, 1)  # the first layer finished, then Ctrl-C
        assert main([*args, "-o", str(tmp_path / "a")]) == 130
    assert "rerun the same command" in capsys.readouterr().err
    assert len(partials()) == 1 and not (tmp_path / "a").exists() and first.kept == ["L0"]
    with monkeypatch.context() as m:
        rerun = Counter(m)
        assert main([*args, "-o", str(tmp_path / "a")]) == 0
    assert "L0" not in rerun.kept and not any(n.startswith("L0.E") for n in rerun.quantized)
    assert rerun.kept[0] == "L1" and partials() == []
    assert main([*args, "--no-cache", "-o", str(tmp_path / "b")]) == 0
    report = json.loads((tmp_path / "a" / "report.json").read_text())
    assert {p["name"]: p["stats"] for p in report["passes"]}["quantize"]["resumed_units"] == 1
    assert report["experts"] == json.loads((tmp_path / "b" / "report.json").read_text())["experts"]
    files = sorted((tmp_path / "b").glob("model.onnx*"))
    assert files
    for f in files:
        assert (tmp_path / "a" / f.name).read_bytes() == f.read_bytes(), f.name


def test_weights_in_the_scratch_folder_keep_no_partial_state(deep, reference, tmp_path, monkeypatch, caplog):
    """Blockwise QAT writes the trained weights into the compile's scratch folder, which a rerun
    replaces (another key): keeping codes for them would only leave an unusable folder behind."""
    model, ids = deep
    work = tmp_path / "w"
    work.mkdir()
    graph = _graph(model)
    key = graph.node("L0.E0").params["gate"]
    graph.weights.set(key, graph.weights[key].clone())
    graph.weights.spill([key], work / "qat-L0.safetensors")  # as passes/qat/blockwise.py does
    monkeypatch.setattr(quantize_resume, "QuantizeState", None)  # would fail if anything opened partial state
    ctx = PassContext(calibration=ids, target="ort-cpu", backend=get_backend("ort-cpu"), seed=0, progress=False,
                      work_dir=work)
    with caplog.at_level(logging.INFO, logger=LOGGER):
        result = run_cached(make_pass("quantize", group_size=32), graph, ctx, PassCache(tmp_path / "cache"))
    assert "written by this compile (QAT) into its scratch folder" in caplog.text
    assert "resumed_units" not in result.stats and _annotations(result.graph) == reference["rtn"][0]


class InProcess:
    """The executor interface (dmpq_compile.distributed.RayExecutor), run here: each task when submitted."""

    def __init__(self) -> None:
        self.submitted: list[list[str]] = []  # each layer_quantize task's nodes

    def put(self, graph):  # a worker gets its own copy
        return graph.copy()

    def submit(self, fn, *args):
        self.submitted.append(args[2])
        return fn(*args, torch.get_num_threads())

    def get(self, futures):
        return list(futures)

    def done(self, futures, block=False):
        return list(range(len(futures)))


def _quantize_remote(deep, cache, work, executor):
    """``_quantize`` with the rtn layers as ``executor``'s tasks (compile --ray)."""
    from dmpq_compile.passes.infra import remote_tasks

    model, ids = deep
    work.mkdir(parents=True, exist_ok=True)
    ctx = PassContext(calibration=ids, target="ort-cpu", backend=get_backend("ort-cpu"), seed=0, progress=False,
                      work_dir=work, executor=executor)
    with pytest.MonkeyPatch.context() as m:
        m.setattr(remote_tasks, "sendable", lambda graph: True)
        result = run_cached(make_pass("quantize", group_size=32), _graph(model), ctx, cache)
    g = result.graph
    assert all(g.weights.ref(k) is None or not g.weights.ref(k).path.endswith(".partial") for k in g.weights)
    return _annotations(g), [(k, g.weights[k].numpy().tobytes()) for k in g.weights], result.stats


def test_an_executor_resumes_partial_state_and_keeps_its_own(deep, reference, tmp_path, monkeypatch, caplog):
    """With --ray the rtn layers are executor tasks: those a previous run finished (here a serial one,
    then an executor run) are not submitted again, and each task's file is kept as it arrives."""
    model, _ = deep
    cache, folder = _interrupted(deep, tmp_path, monkeypatch, stop=1)  # a serial run finished L0
    monkeypatch.undo()
    keep = quantize_resume.QuantizeState.keep

    def interrupt_after_one(state, name, path):
        keep(state, name, path)
        raise KeyboardInterrupt

    first = InProcess()
    with monkeypatch.context() as m:
        m.setattr(quantize_resume.QuantizeState, "keep", interrupt_after_one)
        with pytest.raises(KeyboardInterrupt):
            _quantize_remote(deep, cache, tmp_path / "w2", first)
    layer = {f"L{i}": [n.id for n in _graph(model).experts() if n.attrs["layer"] == i and n.ann["bits"] < 16]
             for i in range(LAYERS)}
    assert first.submitted == [layer["L1"], layer["L2"], layer["L3"]]  # not L0
    # the in-process tasks all ran at submission; the first file taken was moved into the state folder
    assert sorted(p.name for p in folder.glob("quantized-*")) == ["quantized-L0.safetensors",
                                                                   "quantized-L1.safetensors"]
    rerun = InProcess()
    with caplog.at_level(logging.INFO, logger=LOGGER):
        annotations, weights, stats = _quantize_remote(deep, cache, tmp_path / "w3", rerun)
    assert "resuming, 2 of" in caplog.text
    assert rerun.submitted == [layer["L2"], layer["L3"]]  # the finished layers are not submitted again
    assert stats["remote_tasks"] == 2 and stats["resumed_units"] == 2
    assert annotations == reference["rtn"][0] and weights == reference["rtn"][1]  # the same store, in order
    assert not folder.exists()
    assert sorted(p.name for p in (tmp_path / "w3").glob("quantized-*")) == sorted(
        f"quantized-{u}.safetensors" for u in UNITS["rtn"])  # moved into the scratch folder
