"""Calibration runs in bf16 (``--calib-dtype``): when it is chosen, and what it leaves in fp32."""

import pytest
import torch
from dmpq_compile.passes import PassContext, PassError, PassManager, make_pass

from dmpq_compile.frontend import load
from dmpq_compile.ir import Interpreter, RunOptions, ops
from dmpq_compile.ir.interpreter import compute_dtype


def _bf16_experts(graph):
    for node in graph.experts():
        for key in node.params.values():
            graph.weights.set(key, graph.weights[key].to(torch.bfloat16))


def test_auto_takes_bf16_only_where_measured_faster_with_bf16_experts(tiny_dirs, monkeypatch):
    from dmpq_compile import sysinfo
    from dmpq_compile.ir import interpreter

    g = load(tiny_dirs("olmoe"))
    monkeypatch.setattr(sysinfo, "cpu_flags", lambda: ["avx2", "avx512f", "avx512_bf16"])
    timed = []
    monkeypatch.setattr(interpreter, "bf16_speedup", lambda rows, cols: timed.append((rows, cols)) or 2.3)
    assert compute_dtype(g, "auto") is None  # the sample's experts are fp32: nothing to gain, exact stays exact
    assert not timed  # and nothing was timed for it
    _bf16_experts(g)
    assert compute_dtype(g, "auto") == torch.bfloat16  # an AMD EPYC Zen 4: bf16 at 2.3x fp32's speed
    rows, cols = timed[-1]
    assert (rows, cols) == tuple(g.weights.shape(next(iter(next(iter(g.experts())).params.values()))))
    monkeypatch.setattr(interpreter, "bf16_speedup", lambda rows, cols: 0.6)  # AVX-512 BF16 without AMX
    assert compute_dtype(g, "auto") is None
    monkeypatch.setattr(interpreter, "bf16_speedup", lambda rows, cols: interpreter.BF16_MIN_SPEEDUP - 0.01)
    assert compute_dtype(g, "auto") is None
    monkeypatch.setattr(interpreter, "bf16_speedup", lambda rows, cols: 2.3)
    monkeypatch.setattr(sysinfo, "cpu_flags", lambda: ["avx2", "fma"])  # bf16 would be emulated: slower
    assert compute_dtype(g, "auto") is None
    assert compute_dtype(g, "bfloat16") == torch.bfloat16 and compute_dtype(g, "float32") is None
    with pytest.raises(ValueError, match="compute dtype must be one of"):
        compute_dtype(g, "fp8")
    with pytest.raises(PassError, match="compute_dtype must be one of"):
        make_pass("sensitivity", compute_dtype="half")


def test_routing_decisions_stay_fp32_under_autocast():
    torch.manual_seed(0)
    x, w = torch.randn(2, 64, 256), torch.randn(64, 256)
    attrs = {"top_k": 8, "norm_topk_prob": False}
    ref = ops.route(x, w, attrs)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = ops.route(x, w, attrs)
    assert got.logits.dtype == torch.float32 and torch.equal(got.indices, ref.indices)
    assert torch.equal(got.weights, ref.weights)


def test_autocast_run_is_close_to_fp32(tiny_dirs, calib_ids):
    g = load(tiny_dirs("qwen3_moe"))
    ids = calib_ids("qwen3_moe")
    interp = Interpreter(g, quantize=False)
    with torch.no_grad():
        ref = interp.run(ids, RunOptions(quantize=False))["lm_head"]
        got = interp.run(ids, RunOptions(quantize=False, autocast=torch.bfloat16))["lm_head"]
    assert not torch.equal(got.float(), ref)  # it did run in bf16
    # close on average; a token whose top-k routing flips on the rounded input differs more
    assert float((got.float() - ref).abs().mean()) < 0.05 * float(ref.abs().mean())
    lp, lq = torch.log_softmax(ref, -1), torch.log_softmax(got.float(), -1)
    assert float((lp.exp() * (lp - lq)).sum(-1).mean()) < 1e-2


