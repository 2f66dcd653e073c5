"""Tests of the ``qat`` pass (quantization-aware fine-tuning) on a tiny Mixtral."""

import pytest
import torch
import torch.nn.functional as F
from dmpq_compile.passes import PassContext, PassError, PassManager, make_pass
from dmpq_compile.passes.qat import QATOptions, QATPass, batch_stream, lr_factor, split_calibration

from dmpq_compile.frontend import load
from dmpq_compile.ir import Interpreter
from dmpq_compile.quant import fake_quantize

FAMILY = "mixtral"


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny matmuls: one intra-op thread is fastest, and avoids OpenMP spin-waits on shared cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _graph(tiny_dirs, bits=lambda i, n: 2):
    g = load(tiny_dirs(FAMILY))
    for i, n in enumerate(g.experts()):
        g.annotate(n.id, "bits", bits(i, n))
    return g


def _ctx(calib_ids, seed=0):
    return PassContext(calibration=calib_ids(FAMILY), progress=False, seed=seed)


def _heldout_kl(graph, fp_graph, ids):
    """KL(FP || RTN fake-quantized) per token, computed independently of the pass."""
    with torch.no_grad():
        ref = F.log_softmax(Interpreter(fp_graph, quantize=False)(ids), dim=-1).flatten(0, 1)
        q = F.log_softmax(Interpreter(graph, quantize=True)(ids), dim=-1).flatten(0, 1)
    return float(F.kl_div(q, ref, log_target=True, reduction="batchmean"))


def _keys(graph, kinds):
    return {key for n in graph.nodes() if n.kind in kinds for key in n.params.values()}


def test_qat_reduces_heldout_kl_and_freezes_the_rest(tiny_dirs, calib_ids):
    g = _graph(tiny_dirs)
    original = g.copy()  # shallow weight store: set() on g does not touch it
    ids = calib_ids(FAMILY)
    heldout = split_calibration(ids, 0.25)[1]
    assert torch.equal(heldout, ids[-2:])
    before = _heldout_kl(g, original, heldout)

    result = QATPass(steps=30, lr=1e-3).call(g, _ctx(calib_ids))
    s = result.stats
    after = _heldout_kl(g, original, heldout)
    assert result.modified and s["steps"] == 30 and s["stop_reason"] == "steps"
    assert s["tokens"] == 30 * 4 * ids.shape[1] and s["train_sequences"] == 6 and s["eval_sequences"] == 2
    assert after < 0.9 * before, (before, after)
    assert s["kl_before"] == pytest.approx(before, rel=1e-4) and s["kl_after"] == pytest.approx(after, rel=1e-4)
    assert s["train_loss_last"] < s["train_loss_first"]

    for key in _keys(g, ("embed", "norm", "attention", "router", "lm_head")):
        assert g.weights.version(key) == original.weights.version(key), key  # never rewritten
    for key in _keys(g, ("expert",)):
        assert not torch.equal(g.weights[key], original.weights[key]), key
        assert g.weights[key].dtype == original.weights[key].dtype
    assert all(n.ann["group_size"] == 64 for n in g.experts())

    # the quantize pass then stores codes that reproduce the RTN forward QAT optimised
    with torch.no_grad():
        rtn = Interpreter(g, quantize=True)(heldout)
        g = make_pass("quantize", group_size=64).call(g, PassContext(progress=False)).graph
        stored = Interpreter(g, quantize=True)(heldout)
    assert torch.allclose(rtn, stored, atol=1e-5)


def _odd_experts_16(i, node):
    return 16 if node.attrs["expert"] % 2 else 2


def test_16_bit_experts_untouched_without_train_fp_experts(tiny_dirs, calib_ids):
    bits = _odd_experts_16
    g = _graph(tiny_dirs, bits)
    original = g.copy()
    result = QATPass(steps=8, lr=1e-3, train_fp_experts=False).call(g, _ctx(calib_ids))
    assert result.modified and result.stats["fake_quantized_nodes"] == 4
    for n in g.experts():
        for key in n.params.values():
            if n.ann["bits"] == 16:
                assert g.weights.version(key) == original.weights.version(key), key
                assert "group_size" not in n.ann
            else:
                assert not torch.equal(g.weights[key], original.weights[key]), key

    g = _graph(tiny_dirs, bits)  # default: 16-bit experts train in full precision
    assert QATPass(steps=8, lr=1e-3).call(g, _ctx(calib_ids)).modified
    fp_keys = {k for n in g.experts() if n.ann["bits"] == 16 for k in n.params.values()}
    assert any(not torch.equal(g.weights[k], original.weights[k]) for k in fp_keys)


