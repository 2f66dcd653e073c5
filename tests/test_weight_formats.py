"""Targets declare their weight format per bit-width; passes, interpreter, cost table and emitter
share it, so the bits the allocator measured are the bits an artifact carries.

trt-a100 declares 8-bit experts per-channel symmetric INT8 ([-127, 127]); its emitter writes
the stored codes unchanged. ort-cpu declares group-wise asymmetric codes at every bit-width.
"""

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from dmpq_compile.backends import BackendError, get_backend
from dmpq_compile.backends.onnx_io import decoder_feed
from dmpq_compile.backends.trt.cost import trt_expert_bytes
from dmpq_compile.passes import PassContext, make_pass

from dmpq_compile.artifact import write_artifact
from dmpq_compile.frontend import load
from dmpq_compile.ir.interpreter import Interpreter, RunOptions
from dmpq_compile.quant import (
    QuantizedTensor,
    QuantSpec,
    WeightFormat,
    dequantize,
    gptq_quantize,
    hqq_quantize,
    quantize,
)
from dmpq_compile.quant.formats import declare_formats, declared_format
from dmpq_compile.quant.stored import load_quantized

ROLES = ("gate", "up", "down")
IDS = ((np.arange(20).reshape(2, 10) * 7 + 3) % 96).astype(np.int64)
INT8 = WeightFormat(8, symmetric=True, per_channel=True)


def _bits_graph(tiny_dirs, family="mixtral", bits=(4, 8, 16)):
    g = load(tiny_dirs(family))
    for i, n in enumerate(g.experts()):
        g.annotate(n.id, "bits", bits[i % len(bits)])
    return g


def _quantize(g, target, method="rtn", calibration=None, group_size=16):
    ctx = PassContext(progress=False, backend=get_backend(target), calibration=calibration)
    return make_pass("quantize", method=method, group_size=group_size).call(g, ctx).graph


def _emitted(graph, path, **options):
    out = write_artifact(graph, get_backend("trt-a100"), path, emit_options=options)
    manifest = json.loads((out / "manifest.json").read_text())
    model = onnx.load(str(out / manifest["target"]["model_file"]))
    return out, manifest, {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer}


# -- the declaration ----------------------------------------------------------------------------
def test_formats_validate_and_name_their_code_range():
    assert INT8.code_range == (-127, 127) and INT8.scheme == "sym-channel-v1"
    assert WeightFormat(4).code_range == (0, 15) and WeightFormat(4).scheme == "affine-asym-v1"
    assert INT8.spec(64, "gptq") == QuantSpec(8, None, "sym-channel-v1", "gptq")
    assert WeightFormat(4).spec(64) == QuantSpec(4, 64)
    with pytest.raises(ValueError, match="has no quantizer"):
        WeightFormat(8, symmetric=True)
    with pytest.raises(ValueError, match="group_size must be None"):
        QuantSpec(8, 64, "sym-channel-v1")
    meta = {}
    declare_formats(meta, [WeightFormat(4), INT8])
    assert declared_format(json.loads(json.dumps(meta)), 8) == INT8  # survives the IR's JSON
    assert declared_format({}, 8) == WeightFormat(8)


def test_targets_declare_their_formats():
    trt, ort_cpu = get_backend("trt-a100"), get_backend("ort-cpu")
    assert trt.weight_formats == {4: WeightFormat(4), 8: INT8}
    # group-wise asymmetric codes as before, with float16 scales (MatMulNBits on float16 activations)
    assert ort_cpu.weight_formats == {b: WeightFormat(b, scale_dtype="float16") for b in (2, 4, 8)}


def test_symmetric_rtn_is_per_channel_narrow_range():
    w = torch.randn(6, 40)
    qt = quantize(w, INT8.spec(64))
    s = w.abs().amax(1) / 127
    assert torch.equal(qt.scale[:, 0], s) and qt.scale.shape == (6, 1)
    assert torch.equal(qt.q.float() - 128, torch.round(w / s[:, None]).clamp(-127, 127))
    assert int(qt.q.min()) >= 1 and bool((qt.zero == 128).all())
    assert torch.allclose(dequantize(qt), w, atol=float(s.max()) / 2 + 1e-7)
    with pytest.raises(ValueError, match="zero points equal 128"):
        QuantizedTensor(qt.q, qt.scale, qt.zero - 1, qt.spec, qt.shape)
    with pytest.raises(ValueError, match=r"codes must lie in \[1, 255\]"):
        QuantizedTensor(qt.q - qt.q, qt.scale, qt.zero, qt.spec, qt.shape)  # code 0 = -128: not narrow range


