"""The non-expert precision policy (``precision`` pass, ``--nonexpert-bits``): attention, shared
experts, dense MLPs and an untied lm_head get one fixed bit-width, are quantized in the target's
declared format, emitted quantized on both targets (checked against the reference interpreter),
counted in the storage summary, and at the default 16 change nothing."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from dmpq_compile.backends import BackendError, get_backend
from dmpq_compile.backends.onnx_io import decoder_feed
from dmpq_compile.passes import PassContext, PassError, make_pass

from dmpq_compile.artifact import write_artifact
from dmpq_compile.cli import main
from dmpq_compile.compiler import CompileConfig, compile_model
from dmpq_compile.frontend import load
from dmpq_compile.ir.graph import NONEXPERT_QUANTIZABLE_KINDS, QUANT_ROLES
from dmpq_compile.ir.interpreter import Interpreter, RunOptions
from dmpq_compile.testing import make_tiny_checkpoint

IDS = np.random.default_rng(0).integers(0, 96, size=(2, 12)).astype(np.int64)


def _graph(path, target, nonexpert_bits, expert_bits=(4, 8), method="rtn", calibration=None):
    g = load(path)
    ctx = PassContext(progress=False, backend=get_backend(target), calibration=calibration)
    result = make_pass("precision", nonexpert_bits=nonexpert_bits).call(g, ctx)
    for i, n in enumerate(result.graph.experts()):
        result.graph.annotate(n.id, "bits", expert_bits[i % len(expert_bits)])
    g = make_pass("quantize", method=method, group_size=16).call(result.graph, ctx).graph
    return g, result


def _options(target):
    return {"accuracy_level": 0} if target == "ort-cpu" else {"precision": "fp32", "dispatch": "dense"}


def _ort_logits(art):
    manifest = json.loads((art / "manifest.json").read_text())
    io = manifest["target"]["io"]
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    sess = ort.InferenceSession(str(art / manifest["target"]["model_file"]), so, providers=["CPUExecutionProvider"])
    assert io["input_ids"] == "input_ids"
    return sess.run(["logits"], decoder_feed(sess, IDS))[0], manifest


def _consumers(model: onnx.ModelProto, op_type: str) -> set[str]:
    """Initializer names read by ``op_type`` nodes (weights of MatMulNBits / DequantizeLinear)."""
    inits = {t.name for t in model.graph.initializer}
    return {i for n in model.graph.node if n.op_type == op_type for i in n.input if i in inits}


def _sha(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# -- the policy --------------------------------------------------------------------------------
def test_precision_annotates_every_nonexpert_linear_node(tiny_dirs):
    g, result = _graph(tiny_dirs("qwen2_moe"), "ort-cpu", 8)
    assert result.modified
    kinds = {n.kind for n in g.nodes() if n.kind != "expert" and "bits" in n.ann}
    # the tiny qwen2_moe has no dense MLP layer; ort-cpu looks up 8-bit embedding rows
    assert kinds == {"attention", "shared_expert", "lm_head", "embed"}
    assert all(n.ann["bits"] == 8 for n in g.nodes() if n.kind in kinds)
    assert all("bits" not in n.ann for n in g.nodes() if n.kind in ("router", "norm"))
    assert result.stats["nodes"] == {"attention": 2, "shared_expert": 2, "lm_head": 1, "embed": 1}
    for n in (n for n in g.nodes() if n.kind in kinds):  # quantized in ort-cpu's format, all linear roles
        assert set(n.ann["quant"]["tensors"]) == set(QUANT_ROLES[n.kind])
        assert n.ann["quant"]["spec"]["scheme"] == "affine-asym-v1" and n.ann["quant"]["spec"]["bits"] == 8


def test_dense_mlp_layers_are_covered(tmp_path):
    path = make_tiny_checkpoint("qwen2_moe", tmp_path / "m", mlp_only_layers=[0])
    g, _ = _graph(path, "ort-cpu", 4)
    mlps = list(g.nodes("mlp"))
    assert mlps and all(n.ann["bits"] == 4 and n.ann["quant"]["spec"]["bits"] == 4 for n in mlps)


def test_default_16_changes_nothing(tiny_dirs):
    g = load(tiny_dirs("mixtral"))
    before = {n.id: dict(n.ann) for n in g.nodes()}
    result = make_pass("precision").call(g, PassContext(progress=False, backend=get_backend("ort-cpu")))
    assert not result.modified
    assert {n.id: dict(n.ann) for n in result.graph.nodes()} == before


def test_tied_lm_head_stays_float(tmp_path):
    path = make_tiny_checkpoint("mixtral", tmp_path / "m", tie_word_embeddings=True)
    g, result = _graph(path, "ort-cpu", 8)
    assert "bits" not in g.node("lm_head").ann and "lm_head" not in result.stats["nodes"]
    assert all("bits" not in n.ann for n in g.nodes("embed"))  # the head reads the lookup's table
    art = write_artifact(g, get_backend("ort-cpu"), tmp_path / "art", emit_options=_options("ort-cpu"))
    got, _ = _ort_logits(art)
    with torch.no_grad():
        ref = Interpreter(g)(torch.from_numpy(IDS)).numpy()
    assert np.abs(got - ref).max() < 1e-4


# -- emitted quantized, matching the interpreter --------------------------------------------------
@pytest.mark.parametrize("target,bits,op", [("ort-cpu", 8, "MatMulNBits"), ("ort-cpu", 4, "MatMulNBits"),
                                            ("ort-cpu", 2, "MatMulNBits"), ("trt-a100", 8, "DequantizeLinear"),
                                            ("trt-a100", 4, "DequantizeLinear")])
def test_nonexpert_weights_are_emitted_quantized(tiny_dirs, tmp_path, target, bits, op):
    g, _ = _graph(tiny_dirs("qwen2_moe"), target, bits)
    art = write_artifact(g, get_backend(target), tmp_path / "art", emit_options=_options(target))
    got, manifest = _ort_logits(art)
    model = onnx.load(str(art / manifest["target"]["model_file"]))
    lookups = target == "ort-cpu"  # rows of the quantized table; trt-a100 keeps it float
    assert all(("bits" in n.ann) == lookups for n in g.nodes("embed"))
    for n in (n for n in g.nodes() if n.kind in NONEXPERT_QUANTIZABLE_KINDS and "bits" in n.ann):
        # GatherBlockQuantized at 4 and 8 bits; at 2, a plain Gather of the packed rows
        quantized = _consumers(model, ("GatherBlockQuantized" if bits in (4, 8) else "Gather") if n.kind == "embed"
                               else op)
        for role in QUANT_ROLES[n.kind]:
            # gate and up may share one product (ort-cpu stacks them: NODE.gate_up.*)
            assert any(name.startswith(f"{n.id}.") and role in name[len(n.id) + 1:].split(".")[0].split("_")
                       for name in quantized), f"{n.id}.{role} is not {op}"
            assert n.params[role] not in {t.name for t in model.graph.initializer}  # no float copy left
            assert f"{n.params[role]}.T" not in {t.name for t in model.graph.initializer}
    with torch.no_grad():
        ref = Interpreter(g)(torch.from_numpy(IDS)).numpy()  # fake-quantizes at the stored codes
        fp = Interpreter(g, quantize=False)(torch.from_numpy(IDS)).numpy()
    assert np.abs(got - ref).max() < 1e-4
    assert np.abs(got - fp).max() > 1e-3  # the comparison can tell quantized from float weights
    entry = manifest["nonexpert"]["L0.attn"]
    assert entry["bits"] == bits and entry["method"] == "rtn" and entry["bytes"] > 0


def test_interpreter_fake_quantizes_attention_and_lm_head_in_the_target_format(tiny_dirs):
    g = load(tiny_dirs("mixtral"))
    trt = get_backend("trt-a100")
    make_pass("precision", nonexpert_bits=8).call(g, PassContext(progress=False, backend=trt))
    interp = Interpreter(g, formats=trt.weight_formats)  # no stored codes: RTN at the declared format
    for node_id, role in (("L0.attn", "q"), ("lm_head", "weight")):
        fp = interp.weights(node_id, RunOptions(quantize=False))[role]
        w = interp.weights(node_id, RunOptions())[role]
        assert not torch.equal(w, fp)
        scale = fp.abs().amax(dim=1, keepdim=True) / 127  # per-channel symmetric INT8
        assert torch.allclose(w, torch.round(fp / scale).clamp(-127, 127) * scale, atol=1e-6)


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe"])
def test_gptq_rounds_nonexpert_weights_with_their_input_hessians(tiny_dirs, calib_ids, caplog, family):
    calib = calib_ids(family)
    g, _ = _graph(tiny_dirs(family), "ort-cpu", 4, method="gptq", calibration=calib)
    assert {n.ann["quant"]["spec"]["method"] for n in g.experts()} == {"gptq"}
    kinds = {n.kind: n.ann["quant"]["spec"]["method"] for n in g.nodes() if n.kind in NONEXPERT_QUANTIZABLE_KINDS}
    assert kinds == {"attention": "gptq", "lm_head": "gptq", "embed": "rtn",
                     **({"shared_expert": "gptq"} if family == "qwen2_moe" else {})}
    assert "embedding table is quantized with rtn" in caplog.text
    assert "cannot produce" not in caplog.text  # no format fell back (the embedding's rtn is not one)
    # GPTQ's codes fit the calibration activations better than RTN's: the model's output moves less
    rtn, _ = _graph(tiny_dirs(family), "ort-cpu", 4, method="rtn")
    ids = calib[:4]
    with torch.no_grad():
        fp = torch.log_softmax(Interpreter(g, quantize=False)(ids), -1)
        err = {name: torch.nn.functional.kl_div(torch.log_softmax(Interpreter(m)(ids), -1), fp, log_target=True,
                                                reduction="batchmean").item() for name, m in (("gptq", g), ("rtn", rtn))}
    assert err["gptq"] < err["rtn"], err


# -- bad values ------------------------------------------------------------------------------------
def test_bad_values_give_clear_errors(tiny_dirs, tmp_path):
    with pytest.raises(ValueError, match="nonexpert_bits must be one of"):
        CompileConfig.from_dict({"allocate": {"nonexpert_bits": 5}})
    with pytest.raises(PassError, match="nonexpert_bits must be one of"):
        make_pass("precision", nonexpert_bits=True)
    g = load(tiny_dirs("mixtral"))
    with pytest.raises(PassError, match=r"trt-a100 cannot run 2-bit weights for .*attention"):
        make_pass("precision", nonexpert_bits=2).call(g, PassContext(progress=False, backend=get_backend("trt-a100")))
    cfg = CompileConfig.from_dict({"target": "trt-a100", "allocate": {"nonexpert_bits": 2}})
    with pytest.raises(ValueError, match=r"--nonexpert-bits 2: target trt-a100 cannot run 2-bit attention"):
        compile_model(tiny_dirs("mixtral"), tmp_path / "x", cfg, progress=False)
    assert not (tmp_path / "x").exists()
    g = load(tiny_dirs("mixtral"))  # annotated by hand past the pass: the backend names the kind
    for n in g.experts():
        g.annotate(n.id, "bits", 16)
    g.annotate("L0.attn", "bits", 3)
    with pytest.raises(BackendError, match=r"cannot run \[3\]-bit attention weights"):
        get_backend("ort-cpu").check_bits(g)


def test_cli_flag_reaches_the_config(tiny_dirs, capsys):
    import argparse

    from dmpq_compile.commands.compile import add_arguments, config_from_args

    p = argparse.ArgumentParser()
    add_arguments(p)
    assert config_from_args(p.parse_args(["m", "--nonexpert-bits", "4"])).allocate.nonexpert_bits == 4
    assert config_from_args(p.parse_args(["m"])).allocate.nonexpert_bits == 16
    assert main(["compile", str(tiny_dirs("mixtral")), "--nonexpert-bits", "6", "-o", "/nonexistent/x"]) != 0
    assert "nonexpert_bits must be one of" in capsys.readouterr().err
    cfg = config_from_args(p.parse_args(["m", "--nonexpert-bits", "4,lm_head=8,embed=8"]))
    assert (cfg.allocate.nonexpert_bits, cfg.allocate.nonexpert_kinds) == (4, {"lm_head": 8, "embed": 8})


# -- per-kind bits ------------------------------------------------------------------------------------
def test_policy_text_is_parsed_and_checked():
    from dmpq_compile.passes.precision import parse_policy

    assert parse_policy("4") == (4, {})
    assert parse_policy("4, lm_head=8") == (4, {"lm_head": 8})
    assert parse_policy("attention=8,lm_head=8") == (16, {"attention": 8, "lm_head": 8})
    for bad, msg in (("four", "is not N or KIND=N"), ("router=8", "unknown non-expert kind 'router'"),
                     ("lm_head=5", "must be one of"), ("6", "must be one of")):
        with pytest.raises(ValueError, match=msg):
            parse_policy(bad)


def test_per_kind_bits_replace_the_default(tiny_dirs):
    g = load(tiny_dirs("qwen2_moe"))
    ctx = PassContext(progress=False, backend=get_backend("ort-cpu"))
    g = make_pass("precision", nonexpert_bits=4, kinds={"lm_head": 8, "shared_expert": 16}).call(g, ctx).graph
    bits = {n.kind: n.ann.get("bits") for n in g.nodes() if n.kind in NONEXPERT_QUANTIZABLE_KINDS}
    assert bits == {"attention": 4, "lm_head": 8, "shared_expert": None, "embed": 4}
    only = make_pass("precision", nonexpert_bits=16, kinds={"attention": 8}).call(load(tiny_dirs("qwen2_moe")), ctx)
    assert only.stats["nodes"] == {"attention": 2}
    with pytest.raises(PassError, match=r"embed=4: target trt-a100 runs \(16,\) for embed"):
        make_pass("precision", nonexpert_bits=16, kinds={"embed": 4}).call(
            load(tiny_dirs("qwen2_moe")), PassContext(progress=False, backend=get_backend("trt-a100")))


# -- the compile driver: storage, default byte identity, uniform -----------------------------------
@pytest.mark.parametrize("target", ["ort-cpu", "trt-a100"])
def test_compile_storage_drops_and_default_is_unchanged(tmp_path, tiny_dirs, tiny_corpus, target):
    model = tiny_dirs("olmoe")
    common = CompileConfig.from_dict({
        "target": target, "allocate": {"allocator": "uniform", "budget": 4.0}, "sensitivity": {"enabled": False},
        "calibration": {"corpus": str(tiny_corpus), "sequences": 2, "seq_len": 32}})
    base = compile_model(model, tmp_path / "base", common, progress=False)
    same = compile_model(model, tmp_path / "same", common.replace(allocate={"nonexpert_bits": 16}), progress=False)
    q8 = compile_model(model, tmp_path / "q8", common.replace(allocate={"nonexpert_bits": 8}), progress=False)
    for f in ("model.onnx", "model.onnx.data"):
        if (base / f).exists():
            assert _sha(base / f) == _sha(same / f)
    s16 = json.loads((base / "report.json").read_text())["storage"]
    s8 = json.loads((q8 / "report.json").read_text())["storage"]
    manifest = json.loads((q8 / "manifest.json").read_text())
    assert s8["experts"] == s16["experts"]  # uniform quantizes the experts alike; the policy adds the rest
    assert s8["bits_per_weight"] < s16["bits_per_weight"]
    assert s8["other"]["bytes"] < s16["other"]["bytes"]
    assert s8["other"]["bytes"] == s8["bytes"] - s8["experts"]["bytes"]
    assert s8["nonexpert"]["code_bits"] == 8.0 and 8.0 < s8["nonexpert"]["bits_per_weight"] < 12.0
    assert "nonexpert" not in s16
    assert s8["nonexpert"]["bytes"] == sum(e.get("bytes", 0) for e in manifest["nonexpert"].values())
    assert {e["bits"] for e in manifest["nonexpert"].values() if e["kind"] != "embed"} == {8}
    embed_bits = {e["bits"] for e in manifest["nonexpert"].values() if e["kind"] == "embed"}
    assert embed_bits == ({8} if target == "ort-cpu" else {16})  # trt-a100 keeps its lookup table fp16
    assert [r["name"] for r in json.loads((q8 / "report.json").read_text())["passes"]][-3:] == \
        ["precision", "allocate", "quantize"]


def test_attention_output_hessian_is_the_gram_of_its_context(tiny_dirs):
    """The o projection's input is the attention context: the identity-output trick recovers it exactly."""
    from dmpq_compile.passes.quantize import _nonexpert_hessians

    from dmpq_compile.ir import ops

    g = load(tiny_dirs("qwen2_moe"))  # q/k/v biases
    interp = Interpreter(g, quantize=False)
    node = g.node("L0.attn")
    x = torch.randn(2, 7, int(g.meta["hidden_size"]))
    w = interp.weights(node.id, RunOptions(quantize=False))
    hess = _nonexpert_hessians(interp, node, x)
    context = ops.attention_context(x, w, node.attrs)
    out = torch.nn.functional.linear(context, w["o"], w.get("o_bias"))
    assert torch.allclose(out, ops.attention(x, w, node.attrs), atol=1e-5)
    flat = context.reshape(-1, context.shape[-1])
    assert torch.allclose(hess[(node.id, "o")], flat.T @ flat / len(flat), atol=1e-5)
    xf = x.reshape(-1, x.shape[-1])
    assert torch.allclose(hess[(node.id, "q")], xf.T @ xf / len(xf), atol=1e-5)