@pytest.mark.parametrize("family", ["olmoe", "qwen3_moe"])
def test_bf16_sensitivity_agrees_with_fp32(family, tiny_dirs, calib_ids):
    """The bf16 runs only weight the changes (the gradient, the inputs); each change keeps its own
    precision (ExpertRun; non-expert nodes recomputed in fp32), so even the 8-bit estimates, whose
    changes are smaller than bf16's rounding of an activation, agree with the fp32 pass."""
    ids = calib_ids(family)
    out = {}
    for dtype in ("float32", "bfloat16"):
        g = load(tiny_dirs(family))
        ctx = PassContext(calibration=ids, progress=False)
        g = PassManager([make_pass("profile", compute_dtype=dtype),
                         make_pass("sensitivity", bits=(2, 4, 8), compute_dtype=dtype,
                                   nonexpert=("attention",))]).run(g, ctx)
        out[dtype] = g
    fp, bf = out["float32"], out["bfloat16"]
    tok_a = torch.tensor([n.ann["tokens"] for n in fp.experts()], dtype=torch.float64)
    tok_c = torch.tensor([n.ann["tokens"] for n in bf.experts()], dtype=torch.float64)
    assert tok_a.sum() == tok_c.sum() and float((tok_a - tok_c).abs().max()) <= 0.1 * float(tok_a.mean())
    for b in (2, 4, 8):
        a = torch.tensor([n.ann["kl"][b] for n in fp.experts()], dtype=torch.float64)
        c = torch.tensor([n.ann["kl"][b] for n in bf.experts()], dtype=torch.float64)
        assert float(((a - c).abs() / a.clamp_min(1e-12)).median()) < 0.1, b
        assert float((c.sum() - a.sum()).abs() / a.sum()) < 0.1, b
        assert float(torch.corrcoef(torch.stack([a, c]))[0, 1]) > 0.98, b
        for node in fp.nodes("attention"):
            ka, kc = node.ann["kl"][b], bf.node(node.id).ann["kl"][b]
            # one node's estimate rests on one gradient through every later layer, which the rounded
            # runs change more (on these tiny models, routing too): same order, not the same digits
            assert 0.5 * ka <= kc <= 2 * ka, (node.id, b, ka, kc)


def test_bf16_expert_change_keeps_an_8bit_change():
    """An 8-bit change of an expert's output is a few 2^-8 of it: subtracting two bf16 products would
    lose it in the rounding; ExpertRun's products of differences keep it to bf16's relative precision."""
    from dmpq_compile.passes.sensitivity.local import ExpertRun

    from dmpq_compile.quant.rtn import fake_quantize_spec
    from dmpq_compile.quant.spec import QuantSpec

    torch.manual_seed(0)
    h, i = 256, 128
    w = {"gate": torch.randn(i, h) / h**0.5, "up": torch.randn(i, h) / h**0.5, "down": torch.randn(h, i) / i**0.5}
    x = torch.randn(200, h)
    for bits in (2, 8):
        wq = {r: fake_quantize_spec(t, QuantSpec(bits=bits, group_size=64)) for r, t in w.items()}
        exact = ExpertRun(x.double(), {r: t.double() for r, t in w.items()}).change(
            {r: t.double() for r, t in w.items()}, {r: t.double() for r, t in wq.items()}).float()
        fp32 = ExpertRun(x, w).change(w, wq)
        bf16 = ExpertRun(x, w, torch.bfloat16).change(w, wq)
        naive = (ops.swiglu(x.bfloat16(), *(wq[r].bfloat16() for r in ("gate", "up", "down")))
                 - ops.swiglu(x.bfloat16(), *(w[r].bfloat16() for r in ("gate", "up", "down")))).float()
        def rel(d, exact=exact):
            return float((d - exact).norm() / exact.norm())
        assert rel(fp32) < 1e-4
        assert rel(bf16) < 0.02, (bits, rel(bf16))
        if bits == 8:
            assert rel(naive) > 5 * rel(bf16), (rel(naive), rel(bf16))


@pytest.mark.parametrize("qk_norm", ["full", "head"])
def test_bf16_attention_change_keeps_an_8bit_change(qk_norm):
    """AttentionRun prices an attention node's 8-bit change from bf16 products of weight differences
    to bf16's relative precision of the change, where subtracting two bf16 attentions would not."""
    from dmpq_compile.passes.sensitivity.local import AttentionRun

    from dmpq_compile.quant.rtn import fake_quantize_spec
    from dmpq_compile.quant.spec import QuantSpec

    torch.manual_seed(0)
    h, nh, nkv, hd = 256, 4, 2, 64
    attrs = {"num_heads": nh, "num_kv_heads": nkv, "head_dim": hd, "qk_norm": qk_norm, "eps": 1e-6,
             "rope_theta": 10000.0}
    norm_dim = hd if qk_norm == "head" else None
    w = {"q": torch.randn(nh * hd, h) / h**0.5, "k": torch.randn(nkv * hd, h) / h**0.5,
         "v": torch.randn(nkv * hd, h) / h**0.5, "o": torch.randn(h, nh * hd) / (nh * hd)**0.5,
         "q_norm": 1 + 0.1 * torch.randn(norm_dim or nh * hd), "k_norm": 1 + 0.1 * torch.randn(norm_dim or nkv * hd)}
    x = torch.randn(3, 40, h)
    for bits in (2, 8):
        wq = {r: fake_quantize_spec(t, QuantSpec(bits=bits, group_size=64)) if r in "qkvo" else t for r, t in w.items()}
        exact = (ops.attention(x.double(), {r: t.double() for r, t in wq.items()}, attrs)
                 - ops.attention(x.double(), {r: t.double() for r, t in w.items()}, attrs)).float()
        bf16 = AttentionRun(x, w, attrs, torch.bfloat16).change(w, wq)
        with torch.autocast("cpu", dtype=torch.bfloat16):  # as a bf16 run computes each side
            naive = (ops.attention(x, wq, attrs).float() - ops.attention(x, w, attrs).float())

        def rel(d, exact=exact):
            return float((d - exact).norm() / exact.norm())
        assert rel(bf16) < 0.03, (bits, rel(bf16))
        if bits == 8:
            assert rel(naive) > 5 * rel(bf16), (rel(naive), rel(bf16))