def test_gptq_codes_on_the_symmetric_grid():
    torch.manual_seed(0)
    w, x = torch.randn(12, 96), torch.randn(400, 96) @ torch.randn(96, 96) * 0.3
    h = x.T @ x / len(x)
    spec = INT8.spec(64)
    g, r = gptq_quantize(w, h, spec), quantize(w, spec)
    assert g.spec.method == "gptq" and g.spec.scheme == "sym-channel-v1" and g.scale.shape == (12, 1)
    assert int(g.q.min()) >= 1 and bool((g.zero == 128).all())

    def err(qt):
        d = w - dequantize(qt)
        return float(((d @ h) * d).sum())

    assert err(g) < err(r)
    # a diagonal Hessian spreads no error: GPTQ without the clip search is RTN
    assert torch.equal(gptq_quantize(w, torch.diag(torch.rand(96) + 0.5), spec, clip_search=False).q, r.q)
    with pytest.raises(ValueError, match="HQQ optimises zero points"):
        hqq_quantize(w, spec)


# -- measured = stored = emitted -------------------------------------------------------------------
@pytest.mark.parametrize("method", ["rtn", "gptq"])
def test_trt_int8_initializers_are_the_stored_codes(method, tiny_dirs, calib_ids, tmp_path):
    calib = calib_ids("mixtral") if method == "gptq" else None
    g = _quantize(_bits_graph(tiny_dirs, bits=(8, 4, 16)), "trt-a100", method, calib)
    _, manifest, inits = _emitted(g, tmp_path / "fp32", precision="fp32")
    _, _, inits16 = _emitted(g, tmp_path / "fp16", precision="fp16")
    eights = [n for n in g.experts() if n.ann["bits"] == 8]
    assert eights
    for n in eights:
        spec = n.ann["quant"]["spec"]
        assert spec["scheme"] == "sym-channel-v1" and spec["method"] == method
        assert manifest["experts"][n.id]["method"] == method and manifest["experts"][n.id]["group_size"] is None
        for role in ROLES:
            qt = load_quantized(g.weights, n.ann["quant"], role)
            codes = (qt.q.to(torch.int16) - 128).numpy()  # [N, K]
            prefix = f"{n.id}.{role}"
            assert inits[f"{prefix}.int8"].dtype == np.int8
            assert np.array_equal(inits[f"{prefix}.int8"], codes.T)  # bit for bit, [K, N]
            assert np.array_equal(inits16[f"{prefix}.int8"], codes.T)
            assert np.array_equal(inits[f"{prefix}.scale"], qt.scale[:, 0].numpy())
            assert np.array_equal(inits16[f"{prefix}.scale"], qt.scale[:, 0].numpy().astype(np.float16))


def test_interpreter_runs_the_emitted_int8_weights(tiny_dirs, tmp_path):
    base = _bits_graph(tiny_dirs, "olmoe", bits=(8, 16))
    trt = get_backend("trt-a100")
    measured = Interpreter(base, formats=trt.weight_formats)  # what sensitivity fake-quantizes
    g = _quantize(base.copy(), "trt-a100")
    out, manifest, inits = _emitted(g, tmp_path / "art", precision="fp32", dispatch="dense")
    interp = Interpreter(g)
    for n in (n for n in g.experts() if n.ann["bits"] == 8):
        fp = interp.weights(n.id, RunOptions(quantize=False))
        fake = measured.fake_quantized(n.id, fp, 8)
        stored = interp.weights(n.id, RunOptions())
        for role in ROLES:
            prefix = f"{n.id}.{role}"
            emitted = (inits[f"{prefix}.int8"].astype(np.float32) * inits[f"{prefix}.scale"][None, :]).T
            assert np.array_equal(stored[role].numpy(), emitted)
            assert np.array_equal(fake[role].numpy(), emitted)  # sensitivity measured these very weights
    target = manifest["target"]
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    sess = ort.InferenceSession(str(out / target["model_file"]), so, providers=["CPUExecutionProvider"])
    got = sess.run(["logits"], decoder_feed(sess, IDS))[0]
    with torch.no_grad():  # no weight override: the interpreter dequantizes the stored codes itself
        ref = interp(torch.from_numpy(IDS)).numpy()
    assert np.abs(got - ref).max() < 1e-5


