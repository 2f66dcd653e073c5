"""Tests of block-wise (layer-by-layer) QAT, the ``qat`` pass's ``mode="blockwise"``, on a tiny Mixtral."""

import gc
import logging
import weakref
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from dmpq_compile.passes import PassContext, PassError, make_pass
from dmpq_compile.passes.qat import QATPass, choose_mode, split_calibration
from dmpq_compile.passes.qat import blockwise as qat_blockwise
from dmpq_compile.passes.qat import training as qat

from dmpq_compile.frontend import load
from dmpq_compile.ir import Interpreter
from dmpq_compile.ir.stream import layer_nodes, layer_outputs
from dmpq_compile.quant import fake_quantize
from dmpq_compile.testing import make_tiny_checkpoint

FAMILY = "mixtral"


def _graph(model_dir, bits=2):
    g = load(model_dir)
    for n in g.experts():
        g.annotate(n.id, "bits", bits)
    return g


def _ctx(calib_ids):
    return PassContext(calibration=calib_ids(FAMILY), progress=False)


def _heldout_kl(graph, fp_graph, ids):
    """KL(FP || RTN fake-quantized) per token, computed independently of the pass."""
    with torch.no_grad():
        ref = F.log_softmax(Interpreter(fp_graph, quantize=False)(ids), dim=-1).flatten(0, 1)
        q = F.log_softmax(Interpreter(graph, quantize=True)(ids), dim=-1).flatten(0, 1)
    return float(F.kl_div(q, ref, log_target=True, reduction="batchmean"))


def _layer_errors(graph, fp_graph, ids):
    """Relative squared error of each layer's output, RTN model vs FP model, whole-model runs."""
    outs = tuple(layer_outputs(graph))
    with torch.no_grad():
        fp = Interpreter(fp_graph, quantize=False).run(ids, outputs=outs)
        q = Interpreter(graph, quantize=True).run(ids, outputs=outs)
    return [float((q[o] - fp[o]).pow(2).sum() / fp[o].pow(2).sum()) for o in outs]


def _param_keys(graph, kinds):
    return {key for n in graph.nodes() if n.kind in kinds for key in n.params.values()}


def test_blockwise_lowers_layer_errors_and_kl_and_quantize_reproduces_it(tiny_dirs, calib_ids):
    g = _graph(tiny_dirs(FAMILY))
    original = g.copy()
    heldout = split_calibration(calib_ids(FAMILY), 0.25)[1]
    kl_before, errors_before = _heldout_kl(g, original, heldout), _layer_errors(g, original, heldout)

    result = QATPass(steps=30, lr=1e-3, mode="blockwise").call(g, _ctx(calib_ids))
    s = result.stats
    kl_after, errors_after = _heldout_kl(g, original, heldout), _layer_errors(g, original, heldout)
    assert result.modified and s["mode"] == "blockwise" and s["written_layers"] == 2
    assert [r["layer"] for r in s["layers"]] == [0, 1] and all(r["steps"] == 30 for r in s["layers"])
    assert s["steps"] == 60 and s["tokens"] == 60 * 4 * heldout.shape[1]
    # the stats are what the written-back model computes, measured independently
    assert s["kl_before"] == pytest.approx(kl_before, rel=1e-4) and s["kl_after"] == pytest.approx(kl_after, rel=1e-4)
    for rec, before, after in zip(s["layers"], errors_before, errors_after):
        assert rec["error_after"] == pytest.approx(after, rel=1e-4)
        assert rec["error_after"] <= rec["error_before"]
    assert s["layers"][0]["error_before"] == pytest.approx(errors_before[0], rel=1e-4)
    # layer 1 trained on the quantized prefix's hidden states: its step-0 error is that of the model
    # with layer 0 trained and layer 1 untrained
    mixed = g.copy()
    for n in original.experts():
        if n.attrs["layer"] == 1:
            for key in n.params.values():
                mixed.weights.set(key, original.weights[key])
    assert s["layers"][1]["error_before"] == pytest.approx(_layer_errors(mixed, original, heldout)[1], rel=1e-4)
    assert errors_after[0] < 0.8 * errors_before[0], (errors_before, errors_after)
    assert kl_after < 0.9 * kl_before, (kl_before, kl_after)

    for key in _param_keys(g, ("embed", "norm", "attention", "router", "lm_head")):
        assert g.weights.version(key) == original.weights.version(key), key
    for key in _param_keys(g, ("expert",)):
        assert not torch.equal(g.weights[key], original.weights[key]), key
    assert all(n.ann["group_size"] == 64 for n in g.experts())
    with torch.no_grad():  # the quantize pass stores codes that reproduce the trained RTN forward
        rtn = Interpreter(g, quantize=True)(heldout)
        stored = Interpreter(make_pass("quantize", group_size=64).call(g, PassContext(progress=False)).graph)(heldout)
    assert torch.allclose(rtn, stored, atol=1e-5)


