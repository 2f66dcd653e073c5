import pytest
import torch
from dmpq_compile.passes import PassContext, PassError, make_pass

from dmpq_compile.frontend import load
from dmpq_compile.ir import Interpreter, load_graph, save_graph
from dmpq_compile.quant import fake_quantize
from dmpq_compile.quant.stored import dequantize_stored


def _bits_graph(tiny_dirs):
    g = load(tiny_dirs("qwen3_moe"))
    for i, n in enumerate(g.experts()):
        g.annotate(n.id, "bits", (2, 3, 4, 8, 16)[i % 5])
    return g


def test_stored_tensors_match_rtn_and_drive_the_interpreter(tiny_dirs, tmp_path):
    g = _bits_graph(tiny_dirs)
    ids = torch.arange(30).view(2, 15) % g.meta["vocab_size"]
    with torch.no_grad():
        before = Interpreter(g, quantize=True)(ids)  # RTN fake quant at annotated bits
    g = make_pass("quantize", group_size=16).call(g, PassContext(progress=False)).graph
    for n in g.experts():
        q = n.ann["quant"]
        assert q["spec"]["bits"] == n.ann["bits"]
        if n.ann["bits"] == 16:
            assert q["tensors"] == {}
            continue
        for role in ("gate", "up", "down"):
            w = g.weights[n.params[role]]
            assert torch.equal(dequantize_stored(g.weights, q, role), fake_quantize(w, n.ann["bits"], 16))
            packed = g.weights[q["tensors"][role]["q"]]
            assert packed.dtype == torch.uint8 and packed.shape[1] == (w.shape[1] * n.ann["bits"] + 7) // 8
    g.meta["group_size"] = 64  # stored tensors (group 16) must win over RTN at the meta group size
    with torch.no_grad():
        after = Interpreter(g, quantize=True)(ids)
    g.meta["group_size"] = 16
    for n in g.experts():
        g.g.nodes[n.id]["ann"].pop("quant")
    with torch.no_grad():
        rtn16 = Interpreter(g, quantize=True)(ids)
    assert torch.allclose(after, rtn16, atol=1e-6)
    assert not torch.allclose(before, after, atol=1e-4)


def test_quantized_graph_round_trips(tiny_dirs, tmp_path):
    g = make_pass("quantize", group_size=32).call(_bits_graph(tiny_dirs), PassContext(progress=False)).graph
    save_graph(g, tmp_path / "ir")
    h = load_graph(tmp_path / "ir")
    ids = torch.arange(16).view(1, 16)
    with torch.no_grad():
        assert torch.equal(Interpreter(g)(ids), Interpreter(h)(ids))


def test_requires_bits(tiny_dirs):
    with pytest.raises(PassError, match="needs annotations \\['bits'\\]"):
        make_pass("quantize").call(load(tiny_dirs("mixtral")), PassContext(progress=False))


def test_unknown_method():
    with pytest.raises(PassError, match="method must be one of"):
        make_pass("quantize", method="awq")


@pytest.mark.parametrize("method", ["gptq", "hqq"])
def test_strong_ptq_methods_beat_rtn_on_calibration_kl(method, tiny_dirs, calib_ids):
    import torch.nn.functional as F

    ids = calib_ids("mixtral")
    base = load(tiny_dirs("mixtral"))
    for n in base.experts():
        base.annotate(n.id, "bits", 2)
    with torch.no_grad():
        ref = F.log_softmax(Interpreter(base, quantize=False)(ids), -1)

    def kl(method):
        g = base.copy()
        ctx = PassContext(calibration=ids, progress=False)
        g = make_pass("quantize", method=method, group_size=32).call(g, ctx).graph
        assert all(n.ann["quant"]["spec"]["method"] == method for n in g.experts())
        with torch.no_grad():
            logp = F.log_softmax(Interpreter(g, quantize=True)(ids), -1)
        return float((ref.exp() * (ref - logp)).sum(-1).mean())

    assert kl(method) < kl("rtn")


def test_gptq_needs_calibration(tiny_dirs):
    g = _bits_graph(tiny_dirs)
    with pytest.raises(PassError, match="needs calibration data"):
        make_pass("quantize", method="gptq").call(g, PassContext(progress=False))


def test_gptq_quantizes_roles_sharing_a_hessian_together_with_the_same_codes(tiny_dirs):
    """An expert's gate and up read one Hessian: the pass runs GPTQ once over their stacked rows,
    and the codes are those of one run per role (rows are independent given H)."""
    from dmpq_compile.passes.quantize import QuantizePass, _shared_hessian_groups

    from dmpq_compile.quant import QuantSpec
    from dmpq_compile.quant.gptq import gptq_quantize

    g = load(tiny_dirs("mixtral"))
    node = next(iter(g.experts()))
    g.annotate(node.id, "bits", 2)
    k_in, k_mid = g.weights[node.params["gate"]].shape[1], g.weights[node.params["down"]].shape[1]
    torch.manual_seed(0)
    x, mid = torch.randn(512, k_in), torch.randn(512, k_mid)
    h, h_down = x.T @ x / 512, mid.T @ mid / 512
    hessians = {(node.id, "gate"): h, (node.id, "up"): h, (node.id, "down"): h_down}
    spec = QuantSpec(bits=2, group_size=32, method="gptq")
    assert _shared_hessian_groups(node, spec, hessians) == [("gate", "up"), ("down",)]
    assert _shared_hessian_groups(node, QuantSpec(bits=2, group_size=32), hessians) == [("gate",), ("up",), ("down",)]
    equal_copy = {**hessians, (node.id, "up"): h.clone()}  # equal values, another tensor: not grouped
    assert _shared_hessian_groups(node, spec, equal_copy) == [("gate",), ("up",), ("down",)]
    QuantizePass(method="gptq", group_size=32).quantize_node(g, g.node(node.id), hessians)
    quant = g.node(node.id).ann["quant"]
    for role, hr in (("gate", h), ("up", h), ("down", h_down)):
        alone = gptq_quantize(g.weights[node.params[role]].float(), hr, spec)
        stored = quant["tensors"][role]
        assert torch.equal(g.weights[stored["scale"]].float(), alone.scale)
        assert torch.equal(dequantize_stored(g.weights, quant, role),
                           (alone.q.float() - alone.zero.float().repeat_interleave(32, 1)) *
                           alone.scale.repeat_interleave(32, 1))