def test_sensitivity_measures_the_target_format(tiny_dirs, calib_ids):
    g = _bits_graph(tiny_dirs)
    opts = {"bits": (8,), "max_sequences": 2, "gradvar": False}
    trt = make_pass("sensitivity", **opts).call(
        g.copy(), PassContext(calibration=calib_ids("mixtral"), backend=get_backend("trt-a100"), progress=False))
    plain = make_pass("sensitivity", **opts).call(g.copy(), PassContext(calibration=calib_ids("mixtral"),
                                                                        progress=False))
    assert "weight_formats" not in trt.graph.meta  # measured through the interpreter, graph unchanged
    kl_trt = [n.ann["kl"][8] for n in trt.graph.experts()]
    kl_asym = [n.ann["kl"][8] for n in plain.graph.experts()]
    assert kl_trt != kl_asym  # per-channel INT8 is another (coarser) grid than 64-wide groups
    assert sum(kl_trt) > sum(kl_asym)


def test_hqq_falls_back_to_rtn_for_int8_and_the_manifest_says_so(tiny_dirs, tmp_path, caplog):
    g = _quantize(_bits_graph(tiny_dirs, bits=(4, 8)), "trt-a100", "hqq")
    assert "hqq cannot produce the target's 8-bit per-channel symmetric [-127, 127] weights" in caplog.text
    _, manifest, _ = _emitted(g, tmp_path / "art")
    methods = {e["bits"]: e["method"] for e in manifest["experts"].values()}
    assert methods == {4: "hqq", 8: "rtn"}
    assert manifest["quantization"]["methods"] == ["hqq", "rtn"]
    assert manifest["quantization"]["schemes"] == ["affine-asym-v1", "sym-channel-v1"]


def test_codes_of_another_format_are_refused(tiny_dirs, tmp_path):
    asym = make_pass("quantize", group_size=16).call(_bits_graph(tiny_dirs, bits=(8, 16)),
                                                     PassContext(progress=False)).graph
    with pytest.raises(BackendError, match="8-bit affine-asym-v1"):
        write_artifact(asym, get_backend("trt-a100"), tmp_path / "trt")
    sym = _quantize(_bits_graph(tiny_dirs, bits=(8, 16)), "trt-a100")
    with pytest.raises(BackendError, match="8-bit sym-channel-v1"):
        write_artifact(sym, get_backend("ort-cpu"), tmp_path / "ort")
    assert not (tmp_path / "trt").exists() and not (tmp_path / "ort").exists()


def test_trt_cost_bytes_are_the_emitted_bytes(tiny_dirs, tmp_path):
    g = _quantize(_bits_graph(tiny_dirs, bits=(8, 4, 16)), "trt-a100", group_size=32)
    out = write_artifact(g, get_backend("trt-a100"), tmp_path / "art")
    model = onnx.load(str(out / "model.onnx"))

    def nbytes(t):  # INT4 holds two codes a byte
        size = int(np.prod(t.dims))
        return -(-size // 2) if t.data_type == onnx.TensorProto.INT4 else onnx.numpy_helper.to_array(t).nbytes

    for n in (n for n in g.experts() if n.ann["bits"] < 16):
        i, h = g.weights.shape(n.params["gate"])
        emitted = sum(nbytes(t) for t in model.graph.initializer if t.name.startswith(f"{n.id}."))
        assert emitted == trt_expert_bytes(h, i, n.ann["bits"], 32), n.id
