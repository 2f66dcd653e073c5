"""``--nonexpert-bits auto``: attention, shared experts, dense MLPs, lm_head and the embedding table
as allocation items with their own sensitivity and stored bytes."""

import json

import pytest
import torch
import torch.nn.functional as F
from dmpq_compile.backends import get_backend
from dmpq_compile.passes import PassContext, PassError, PassManager, make_pass
from dmpq_compile.passes.precision import allocatable, split_auto
from dmpq_compile.passes.sensitivity import local

from dmpq_compile.compiler import CompileConfig, compile_model
from dmpq_compile.eval.metrics import next_token_logprobs, token_kl
from dmpq_compile.frontend import load
from dmpq_compile.ir import Interpreter, RunOptions

KINDS = ("attention", "shared_expert", "mlp", "lm_head", "embed")


def test_columns_follow_what_the_target_runs_per_kind(tiny_dirs):
    g = load(tiny_dirs("qwen2_moe"))
    ort = allocatable(g, get_backend("ort-cpu"), KINDS, (2, 4, 8, 16))
    assert ort["embed"] == {2: 2, 4: 4, 8: 8, 16: 16}  # rows looked up at 2 (unpacked), 4 and 8 bits
    assert ort["lm_head"] == {2: 2, 4: 4, 8: 8, 16: 16}
    assert {g.node(k).kind for k in ort} == {"attention", "shared_expert", "lm_head", "embed"}
    trt = allocatable(g, get_backend("trt-a100"), KINDS, (4, 8, 16))
    assert "embed" not in trt and trt["L0.attn"] == {4: 4, 8: 8, 16: 16}  # trt-a100 keeps the table fp16
    g.g.nodes["lm_head"]["params"]["weight"] = g.node("embed").params["weight"]  # tie them
    tied = allocatable(g, get_backend("ort-cpu"), KINDS, (2, 4, 8, 16))
    assert "lm_head" not in tied and "embed" not in tied and "L0.attn" in tied  # tied tables stay float


def test_split_auto():
    assert split_auto("auto") == (True, "")
    assert split_auto("auto,lm_head=8") == (True, "lm_head=8")
    assert split_auto("4,lm_head=8") == (False, "4,lm_head=8")
    with pytest.raises(ValueError, match="auto allocates every kind not named"):
        split_auto("auto,4")