def test_embedding_kl_does_not_count_the_bf16_forward(tiny_dirs, calib_ids):
    """The embedding table's measured KL compares two fp32 forwards, whatever precision the last
    layer's output the pass hands it came from (a bf16 reference would add bf16's own KL to fp32)."""
    from dmpq_compile.passes.sensitivity import local

    from dmpq_compile.ir.stream import run_layers

    ids = calib_ids("mixtral")
    interp = Interpreter(load(tiny_dirs("mixtral")), quantize=False)
    with torch.no_grad():
        h32 = run_layers(interp, ids, RunOptions(quantize=False))
        h16 = run_layers(interp, ids, RunOptions(quantize=False, autocast=torch.bfloat16))
    got = {name: local.measured_kl(interp, ids, h, {"embed": (4, 8)}, embed_sequences=4)["embed"]
           for name, h in (("fp32", h32), ("bf16", h16))}
    assert got["fp32"] == got["bf16"]


def test_the_pass_cache_keys_the_resolved_dtype(tiny_dirs, calib_ids, monkeypatch):
    """``auto`` resolves per machine: a result measured in bf16 is not reused where auto means fp32."""
    from dmpq_compile.passes.infra.cache import cache_key

    from dmpq_compile import sysinfo
    from dmpq_compile.ir import interpreter

    monkeypatch.setattr(interpreter, "bf16_speedup", lambda rows, cols: 2.3)
    g = load(tiny_dirs("olmoe"))
    _bf16_experts(g)
    ctx = PassContext(calibration=calib_ids("olmoe"), progress=False)
    keys = {}
    for flags in (["avx512_bf16"], ["avx2"]):
        monkeypatch.setattr(sysinfo, "cpu_flags", lambda flags=flags: flags)
        keys[flags[0]] = cache_key(make_pass("sensitivity"), g, ctx)
    assert keys["avx512_bf16"] != keys["avx2"]


def test_bf16_speedup_is_timed_once_per_shape():
    """The real timing: a positive ratio, the same one for a second call (profile and sensitivity of
    one compile must take the same dtype)."""
    from dmpq_compile.ir.interpreter import bf16_speedup

    first = bf16_speedup(64, 128)
    assert first > 0 and bf16_speedup(64, 128) == first
    assert bf16_speedup.cache_info().hits >= 1


def test_the_reports_record_what_auto_decided_by(tiny_dirs, calib_ids, monkeypatch):
    """Where ``auto`` timed the products, the profile and sensitivity reports carry the measured speedup (the
    figure the decision took); where it needed no timing, or the dtype was forced, nothing."""
    from dmpq_compile import sysinfo
    from dmpq_compile.ir import interpreter

    g = load(tiny_dirs("olmoe"))
    monkeypatch.setattr(sysinfo, "cpu_flags", lambda: ["avx2", "avx512f", "avx512_bf16"])
    assert interpreter.dtype_evidence(g) == {}  # fp32 experts: auto is fp32 without timing
    _bf16_experts(g)
    monkeypatch.setattr(interpreter, "bf16_speedup", lambda rows, cols: 1.23456)  # below BF16_MIN_SPEEDUP
    assert interpreter.dtype_evidence(g) == {"bf16_speedup": 1.235}
    assert interpreter.dtype_evidence(g, "float32") == {} and interpreter.dtype_evidence(g, "bfloat16") == {}
    ctx = PassContext(calibration=calib_ids("olmoe"), progress=False)
    profile = make_pass("profile").run(g, ctx)
    sensitivity = make_pass("sensitivity").run(profile.graph, ctx)
    for stats in (profile.stats, sensitivity.stats):
        assert stats["bf16_speedup"] == 1.235 and stats["compute_dtype"] == "float32"
    forced = make_pass("profile", compute_dtype="float32").run(g, ctx)
    assert "bf16_speedup" not in forced.stats and forced.stats["compute_dtype"] == "float32"