def test_blockwise_never_makes_a_layer_worse(tiny_dirs, calib_ids):
    g = _graph(tiny_dirs(FAMILY))
    original = g.copy()
    # one huge step ruins every layer: the untrained weights must be kept
    result = QATPass(steps=1, lr=0.5, warmup_steps=0, mode="blockwise").call(g, _ctx(calib_ids))
    s = result.stats
    assert not result.modified and s["written_layers"] == 0
    assert all(r["steps"] == 1 and r["best_step"] == 0 and r["error_best"] == r["error_before"] for r in s["layers"])
    assert all(r["error_after"] == pytest.approx(r["error_before"], rel=1e-6) for r in s["layers"])
    assert s["kl_after"] == pytest.approx(s["kl_before"], rel=1e-6)
    assert all(g.weights.version(k) == original.weights.version(k) for k in g.weights)


def test_blockwise_learnable_scales_bake_to_rtn_grid(tiny_dirs, calib_ids):
    g = _graph(tiny_dirs(FAMILY))
    s = QATPass(steps=20, lr=1e-3, learnable_scales=True, group_size=32, mode="blockwise").call(g, _ctx(calib_ids)).stats
    assert s["kl_after"] < s["kl_before"] and s["written_layers"] == 2
    assert s["bake_mismatch_frac"] == 0.0 and s["bake_max_abs_diff"] < 1e-6
    for n in g.experts():
        assert n.ann["group_size"] == 32
        w = g.weights[n.params["up"]]
        assert torch.allclose(fake_quantize(w, 2, 32), w, atol=1e-6)


def test_blockwise_holds_one_layer_at_a_time(tiny_dirs, calib_ids, monkeypatch, tmp_path):
    """Only the current layer's tensors are trainable (earlier layers' fp32 copies and Adam state
    are freed), and the peak is the same for a model twice as deep."""
    live: list[weakref.ref] = []
    layers_seen = []

    def probe(graph, o, uses=None):
        gc.collect()
        assert all(ref() is None for ref in live), "an earlier layer's trainable tensors are still alive"
        members = layer_nodes(graph)
        layers_seen.append({i for u in uses for i, nodes in enumerate(members) if u.node_id in nodes})
        tr = qat.collect_trainables(graph, o, uses)
        live.extend(weakref.ref(p) for p in tr.params.values())
        return tr

    monkeypatch.setattr(qat_blockwise, "collect_trainables", probe)
    shallow = QATPass(steps=2, lr=1e-3, mode="blockwise").call(_graph(tiny_dirs(FAMILY)), _ctx(calib_ids)).stats
    assert layers_seen == [{0}, {1}]
    deep_dir = make_tiny_checkpoint(FAMILY, tmp_path / "deep", num_hidden_layers=4)
    layers_seen.clear()
    deep_graph = _graph(deep_dir)
    ctx = PassContext(calibration=calib_ids(FAMILY), progress=False, work_dir=tmp_path)
    deep = QATPass(steps=2, lr=1e-3, mode="blockwise").call(deep_graph, ctx).stats
    assert layers_seen == [{0}, {1}, {2}, {3}]
    d = _graph(deep_dir)
    per_layer = sum(d.weights[k].numel() for n in d.experts() if n.attrs["layer"] == 0 for k in n.params.values())
    assert shallow["peak_trainable_params"] == deep["peak_trainable_params"] == per_layer
    assert shallow["activation_bytes"] == deep["activation_bytes"]
    assert deep["trained_tensors"] == 2 * shallow["trained_tensors"]
    written = {r["layer"] for r in deep["layers"] if r["written"]}
    assert written  # with a work_dir the written-back weights wait on disk, not in memory
    for n in deep_graph.experts():
        for k in n.params.values():
            in_work_dir = Path(deep_graph.weights.ref(k).path).parent == tmp_path
            assert in_work_dir == (n.attrs["layer"] in written), k