def test_gradients_of_watched_nodes_equal_whole_model_autograd(tiny_dirs, calib_ids):
    """The gradient each non-expert node's estimate uses (its own output's; the residual stream's
    entering layer 0 for the embedding) is the whole model's."""
    ids = calib_ids("qwen2_moe")[:3]
    g = load(tiny_dirs("qwen2_moe"))
    interp = Interpreter(g, quantize=False)
    watched = {"L0.attn", "L1.attn", "L0.shared", "L1.shared"}
    outs = {}

    def keep(node_id, kind, value):
        if node_id in watched or node_id == "embed":
            value.retain_grad()
            outs[node_id] = value

    table = interp.stored(g.node("embed").params["weight"]).clone().requires_grad_(True)
    opts = RunOptions(quantize=False, observer=keep, weight_override={"embed": {"weight": table}})
    logits = interp.run(ids, opts)["lm_head"]
    F.log_softmax(logits[:, :-1], -1).gather(-1, ids[:, 1:, None]).sum().backward()
    store, h_last = local.forward_boundaries(interp, ids, RunOptions(quantize=False), lambda: None)
    got, g_in = {}, {}

    def after(layer, values, grads, g0):
        got.update({k: v.clone() for k, v in grads.items()})
        g_in[layer] = g0.clone()

    g_last = local.head_gradient(interp, h_last, ids, "true", None)
    local.backward_layers(interp, store, g_last, RunOptions(quantize=False), lambda *a: None, lambda: None,
                          lambda layer: {k for k in watched if k.startswith(f"L{layer}.")}, after)
    store.close()
    assert got.keys() == watched
    for k in watched:
        torch.testing.assert_close(got[k].reshape(outs[k].grad.shape), outs[k].grad, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(g_in[0], outs["embed"].grad, rtol=1e-4, atol=1e-6)


def _measured_kl(g, ids, node_id, bits):
    interp = Interpreter(g, quantize=False, formats=get_backend("ort-cpu").weight_formats)
    with torch.no_grad():
        ref = next_token_logprobs(interp.run(ids, RunOptions(quantize=False))["lm_head"])
        q = next_token_logprobs(interp.run(ids, RunOptions(quantize=False, bits_override={node_id: bits}))["lm_head"])
    return float(token_kl(ref, q).mean())


def test_nonexpert_sensitivity_tracks_measured_kl(tiny_dirs, calib_ids):
    ids = calib_ids("qwen2_moe")
    ctx = PassContext(calibration=ids, progress=False, backend=get_backend("ort-cpu"))
    g = PassManager([make_pass("profile"), make_pass("sensitivity", nonexpert=KINDS, label_samples=4, gradvar=False)]
                    ).run(load(tiny_dirs("qwen2_moe")), ctx)
    items = allocatable(g, ctx.backend, KINDS, (2, 4, 8, 16))
    assert all("kl" in g.node(k).ann for k in items)
    # the LM head's is measured, not estimated: equal to the whole model's KL
    for b in (2, 4):
        assert g.node("lm_head").ann["kl"][b] == pytest.approx(_measured_kl(g, ids, "lm_head", b), rel=1e-4)
    est, true = [], []
    for k in items:
        kl = g.node(k).ann["kl"]
        assert kl[16] == 0.0 and set(kl) == {*items[k].values()}
        lo, hi = min(b for b in kl if b < 16), 8
        assert kl[lo] > kl[hi] >= 0, (k, kl)  # fewer bits, more damage
        for b in (lo, hi):
            est.append(kl[b])
            true.append(_measured_kl(g, ids, k, b))
    ranks = lambda v: torch.tensor(v).argsort().argsort().double()
    assert torch.corrcoef(torch.stack([ranks(est), ranks(true)]))[0, 1] > 0.8, (est, true)


def test_embedding_kl_is_measured_on_its_sequences(tiny_dirs, calib_ids):
    from dmpq_compile.passes.sensitivity import local

    from dmpq_compile.ir.stream import run_layers

    ids = calib_ids("mixtral")
    g = load(tiny_dirs("mixtral"))
    interp = Interpreter(g, quantize=False, formats=get_backend("ort-cpu").weight_formats)
    with torch.no_grad():
        h_last = run_layers(interp, ids, RunOptions(quantize=False))
    got = local.measured_kl(interp, ids, h_last, {"embed": (2, 4)}, embed_sequences=3)["embed"]
    for b in (2, 4):
        assert got[b] == pytest.approx(_measured_kl(g, ids[:3], "embed", b), rel=1e-4)
    assert got[2] > got[4] > 0


def test_head_kl_is_the_same_with_its_reference_kept_or_recomputed(tiny_dirs, calib_ids, monkeypatch):
    """The LM head's reference log-probabilities are kept across bit-widths when they fit KEEP_REF_BYTES,
    else recomputed per chunk: the same KL either way, and the measurement's."""
    from dmpq_compile.passes.sensitivity import local

    from dmpq_compile.ir.stream import run_layers

    ids = calib_ids("olmoe")[:6]
    g = load(tiny_dirs("olmoe"))
    interp = Interpreter(g, quantize=False, formats=get_backend("ort-cpu").weight_formats)
    with torch.no_grad():
        h_last = run_layers(interp, ids, RunOptions(quantize=False))
    got = {}
    for bound in (0, 2**40):
        monkeypatch.setattr(local, "KEEP_REF_BYTES", bound)
        got[bound] = local.measured_kl(interp, ids, h_last, {"lm_head": (2, 4, 8)})["lm_head"]
    assert got[0] == got[2**40]
    for b in (2, 8):
        assert got[0][b] == pytest.approx(_measured_kl(g, ids, "lm_head", b), rel=1e-4)


def test_bf16_head_and_embedding_kl_price_the_change_alone(tiny_dirs, calib_ids):
    """With bf16 products the head's and the embedding's runs are the fp32 reference's logits plus
    the bf16 product of the change alone: within 1 % of the fp32 KL at every width, 8 bits
    included (where two bf16 logits, subtracted, would be mostly rounding)."""
    from dmpq_compile.passes.sensitivity import local

    from dmpq_compile.ir.stream import run_layers

    ids = calib_ids("olmoe")[:6]
    g = load(tiny_dirs("olmoe"))
    interp = Interpreter(g, quantize=False, formats=get_backend("ort-cpu").weight_formats)
    with torch.no_grad():
        h_last = run_layers(interp, ids, RunOptions(quantize=False))
    items = {"lm_head": (2, 4, 8), "embed": (4, 8)}
    fp32 = local.measured_kl(interp, ids, h_last, items, embed_sequences=3)
    bf16 = local.measured_kl(interp, ids, h_last, items, embed_sequences=3, autocast=torch.bfloat16)
    for node_id, bits in items.items():
        for b in bits:
            assert fp32[node_id][b] > 0
            assert bf16[node_id][b] == pytest.approx(fp32[node_id][b], rel=1e-2), (node_id, b)
    with torch.no_grad():  # the control: bf16 logits of both sides, subtracted
        x = local._head_input(interp, h_last)
        w = interp.weights("lm_head", RunOptions(quantize=False))["weight"]
        wq = interp.weights("lm_head", RunOptions(quantize=False, bits_override={"lm_head": 8}))["weight"]
        ref = torch.log_softmax(F.linear(x[:, :-1].bfloat16(), w.bfloat16()).float(), -1)
        q = torch.log_softmax(F.linear(x[:, :-1].bfloat16(), wq.bfloat16()).float(), -1)
    naive = float(token_kl(ref, q).mean())
    assert abs(naive - fp32["lm_head"][8]) > 10 * abs(bf16["lm_head"][8] - fp32["lm_head"][8])


def test_whole_method_refuses_nonexpert():
    with pytest.raises(PassError, match="local method only"):
        make_pass("sensitivity", method="whole", nonexpert=("attention",))


def _compile(model, out, corpus, sensitivity=None, **allocate):
    cfg = CompileConfig.from_dict({
        "target": "ort-cpu", "calibration": {"corpus": corpus, "sequences": 8, "seq_len": 32},
        "sensitivity": {"sequences": 8, **(sensitivity or {})},
        "allocate": {"budget_kind": "stored-bits", "nonexpert_allocate": True, **allocate}})
    return compile_model(model, out, cfg, progress=False)


def test_auto_compile_places_nonexpert_weights_within_the_stored_budget(tiny_dirs, tiny_corpus, tmp_path):
    model = tiny_dirs("qwen2_moe")
    art = _compile(model, tmp_path / "auto", corpus=str(tiny_corpus), budget=4.8, nonexpert_kinds={"embed": 8})
    manifest = json.loads((art / "manifest.json").read_text())
    report = json.loads((art / "report.json").read_text())
    alloc = next(p for p in report["passes"] if p["name"] == "allocate")["stats"]
    placed = alloc["nonexpert"]
    assert "embed" not in placed  # fixed by the policy part of auto,embed=8
    assert manifest["nonexpert"]["embed"]["bits"] == 8
    assert {k.split(".")[-1] for k in placed} >= {"attn", "shared", "lm_head"}
    for k, b in placed.items():
        assert manifest["nonexpert"][k]["bits"] == b
    assert manifest["storage"]["weights"]["bits_per_weight"] <= 4.8 + 1e-9
    assert len({*placed.values(), *(n["bits"] for n in manifest["experts"].values())}) > 1  # mixed


def test_auto_beats_or_matches_uniform_at_equal_stored_bits(tiny_dirs, tiny_corpus, tmp_path):
    """The control: the same items at one bit-width (uniform) against the optimum of the measured
    sensitivities, in the same stored budget, on the artifacts' KL to the float model."""
    from dmpq_compile.runtime import load as load_artifact

    model = tiny_dirs("mixtral")
    ids = torch.randint(0, 96, (4, 32), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = next_token_logprobs(Interpreter(load(model), quantize=False)(ids))
    kl = {}
    for allocator in ("optimal", "uniform"):
        art = _compile(model, tmp_path / allocator, corpus=str(tiny_corpus), budget=4.8, allocator=allocator)
        logits = torch.as_tensor(load_artifact(art).logits(ids.numpy()))
        kl[allocator] = float(token_kl(ref, next_token_logprobs(logits)).mean())
    assert kl["optimal"] < kl["uniform"], kl


@pytest.mark.parametrize(("cfg", "match"), [
    ({"allocator": "frequency"}, "places non-expert weights with allocators"),
    ({"budget_kind": "bits", "budget": 4.0}, "needs a whole-model budget"),
    ({"w_lat": 0.1}, "no cost table for non-expert nodes"),
    ({"sensitivity": {"enabled": False}}, "drop --no-sensitivity"),
])
def test_auto_refuses_what_it_cannot_do(tiny_dirs, tiny_corpus, tmp_path, cfg, match):
    with pytest.raises((ValueError, PassError), match=match):
        _compile(tiny_dirs("mixtral"), tmp_path / "x", corpus=str(tiny_corpus), **{"budget": 6.0, **cfg})
    assert not (tmp_path / "x").exists()


def test_auto_and_fixed_bits_are_exclusive():
    with pytest.raises(ValueError, match="nonexpert_bits must stay 16"):
        CompileConfig.from_dict({"allocate": {"nonexpert_allocate": True, "nonexpert_bits": 4}})


def test_inspect_prints_the_placed_nonexpert_bits_and_their_sensitivity(tiny_dirs, tiny_corpus, tmp_path, capsys):
    from dmpq_compile.cli import main

    art = _compile(tiny_dirs("mixtral"), tmp_path / "auto", corpus=str(tiny_corpus), budget=5.0)
    manifest = json.loads((art / "manifest.json").read_text())
    assert main(["inspect", str(art)]) == 0
    text = capsys.readouterr().out
    assert "weights outside the experts:" in text and "KL@2" in text and "of which quantized outside" in text
    row = next(line.split() for line in text.splitlines() if line.split()[:1] == ["lm_head"])
    assert int(row[2]) == manifest["nonexpert"]["lm_head"]["bits"]
    assert float(row[3]) == pytest.approx(manifest["nonexpert"]["lm_head"]["bits_per_weight"], abs=1e-3)
    assert main(["inspect", str(art), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    by_id = {r["id"]: r for r in out["nonexpert"]}
    assert by_id["L0.attn"]["kl"]["2"] > by_id["L0.attn"]["kl"]["8"] >= 0
