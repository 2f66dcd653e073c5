import pytest
import torch
import torch.nn.functional as F
from dmpq_compile.passes import PassContext, PassError, PassManager, make_pass

from dmpq_compile.frontend import load
from dmpq_compile.ir import Interpreter, RunOptions


def _nll(logits, ids):
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))


def test_batched_sensitivity_equals_brute_force(tiny_dirs, calib_ids):
    ids = calib_ids("olmoe")
    g = load(tiny_dirs("olmoe"))
    ctx = PassContext(calibration=ids, progress=False)
    g = PassManager([make_pass("profile"), make_pass("sensitivity", method="whole", bits=(2, 4), chunk=3)]).run(g, ctx)
    interp = Interpreter(g, quantize=False)
    with torch.no_grad():
        base = _nll(interp(ids), ids)
        for node_id in ("L0.E1", "L1.E4"):
            for b in (2, 4):
                logits = interp.run(ids, RunOptions(quantize=False, bits_override={node_id: b}))["lm_head"]
                brute = float(_nll(logits, ids) - base)
                assert abs(g.node(node_id).ann["sensitivity"][b] - brute) < 2e-5, (node_id, b)
    for n in g.experts():
        s, kl = n.ann["sensitivity"], n.ann["kl"]
        assert s[16] == 0.0 and kl[16] == 0.0 and kl[2] >= 0
        if n.ann["tokens"] == 0:
            assert s[2] == 0.0
    # lower bits hurt more on aggregate
    total = {b: sum(n.ann["kl"][b] for n in g.experts()) for b in (2, 4)}
    assert total[2] > total[4] > 0


def test_contribution_and_gradvar_features(tiny_dirs, calib_ids):
    ids = calib_ids("mixtral")
    g = load(tiny_dirs("mixtral"))
    ctx = PassContext(calibration=ids, progress=False)
    g = PassManager([make_pass("profile"), make_pass("sensitivity", method="whole", bits=(4,))]).run(g, ctx)
    for n in g.experts():
        assert n.ann["contribution"] >= 0 and n.ann["router_grad_change"] >= 0 and n.ann["neuron_variance"] >= 0
    assert len({round(n.ann["contribution"], 9) for n in g.experts()}) > 1
    # contribution is |dL/ds| at s=1: check one expert against a finite difference
    node = g.node("L1.E2")
    eps = 1e-3
    interp = Interpreter(g, quantize=False)
    with torch.no_grad():
        def loss(scale):
            scales = {1: torch.ones(4)}
            scales[1][2] = scale
            return _nll(interp.run(ids, RunOptions(quantize=False, expert_scales=scales))["lm_head"], ids)
        fd = float((loss(1 + eps) - loss(1 - eps)) / (2 * eps))
    assert abs(abs(fd) - node.ann["contribution"]) < 1e-3 * max(1.0, abs(fd))


def test_layerwise_backward_equals_whole_model_autograd(tiny_dirs, calib_ids):
    from dmpq_compile.passes.sensitivity import local

    ids = calib_ids("olmoe")[:3]
    g = load(tiny_dirs("olmoe"))
    interp = Interpreter(g, quantize=False)
    outs = {}

    def keep(node_id, kind, value):
        if node_id.endswith(".moe_res"):
            value.retain_grad()
            outs[node_id] = value

    table = interp.stored(g.node("embed").params["weight"]).clone().requires_grad_(True)
    opts = RunOptions(quantize=False, observer=keep, weight_override={"embed": {"weight": table}})
    logits = interp.run(ids, opts)["lm_head"]
    logp = F.log_softmax(logits[:, :-1], -1)
    logp.gather(-1, ids[:, 1:, None]).sum().backward()
    store, h_last = local.forward_boundaries(interp, ids, RunOptions(quantize=False), lambda: None)
    seen = {}
    g_last = local.head_gradient(interp, h_last, ids, "true", None)
    local.backward_layers(interp, store, g_last, RunOptions(quantize=False),
                          lambda layer, values, grad: seen.__setitem__(layer, grad.clone()), lambda: None)
    store.close()
    assert sorted(seen) == list(range(g.meta["num_layers"]))
    for layer, grad in seen.items():
        torch.testing.assert_close(grad, outs[f"L{layer}.moe_res"].grad, rtol=1e-4, atol=1e-6)