def test_auto_picks_blockwise_when_whole_would_not_fit(tiny_dirs, calib_ids, monkeypatch, caplog):
    g = _graph(tiny_dirs(FAMILY))
    n = sum(g.weights[k].numel() for k in g.weights)
    assert choose_mode(g, "auto", available=100 * n)[0] == "whole"
    mode, reason = choose_mode(g, "auto", available=10 * n)
    assert mode == "blockwise" and "does not fit" in reason
    assert choose_mode(g, "blockwise", available=100 * n)[0] == "blockwise"
    with pytest.raises(PassError, match="mode 'whole'.*does not fit.*--qat-mode blockwise"):
        choose_mode(g, "whole", available=10 * n)

    monkeypatch.setattr(qat, "available_memory_bytes", lambda: 10 * n)
    with caplog.at_level(logging.INFO, logger="dmpq_compile.passes.qat"):
        s = QATPass(steps=2, lr=1e-3).call(g, _ctx(calib_ids)).stats
    assert s["mode"] == "blockwise" and s["mode_reason"].startswith("auto:") and "layers" in s
    assert any(r.getMessage().startswith("qat: blockwise mode (auto: whole-model QAT needs about") for r in caplog.records)
    with pytest.raises(PassError, match="--qat-mode blockwise"):
        QATPass(steps=2, mode="whole").call(_graph(tiny_dirs(FAMILY)), _ctx(calib_ids))
    monkeypatch.setattr(qat, "available_memory_bytes", lambda: 100 * n)
    assert QATPass(steps=2, lr=1e-3).call(_graph(tiny_dirs(FAMILY)), _ctx(calib_ids)).stats["mode"] == "whole"


def test_blockwise_time_budget_is_shared_by_the_layers(tiny_dirs, calib_ids):
    s = QATPass(steps=10**6, lr=1e-4, time_budget_s=0.6, mode="blockwise").call(
        _graph(tiny_dirs(FAMILY)), _ctx(calib_ids)).stats
    assert all(r["stop_reason"] == "time_budget_s" and r["steps"] >= 1 for r in s["layers"])
    assert s["stop_reason"] == "time_budget_s" and sum(r["train_seconds"] for r in s["layers"]) < 3.0


@pytest.mark.parametrize("options, message", [
    ({"mode": "layers"}, "mode must be one of"),
    ({"mode": "blockwise", "loss": "nll"}, "loss='nll' needs mode='whole'"),
])
def test_mode_options_validated(options, message):
    with pytest.raises(PassError, match=message):
        QATPass(**options)


def test_compile_flag_reaches_the_pass():
    import argparse

    from dmpq_compile.commands import compile as cmd
    from dmpq_compile.compiler import allocation_passes

    parser = argparse.ArgumentParser()
    cmd.add_arguments(parser)
    cfg = cmd.config_from_args(parser.parse_args(["m", "--qat", "--qat-mode", "blockwise"]))
    (qat_pass,) = [p for p in allocation_passes(cfg) if p.name == "qat"]
    assert cfg.qat.mode == "blockwise" and qat_pass.options.mode == "blockwise"
    assert cmd.config_from_args(parser.parse_args(["m", "--qat"])).qat.mode == "auto"
