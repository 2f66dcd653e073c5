"""The pass cache: a second compile of the same checkpoint reuses profile and sensitivity results,
gives the artifact a fresh compile gives, and recomputes whenever anything they depend on changes."""

from __future__ import annotations

import json
import logging
import os

import pytest
import torch
from dmpq_compile.passes import PassContext, make_pass
from dmpq_compile.passes.infra.base import Pass, PassResult
from dmpq_compile.passes.infra.cache import PassCache, cache_key, run_cached

from dmpq_compile.compiler import CompileConfig, compile_model
from dmpq_compile.frontend import load


def _cfg(corpus, **allocate) -> CompileConfig:
    return CompileConfig.from_dict({"allocate": {"allocator": "optimal", "budget": 3.5, **allocate},
                                    "calibration": {"corpus": str(corpus), "sequences": 4, "seq_len": 32},
                                    "sensitivity": {"sequences": 4}})


def _report(art):
    return json.loads((art / "report.json").read_text())


def _passes(report) -> dict:
    return {r["name"]: r for r in report["passes"]}


def test_second_compile_reuses_analysis_and_matches_a_fresh_compile(tmp_path, tiny_dirs, tiny_corpus):
    model = tiny_dirs("mixtral")
    first = _report(compile_model(model, tmp_path / "a", _cfg(tiny_corpus), progress=False, cache=True))
    assert not any(r["stats"].get("cached") for r in first["passes"])
    second = _report(compile_model(model, tmp_path / "b", _cfg(tiny_corpus, budget=3.0), progress=False, cache=True))
    recs = _passes(second)
    assert recs["profile"]["stats"]["cached"] and recs["sensitivity"]["stats"]["cached"]
    assert "cached" not in recs["allocate"]["stats"]
    fresh = _report(compile_model(model, tmp_path / "c", _cfg(tiny_corpus, budget=3.0), progress=False))
    assert not any(r["stats"].get("cached") for r in fresh["passes"])
    assert second["experts"] == fresh["experts"]  # same sensitivities, frequencies and bits
    for f in (tmp_path / "c").glob("model.onnx*"):
        assert (tmp_path / "b" / f.name).read_bytes() == f.read_bytes(), f.name


def _analysis(model, corpus, ids, cache, seed=0, sequences=4):
    graph = load(model)
    graph.meta["group_size"] = 64
    from dmpq_compile.backends import get_backend

    ctx = PassContext(calibration=ids, target="ort-cpu", backend=get_backend("ort-cpu"), seed=seed, progress=False)
    results = []
    for p in (make_pass("profile"), make_pass("sensitivity", max_sequences=sequences)):
        results.append(run_cached(p, graph, ctx, cache))
        graph = results[-1].graph
    return graph, [bool(r.stats.get("cached")) for r in results]


def test_anything_the_result_depends_on_changes_the_key(tmp_path, tiny_dirs, tiny_corpus, calib_ids):
    model, ids = tiny_dirs("olmoe"), calib_ids("olmoe")[:4]
    cache = PassCache(tmp_path / "cache")
    g0, hits = _analysis(model, tiny_corpus, ids, cache)
    assert hits == [False, False]
    g1, hits = _analysis(model, tiny_corpus, ids, cache)
    assert hits == [True, True]
    for a, b in zip(g0.experts(), g1.experts(), strict=True):
        assert a.ann == b.ann
    _, hits = _analysis(model, tiny_corpus, ids, cache, seed=1)  # the seed is in every key (sampled labels)
    assert hits == [False, False]
    _, hits = _analysis(model, tiny_corpus, ids, cache, sequences=2)  # another option
    assert hits == [True, False]
    _, hits = _analysis(model, tiny_corpus, ids[:3], cache)  # other calibration tokens
    assert hits == [False, False]
    shard = next(model.glob("*.safetensors"))
    st = shard.stat()
    os.utime(shard, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # the checkpoint changed on disk
    _, hits = _analysis(model, tiny_corpus, ids, cache)
    assert hits == [False, False]


def test_in_memory_weights_are_hashed_and_their_change_misses(tiny_dirs, calib_ids, tmp_path):
    graph = load(tiny_dirs("olmoe"))
    ctx = PassContext(calibration=calib_ids("olmoe")[:2], progress=False)
    p = make_pass("profile")
    key = cache_key(p, graph, ctx)
    name = next(iter(graph.experts()[0].params.values()))
    w = graph.weights[name].clone()
    graph.weights.set(name, w)  # now in memory, same values
    assert cache_key(p, graph, ctx) is not None
    w[0, 0] += 1.0
    graph.weights.set(name, w)
    assert cache_key(p, graph, ctx) != key


def test_a_pass_that_changes_weights_is_not_stored(tmp_path, tiny_dirs, calib_ids, caplog):
    class Scales(Pass):
        name = "scales-test"
        cacheable = True

        def run(self, graph, ctx):
            key = next(iter(graph.weights))
            graph.weights.set(key, graph.weights[key] * 2)
            return PassResult(graph, modified=True)

    cache = PassCache(tmp_path / "cache")
    graph = load(tiny_dirs("olmoe"))
    with caplog.at_level(logging.INFO, logger="dmpq_compile.passes.infra.cache"):
        run_cached(Scales(), graph, PassContext(progress=False), cache)
    assert "not cached" in caplog.text
    assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").iterdir())


def test_an_unreadable_entry_is_recomputed(tmp_path, tiny_dirs, calib_ids, caplog):
    cache = PassCache(tmp_path / "cache")
    ids = calib_ids("olmoe")[:2]
    graph = load(tiny_dirs("olmoe"))
    ctx = PassContext(calibration=ids, progress=False)
    run_cached(make_pass("profile"), graph, ctx, cache)
    (entry,) = (tmp_path / "cache").iterdir()
    entry.write_text("{not json")
    graph = load(tiny_dirs("olmoe"))
    with caplog.at_level(logging.WARNING):
        result = run_cached(make_pass("profile"), graph, ctx, cache)
    assert "unreadable" in caplog.text and not result.stats.get("cached")
    assert json.loads(entry.read_text())["pass"] == "profile"  # rewritten whole


def test_too_much_in_memory_weight_is_not_cached(tiny_dirs, monkeypatch):
    from dmpq_compile.passes.infra import cache as cache_mod

    graph = load(tiny_dirs("olmoe"))
    for k in list(graph.weights)[:3]:
        graph.weights.set(k, graph.weights[k].clone())
    monkeypatch.setattr(cache_mod, "MAX_HASHED_BYTES", 16)
    assert cache_key(make_pass("profile"), graph, PassContext(calibration=torch.zeros(1, 4, dtype=torch.long))) is None


@pytest.mark.parametrize("flag", [[], ["--no-cache"]])
def test_command_line_uses_the_cache_unless_told_not_to(tmp_path, tiny_dirs, tiny_corpus, flag):
    from dmpq_compile.cli import main

    args = [str(tiny_dirs("olmoe")), "--allocator", "uniform", "--calib-corpus", str(tiny_corpus),
            "--calib-sequences", "2", "--seq-len", "32", "--no-progress", *flag]
    assert main([*args, "-o", str(tmp_path / "a"), "--budget-code-bits", "4"]) == 0
    assert main([*args, "-o", str(tmp_path / "b"), "--budget-code-bits", "8"]) == 0
    cached = _passes(_report(tmp_path / "b"))["profile"]["stats"].get("cached", False)
    assert cached is (not flag)