def _layer_grads(local, interp, ids):
    """Each layer's output gradient from backward_layers, and whether each layer's run checkpointed."""
    checkpointed, seen, real_run = [], {}, interp.run

    def run(*a, **k):
        checkpointed.append(a[1].checkpoint)
        return real_run(*a, **k)

    store, h_last = local.forward_boundaries(interp, ids, RunOptions(quantize=False), lambda: None)
    g_last = local.head_gradient(interp, h_last, ids, "true", None)
    interp.run = run
    try:
        local.backward_layers(interp, store, g_last, RunOptions(quantize=False),
                              lambda layer, v, grad: seen.__setitem__(layer, grad.clone()), lambda: None)
    finally:
        del interp.run
        store.close()
    return seen, checkpointed


def test_backward_keeps_or_recomputes_mlp_weights_with_the_same_gradients(tiny_dirs, calib_ids, monkeypatch):
    """A layer whose MLP weights exceed CHECKPOINT_BYTES recomputes them in the backward; a smaller one
    keeps them: the gradients are the same bits either way."""
    from dmpq_compile.passes.sensitivity import local

    ids = calib_ids("olmoe")[:3]
    g = load(tiny_dirs("olmoe"))
    interp = Interpreter(g, quantize=False)
    sizes = local._mlp_bytes(g, None)
    assert sorted(sizes) == list(range(g.meta["num_layers"])) and min(sizes.values()) > 0
    grads = {}
    for bound in (0, max(sizes.values())):
        monkeypatch.setattr(local, "CHECKPOINT_BYTES", bound)
        grads[bound], checkpointed = _layer_grads(local, interp, ids)
        assert checkpointed == [bound == 0] * g.meta["num_layers"]
    for layer, grad in grads[0].items():
        assert torch.equal(grad, grads[max(sizes.values())][layer])


def test_local_fisher_estimate_tracks_whole_model_kl(tiny_dirs, calib_ids):
    ids = calib_ids("mixtral")
    ctx = PassContext(calibration=ids, progress=False)
    whole = PassManager([make_pass("profile"), make_pass("sensitivity", method="whole", bits=(2,), gradvar=False)]
                        ).run(load(tiny_dirs("mixtral")), ctx)
    loc = PassManager([make_pass("profile"), make_pass("sensitivity", bits=(2,), label_samples=8, gradvar=True)]
                      ).run(load(tiny_dirs("mixtral")), ctx)
    a = torch.tensor([n.ann["kl"][2] for n in whole.experts()])
    b = torch.tensor([loc.node(n.id).ann["kl"][2] for n in whole.experts()])
    ranks = lambda v: v.argsort().argsort().double()
    corr = torch.corrcoef(torch.stack([ranks(a), ranks(b)]))[0, 1]
    assert corr > 0.6, (a, b)
    assert 0.2 < float(b.sum() / a.sum()) < 5  # same units: KL per token
    for n in loc.experts():
        assert n.ann["sensitivity"] == n.ann["kl"] and n.ann["router_grad_change"] >= 0


def test_probe_groups_are_disjoint_and_their_cost_is_linear_in_depth():
    from dmpq_compile.passes.sensitivity.local import probe_groups

    groups = probe_groups(16, [0, 1, 2])
    assert sorted(i for g in groups.values() for i in g) == list(range(16)) and min(map(len, groups.values())) >= 5
    assert probe_groups(2, [0, 1, 2, 3]) == {0: [0], 3: [1]}  # deeper than 2 sequences: 2 layers, one each
    assert probe_groups(4, list(range(9))) == {0: [0], 3: [1], 5: [2], 8: [3]}
    for depth in (8, 16, 17, 48, 94):  # every sequence probes at most one layer: rows x later layers <= one forward
        layers = list(range(depth))
        groups = probe_groups(16, layers[:-1])
        seqs = [s for g in groups.values() for s in g]
        assert len(seqs) == len(set(seqs)) <= 16
        assert sum(len(g) * (depth - 1 - layer) for layer, g in groups.items()) <= 16 * depth


def test_unprobed_layers_get_rates_interpolated_in_depth():
    from dmpq_compile.passes.sensitivity.local import fill_rates

    rates = fill_rates({0: 0.4, 3: 0.1, 5: 0.0}, [0, 1, 2, 3, 4, 5])
    assert rates == pytest.approx({0: 0.4, 1: 0.3, 2: 0.2, 3: 0.1, 4: 0.05, 5: 0.0})
    assert fill_rates({2: 0.3, 4: 0.0}, [1, 2, 3, 4]) == pytest.approx({1: 0.3, 2: 0.3, 3: 0.15, 4: 0.0})
    assert fill_rates({0: 0.2, 1: 0.0}, [0, 1]) == {0: 0.2, 1: 0.0}  # nothing to fill