def test_router_and_nonexpert_train_when_asked(tiny_dirs, calib_ids):
    g = _graph(tiny_dirs)
    original = g.copy()
    result = QATPass(steps=10, lr=1e-3, train_router=True, train_nonexpert=True).call(g, _ctx(calib_ids))
    assert result.modified and result.stats["kl_after"] < result.stats["kl_before"]
    for kind in ("router", "attention", "embed", "lm_head", "norm"):
        keys = _keys(g, (kind,))
        assert any(not torch.equal(g.weights[k], original.weights[k]) for k in keys), kind


def test_learnable_scales_bake_to_rtn_grid(tiny_dirs, calib_ids):
    g = _graph(tiny_dirs)
    original = g.copy()
    result = QATPass(steps=20, lr=1e-3, learnable_scales=True, group_size=32).call(g, _ctx(calib_ids))
    s = result.stats
    assert result.modified and s["kl_after"] < s["kl_before"]
    assert s["bake_mismatch_frac"] == 0.0 and s["bake_max_abs_diff"] < 1e-6 and s["bake_rel_rms_diff"] < 1e-6
    for n in g.experts():
        assert n.ann["group_size"] == 32
        for key in n.params.values():
            w = g.weights[key]
            assert torch.allclose(fake_quantize(w, 2, 32), w, atol=1e-6)  # already on its RTN grid
            assert not torch.equal(w, original.weights[key])


def test_deterministic_for_a_seed_and_eval_every_keeps_the_best(tiny_dirs, calib_ids):
    runs = []
    for seed in (0, 0, 1):
        g = _graph(tiny_dirs)
        r = QATPass(steps=9, lr=1e-3, batch_size=2, eval_every=3).call(g, _ctx(calib_ids, seed))
        runs.append((g, r.stats))
    (a, sa), (b, sb), (c, _) = runs
    key = a.experts()[0].params["gate"]
    assert torch.equal(a.weights[key], b.weights[key]) and sa["kl_after"] == sb["kl_after"]
    assert not torch.equal(a.weights[key], c.weights[key])
    assert sa["best_step"] in (3, 6, 9) and sa["kl_after"] < sa["kl_before"]


def test_stops_on_time_and_token_budgets(tiny_dirs, calib_ids):
    s = QATPass(steps=10**6, lr=1e-4, time_budget_s=0.3).call(_graph(tiny_dirs), _ctx(calib_ids)).stats
    assert s["stop_reason"] == "time_budget_s" and 1 <= s["steps"] < 10**6 and s["seconds"] < 3.0

    s = QATPass(steps=100, lr=1e-4, max_tokens=1000).call(_graph(tiny_dirs), _ctx(calib_ids)).stats
    assert s["stop_reason"] == "max_tokens" and s["steps"] == 1000 // 128 and s["tokens"] == 7 * 128


@pytest.mark.parametrize("options, message", [
    ({"loss": "mse"}, "loss must be one of"),
    ({"steps": 0}, "steps must be an int >= 1"),
    ({"lr": -1.0}, "lr must be a finite number > 0"),
    ({"eval_fraction": 1.0}, "eval_fraction must be in"),
    ({"train_router": "no"}, "train_router must be True or False"),
    ({"time_budget_s": 0}, "time_budget_s must be"),
    ({"step": 5}, "unknown option"),
])
def test_options_validated(options, message):
    with pytest.raises(PassError, match=message):
        QATPass(**options)