def test_a_model_deeper_than_its_calibration_set_gets_a_flip_rate_for_every_moe_layer(tmp_path):
    """Five MoE layers, three sensitivity sequences: three layers probed (the first, the middle, the fourth),
    the last at 0 by definition, the one between interpolated."""
    from dmpq_compile.testing import make_tiny_checkpoint

    g = load(make_tiny_checkpoint("mixtral", tmp_path / "deep", num_hidden_layers=5))
    vocab = g.weights.shape(g.node("embed").params["weight"])[0]
    ids = torch.randint(0, vocab, (3, 24), generator=torch.Generator().manual_seed(0))
    result = make_pass("sensitivity", bits=(2, 4), gradvar=False, flip_bits=2, compute_dtype="float32").run(
        g, PassContext(calibration=ids, progress=False))
    rates = {int(k): v for k, v in result.stats["flip_rates"].items()}
    assert sorted(rates) == [0, 1, 2, 3, 4] and rates[4] == 0.0
    assert result.stats["flip_probed"] == [0, 2, 3]
    assert rates[1] == pytest.approx((rates[0] + rates[2]) / 2)


def test_flip_rates_are_the_measured_flip_kl_per_unit_norm(tiny_dirs, calib_ids):
    """A direct measurement of layer 0's rate (experts at 2 bits on the whole group, routers free
    vs frozen at their full-precision decisions) equals the probe's; the last MoE layer's is 0."""
    from dmpq_compile.passes.sensitivity import local

    from dmpq_compile.eval.metrics import next_token_logprobs, token_kl
    from dmpq_compile.ir import ops

    ids = calib_ids("mixtral")
    g = load(tiny_dirs("mixtral"))
    interp = Interpreter(g, quantize=False)
    result = make_pass("sensitivity", bits=(2, 4), gradvar=False, flip_bits=2, compute_dtype="float32").run(
        g, PassContext(calibration=ids, progress=False))
    rates = {int(k): v for k, v in result.stats["flip_rates"].items()}
    layers = sorted({n.attrs["layer"] for n in g.experts()})
    assert set(rates) == set(layers) and rates[layers[-1]] == 0.0 and min(rates.values()) >= 0
    sub = ids[local.probe_groups(len(ids), layers[:-1])[0]]
    routes, x = {}, {}

    def keep(node_id, kind, value):
        if kind == "router":
            routes[node_id] = value
        if node_id == "L0.moe_norm":
            x["L0"] = value

    with torch.no_grad():
        ref = next_token_logprobs(interp.run(sub, RunOptions(quantize=False, observer=keep))["lm_head"])
        over = {n.id: 2 for n in g.experts() if n.attrs["layer"] == 0}
        free = token_kl(ref, next_token_logprobs(interp.run(sub, RunOptions(quantize=False, bits_override=over))[
            "lm_head"])).mean()
        frozen = token_kl(ref, next_token_logprobs(interp.run(sub, RunOptions(
            quantize=False, bits_override=over, resume=dict(routes)))["lm_head"])).mean()
        norm = 0.0
        for n in (n for n in g.experts() if n.attrs["layer"] == 0):
            fp = ops.expert(x["L0"], routes["L0.router"], n.attrs["expert"], interp.weights(n.id, RunOptions(quantize=False)))
            q = ops.expert(x["L0"], routes["L0.router"], n.attrs["expert"],
                           interp.weights(n.id, RunOptions(bits_override={n.id: 2})))
            scale = routes["L0.router"].weights[fp.token_idx, fp.slot, None]
            norm += float(((q.y - fp.y) * scale).norm(dim=-1).sum()) / (sub.shape[0] * (sub.shape[1] - 1))
    assert float(free) > float(frozen)  # random routers flip too
    assert rates[0] == pytest.approx(float(free - frozen) / norm, rel=1e-3)


def test_flip_term_is_added_to_the_local_estimate(tiny_dirs, calib_ids):
    """kl = the layer-local estimate (what --no-flip-probe writes) + flip_kl, per node and bits."""
    ids = calib_ids("mixtral")
    ctx = PassContext(calibration=ids, progress=False, seed=3)
    runs = {flips: PassManager([make_pass("profile"), make_pass("sensitivity", bits=(2, 4), gradvar=False,
                                                                 flips=flips)]).run(load(tiny_dirs("mixtral")), ctx)
            for flips in (True, False)}
    last = max(n.attrs["layer"] for n in runs[True].experts())
    for n in runs[True].experts():
        plain = runs[False].node(n.id).ann["kl"]
        if n.attrs["layer"] == last:
            assert "flip_kl" not in n.ann and n.ann["kl"] == plain
            continue
        flip = n.ann["flip_kl"]
        assert flip[16] == 0 and flip[2] >= flip[4] >= 0
        for b in (2, 4):
            assert n.ann["kl"][b] == pytest.approx(plain[b] + flip[b], rel=1e-9, abs=1e-15)
    with pytest.raises(PassError, match="flip_bits must be"):
        make_pass("sensitivity", flip_bits=7)


def test_no_flip_probe_flag_reaches_the_sensitivity_pass():
    import argparse

    from dmpq_compile.commands.compile import add_arguments, config_from_args
    from dmpq_compile.compiler import sensitivity_pass

    p = argparse.ArgumentParser()
    add_arguments(p)
    assert sensitivity_pass(config_from_args(p.parse_args(["m"]))).options.flips
    assert not sensitivity_pass(config_from_args(p.parse_args(["m", "--no-flip-probe"]))).options.flips


def test_sensitivity_reuses_the_profile_forward_with_the_same_result(tiny_dirs, calib_ids, monkeypatch, tmp_path):
    """profile runs the calibration forward anyway: the local sensitivity pass takes its first
    sequences' layer boundaries from it instead of running that forward again, and gets the
    annotations it gets from its own forward; the share is gone after the pipeline."""
    from dmpq_compile.passes.infra.cache import PassCache
    from dmpq_compile.passes.sensitivity import local

    from dmpq_compile.ir import stream

    ids = calib_ids("olmoe")
    sens = {"bits": (2, 4), "max_sequences": 5, "gradvar": False}
    own = PassManager([make_pass("profile")]).run(load(tiny_dirs("olmoe")), PassContext(calibration=ids, progress=False))
    own = PassManager([make_pass("sensitivity", **sens)]).run(own, PassContext(calibration=ids, progress=False))

    def no_forward(*a, **k):
        raise AssertionError("the sensitivity forward ran again")

    opened = []
    real = stream.SharedForward.__init__

    def init(self, *a):
        real(self, *a)
        opened.append(self)

    monkeypatch.setattr(stream.SharedForward, "__init__", init)
    monkeypatch.setattr(local, "forward_boundaries", no_forward)
    for cache in (None, PassCache(tmp_path / "cache")):  # without and with partial state kept
        ctx = PassContext(calibration=ids, progress=False)
        shared = PassManager([make_pass("profile"), make_pass("sensitivity", **sens)], cache=cache).run(
            load(tiny_dirs("olmoe")), ctx)
        assert ctx.forward_share is None and opened[-1].store is None  # handed over, closed
        assert opened[-1].rows == 5
        for n in own.experts():
            for key in ("kl", "contribution", "tokens"):
                assert shared.node(n.id).ann[key] == pytest.approx(n.ann[key], rel=1e-6, abs=1e-12), (n.id, key)


def test_a_shared_forward_is_taken_only_as_recorded_and_else_removed(tiny_dirs, calib_ids):
    from pathlib import Path

    from dmpq_compile.ir.stream import SharedForward, run_layers

    ids = calib_ids("olmoe")
    interp = Interpreter(load(tiny_dirs("olmoe")), quantize=False)
    share = SharedForward(3, None)
    assert not share.recording(ids, torch.bfloat16)  # another dtype: not recorded
    assert share.recording(ids, None) and not share.recording(ids, None)  # once
    with torch.no_grad():
        h = run_layers(interp, ids, RunOptions(quantize=False), before_layer=share.put)
    share.finish(h)
    folder = Path(share.store._dir.name)
    assert all((folder / f"{i}.pt").stat().st_size < 3 * ids.shape[1] * h.shape[-1] * 4 + 4096 for i in range(2))
    assert share.take(ids[1:4], None) is None and share.take(ids[:3], torch.bfloat16) is None
    with torch.no_grad():
        alone = run_layers(interp, ids[:3], RunOptions(quantize=False))
    torch.testing.assert_close(share.h_last, alone, rtol=1e-6, atol=1e-6)
    share.close()
    assert not folder.exists() and share.take(ids[:3], None) is None


@pytest.mark.parametrize("checkpoint_bytes,dtype", [(0, "float32"), (2**40, "float32"), (0, "bfloat16"),
                                                    (2**40, "bfloat16")])