def test_contract_errors(tiny_dirs, calib_ids):
    g = load(tiny_dirs(FAMILY))
    with pytest.raises(PassError, match="requires \\['bits'\\]"):
        PassManager([QATPass()]).check(g)
    with pytest.raises(PassError, match="needs calibration"):
        QATPass().call(_graph(tiny_dirs), PassContext(progress=False))
    with pytest.raises(PassError, match="nothing to train"):
        QATPass(train_fp_experts=False).call(_graph(tiny_dirs, lambda i, n: 16), _ctx(calib_ids))
    quantized = make_pass("quantize").call(_graph(tiny_dirs), PassContext(progress=False)).graph
    with pytest.raises(PassError, match="must run before 'quantize'"):
        QATPass().call(quantized, _ctx(calib_ids))


def test_schedule_and_batches():
    assert QATOptions().loss == "kl" and QATOptions().train_fp_experts and not QATOptions().train_router
    assert lr_factor(0, 2, 10) == pytest.approx(1 / 3) and lr_factor(2, 2, 10) == pytest.approx(1.0)
    assert lr_factor(10, 2, 10) == pytest.approx(0.0) and 0 < lr_factor(6, 2, 10) < 1
    stream = batch_stream(5, 2, seed=0)
    seen = torch.cat([next(stream) for _ in range(5)])  # two epochs
    assert sorted(seen.tolist()) == sorted(list(range(5)) * 2)
    one = torch.zeros(1, 8, dtype=torch.long)
    assert split_calibration(one, 0.25)[1] is one


def test_qat_refuses_a_model_that_cannot_fit_before_any_work(tiny_dirs):
    from dmpq_compile.passes.infra.base import PassError
    from dmpq_compile.passes.qat import check_fits

    g = _graph(tiny_dirs)
    n = sum(g.weights[k].numel() for k in g.weights)
    check_fits(g, available=100 * n)  # fits: nothing raised
    with pytest.raises(PassError, match=r"does not fit.*use --qat-mode blockwise or auto.*or compile without --qat"):
        check_fits(g, available=10 * n)


def test_qat_trains_toward_the_targets_formats(tiny_dirs, calib_ids):
    """trt-a100 stores 8-bit weights per-channel symmetric: QAT's forward must use that grid (and
    learnable scales, which exist only for the group-wise asymmetric format, stay off there)."""
    from dmpq_compile.backends import get_backend
    from dmpq_compile.passes.qat import collect_trainables, select_uses

    from dmpq_compile.quant import fake_quantize_spec

    trt = get_backend("trt-a100")
    g = _graph(tiny_dirs, bits=lambda i, n: 8 if i % 2 else 4)
    o = QATOptions(learnable_scales=True)
    uses = [u for u in select_uses(g, o, trt.weight_formats) if u.bits < 16]
    tr = collect_trainables(g, o, uses)
    sym = trt.weight_formats[8].spec(64)
    assert {u.bits for u in uses} == {4, 8}
    for u in uses:
        w = tr.params[u.key].detach()
        if u.bits == 8:
            assert u.spec == sym and (u.key, 8, u.group_size) not in tr.scales
            assert torch.equal(tr.value(u).detach(), fake_quantize_spec(w, sym))
            assert not torch.equal(tr.value(u).detach(), fake_quantize(w, 8, 64))  # not the asymmetric grid
        else:
            assert (u.key, 4, u.group_size) in tr.scales
    ctx = PassContext(calibration=calib_ids(FAMILY), progress=False, backend=trt, target="trt-a100")
    g = _graph(tiny_dirs, bits=lambda i, n: 8)
    result = QATPass(steps=5, lr=1e-3).call(g, ctx)
    assert result.stats["kl_after"] <= result.stats["kl_before"]


def test_nonexpert_weights_with_bits_train_through_ste(tiny_dirs):
    from dmpq_compile.passes.qat import select_uses

    g = _graph(tiny_dirs)
    att = next(g.nodes("attention"))
    g.annotate(att.id, "bits", 8)
    uses = {(u.node_id, u.role): u.bits for u in select_uses(g, QATOptions(train_nonexpert=True))}
    experts = {e.id for e in g.experts()}
    for (node, role), bits in uses.items():
        expected = 8 if node == att.id else 2 if node in experts and role in ("gate", "up", "down") else 16
        assert bits == expected, (node, role)
    assert all(uses[(att.id, r)] == 8 for r in ("q", "k", "v", "o"))