def test_expert_scores_take_the_forwards_outputs_with_the_same_results(tiny_dirs, calib_ids, monkeypatch,
                                                                      checkpoint_bytes, dtype):
    """A sensitivity pass takes each expert's values from the backward's forward of its layer (recomputed under
    the MLP checkpoint or not) instead of computing them again (fp32: its output; bf16: its gate and up
    products): every annotation is the same bits as when the expert scores compute them themselves."""
    from dmpq_compile.passes.sensitivity import local

    ids = calib_ids("olmoe")
    monkeypatch.setattr(local, "CHECKPOINT_BYTES", checkpoint_bytes)
    given = []
    real_run = local.ExpertRun

    class Spy(real_run):
        def __init__(self, xt, w, cast=None, forward=None):
            given.append(forward is not None)
            super().__init__(xt, w, cast, forward)

    monkeypatch.setattr(local, "ExpertRun", Spy)

    def annotations(graph):
        return {n.id: {k: n.ann[k] for k in ("kl", "sensitivity", "contribution", "kl_norm", "flip_kl")
                       if k in n.ann} for n in graph.nodes() if "kl" in n.ann}

    def run():
        g = load(tiny_dirs("olmoe"))
        passes = [make_pass("profile", compute_dtype=dtype),
                  make_pass("sensitivity", bits=(2, 4, 8), gradvar=False, compute_dtype=dtype)]
        return annotations(PassManager(passes).run(g, PassContext(calibration=ids, progress=False)))

    reused = run()
    assert given and all(given)  # every expert's run took its output from the forward
    given.clear()
    real_backward = local.backward_layers
    monkeypatch.setattr(local, "backward_layers", lambda *a, **k: real_backward(*a, **{**k, "expert_outputs": False}))
    computed = run()
    assert given and not any(given)
    assert reused == computed and len(computed) > 8


def test_bf16_expert_scores_price_the_native_changes_as_the_torch_ones(tiny_dirs, calib_ids, monkeypatch):
    """In bf16 the expert scores take each fake quantization's changes from one native pass (quant.native
    .affine_change): the same bf16 changes as fake-quantizing in float32, subtracting and rounding in torch, so
    every measured annotation is the same bits; the experts priced from their weights' squared error (rare ones)
    agree to float rounding of that sum."""
    ids = calib_ids("olmoe")

    def run(native_rtn: str) -> dict:
        monkeypatch.setenv("DMPQ_NATIVE_RTN", native_rtn)
        passes = [make_pass("profile", compute_dtype="bfloat16"),
                  make_pass("sensitivity", bits=(2, 4, 8), gradvar=False, compute_dtype="bfloat16", min_tokens=48)]
        g = PassManager(passes).run(load(tiny_dirs("olmoe")), PassContext(calibration=ids, progress=False))
        return {n.id: dict(n.ann) for n in g.experts()}

    from dmpq_compile.quant import native

    if not native.available():
        pytest.skip("dmpq's RTN library cannot be built here")
    fast, ref = run("1"), run("0")
    estimated = {k for k, a in ref.items() if a.get("sensitivity_estimated")}
    assert estimated and len(estimated) < len(ref)
    for k, a in ref.items():
        if k in estimated:
            assert fast[k]["kl"] == pytest.approx(a["kl"], rel=1e-5)
        else:
            assert fast[k]["kl"] == a["kl"] and fast[k].get("flip_kl") == a.get("flip_kl")


def test_expert_run_takes_what_it_needs_from_the_forward():
    from dmpq_compile.passes.sensitivity.local import ExpertRun

    from dmpq_compile.ir import ops

    x, w = torch.randn(5, 8), {r: torch.randn(*s) for r, s in (("gate", (4, 8)), ("up", (4, 8)), ("down", (8, 4)))}
    routing = ops.Routing(torch.ones(5, 1), torch.zeros(5, 1, dtype=torch.long), torch.zeros(5, 1))
    fp32 = ops.expert(x, routing, 0, w)
    assert torch.equal(ExpertRun(x, w, forward=fp32).change(w, w), torch.zeros_like(fp32.y))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        bf16 = ops.expert(x, routing, 0, w)
    wq = {r: t + 0.01 for r, t in w.items()}
    assert torch.equal(ExpertRun(x, w, torch.bfloat16, bf16).change(w, wq), ExpertRun(x, w, torch.bfloat16).change(w, wq))
    run = ExpertRun(x, w, torch.bfloat16, bf16)
    cast = {r: (wq[r] - w[r]).to(torch.bfloat16) for r in w}
    assert torch.equal(run.cast_change(cast, wq["down"].to(torch.bfloat16)), run.change(w, wq))
    with pytest.raises(ValueError, match="in torch.bfloat16 was given a forward's products in torch.float32"):
        ExpertRun(x, w, torch.bfloat16, fp32)
