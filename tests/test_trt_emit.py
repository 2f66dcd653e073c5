"""The trt-a100 emit path: ONNX validity, TensorRT rules, and numeric parity on ONNX Runtime CPU.

Parity reference: the reference interpreter run with ``reference_weights`` (the exact float
weights the emitted Q/DQ graph multiplies by) as ``RunOptions.weight_override``. ONNX Runtime runs
with basic graph optimizations only: its extended level fuses DequantizeLinear(INT8) + MatMul
into a kernel that also quantizes the activations, which is not the graph's semantics.

Measured on the tiny models (bits 4/8/16 cycled over experts, group size 64, K=32 padded):
ORT vs reference max |d logits| ~1e-6 (fp16 and fp32; ORT CPU computes the fp16 GEMMs in fp32),
ONNX reference evaluator with real fp16 activations ~1.6e-3 (logits of magnitude ~2).
"""

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from dmpq_compile.backends import BackendError, get_backend
from dmpq_compile.backends.trt.backend import keep_fp32_names
from dmpq_compile.backends.trt.compat import check_model, errors
from dmpq_compile.backends.trt.qdq import int4_initializer, reference_weights
from dmpq_compile.passes import PassContext, make_pass

from dmpq_compile.artifact import write_artifact
from dmpq_compile.cli import main as cli
from dmpq_compile.frontend import load
from dmpq_compile.ir.interpreter import Interpreter, RunOptions
from dmpq_compile.testing import TINY_FAMILIES

ATOL_ORT = 1e-4  # ORT vs reference with the emitted weights (measured ~1e-6)
ATOL_FP16_SIM = 1e-2  # ONNX reference evaluator, fp16 activations (measured ~1.6e-3)


def _quantized(tiny_dirs, family, bits=(4, 8, 16), group_size=64):
    g = load(tiny_dirs(family))
    for i, n in enumerate(g.experts()):
        g.annotate(n.id, "bits", bits[i % len(bits)])
    ctx = PassContext(progress=False, backend=get_backend("trt-a100"))  # quantize in the target's formats
    return make_pass("quantize", group_size=group_size).call(g, ctx).graph


def _emit(graph, path, **options):
    out = write_artifact(graph, get_backend("trt-a100"), path, emit_options=options)
    return out, json.loads((out / "manifest.json").read_text())["target"]


def _feeds(target, ids, past=None):
    assert target["io"]["logits_to_keep"] is None  # the engine keeps every position; its runner slices
    feeds = {target["io"]["input_ids"]: ids}
    for i, kv in enumerate(target["io"]["kv_cache"]):
        for j, name in enumerate((kv["past_key"], kv["past_value"])):
            empty = np.zeros((ids.shape[0], kv["num_kv_heads"], 0, kv["head_dim"]), np.float32)
            feeds[name] = empty if past is None else past[2 * i + j]
    return feeds


def _session(path):
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    so.intra_op_num_threads = 1
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def _reference(graph, ids, precision):
    override = reference_weights(graph, precision, keep_fp32_names(graph))
    with torch.no_grad():
        return Interpreter(graph).run(torch.from_numpy(ids), RunOptions(weight_override=override))["lm_head"].numpy()


IDS = ((np.arange(20).reshape(2, 10) * 7 + 3) % 96).astype(np.int64)


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_emitted_model_is_valid_and_matches_the_reference(tiny_dirs, tmp_path, family):
    g = _quantized(tiny_dirs, family)
    out, target = _emit(g, tmp_path / "art")
    path = out / target["model_file"]
    onnx.checker.check_model(str(path), full_check=True)
    assert errors(check_model(path)) == []
    assert target["backend"] == "trt-a100" and target["precision"] == "fp16" and target["opset"] == 21
    assert set(target["weight_formats"]) == {"fp16", "int4-block64+zp", "int8-per-channel"}
    sess = _session(path)
    names = [o.name for o in sess.get_outputs()]
    got = sess.run(None, _feeds(target, IDS))
    ref = _reference(g, IDS, "fp16")
    assert np.abs(got[0] - ref).max() < ATOL_ORT
    # a one-token decode step after a cached prefill equals the full pass
    pre = sess.run(None, _feeds(target, IDS[:, :9]))
    step = sess.run(None, _feeds(target, IDS[:, 9:], past=pre[1:]))
    assert names[0] == "logits" and np.abs(step[0][:, 0] - got[0][:, 9]).max() < 1e-4


def test_fp16_activations_stay_within_tolerance(tiny_dirs, tmp_path):
    """ORT CPU computes fp16 GEMMs in fp32; the ONNX reference evaluator rounds like a GPU would."""
    from onnx.reference import ReferenceEvaluator

    g = _quantized(tiny_dirs, "qwen2_moe")
    out, target = _emit(g, tmp_path / "art")
    model = onnx.load(str(out / target["model_file"]))
    got = ReferenceEvaluator(model).run(["logits"], _feeds(target, IDS))[0]
    ref = _reference(g, IDS, "fp16")
    assert np.abs(got - ref).max() < ATOL_FP16_SIM
    assert (got.argmax(-1) == ref.argmax(-1)).mean() > 0.9


def test_fp32_int4_reproduces_the_stored_codes_exactly(tiny_dirs, tmp_path):
    g = _quantized(tiny_dirs, "olmoe", bits=(4, 16), group_size=16)
    out, target = _emit(g, tmp_path / "art", precision="fp32", dispatch="dense")
    got = _session(out / target["model_file"]).run(["logits"], _feeds(target, IDS))[0]
    with torch.no_grad():  # no override: the interpreter dequantizes the stored (q - z) * s itself
        ref = Interpreter(g)(torch.from_numpy(IDS)).numpy()
    assert np.abs(got - ref).max() < 1e-5


def test_graph_rewrites_for_tensorrt(tiny_dirs, tmp_path):
    g = _quantized(tiny_dirs, "qwen3_moe")
    out, target = _emit(g, tmp_path / "art")
    model = onnx.load(str(out / target["model_file"]), load_external_data=False)
    ops = [n.op_type for n in model.graph.node]
    reductions = [a.s for n in model.graph.node if n.op_type == "ScatterND" for a in n.attribute
                  if a.name == "reduction"]
    assert "ScatterND" in ops and b"add" not in reductions  # the lowering's combine never scatter-adds
    inits = {t.name: t for t in model.graph.initializer}
    for name in keep_fp32_names(g) & set(inits):
        assert inits[name].data_type == onnx.TensorProto.FLOAT  # routers stay fp32
    dq = [n for n in model.graph.node if n.op_type == "DequantizeLinear"]
    blocked = [n for n in dq if any(a.name == "block_size" for a in n.attribute)]
    assert blocked and all(inits[n.input[0]].data_type == onnx.TensorProto.INT4 for n in blocked)
    assert all(inits[n.input[0]].data_type in (onnx.TensorProto.INT4, onnx.TensorProto.INT8) for n in dq)
    assert all(len(n.input) == 2 for n in dq)  # no zero points
    assert all(inits[n.input[1]].data_type == onnx.TensorProto.FLOAT16 for n in dq)
    matmul_weights = [inits[n.input[1]] for n in model.graph.node if n.op_type == "MatMul" and n.input[1] in inits]
    assert {t.data_type for t in matmul_weights} <= {onnx.TensorProto.FLOAT16, onnx.TensorProto.FLOAT}
    assert "trtexec --onnx=model.onnx --stronglyTyped" in target["build"]["trtexec"]
    assert target["tensorrt"]["checked_against"] == "10.15" and target["engine"] is None


@pytest.mark.parametrize("bits", [2, 3])
def test_two_and_three_bit_experts_are_refused(tiny_dirs, tmp_path, bits):
    g = load(tiny_dirs("mixtral"))
    for i, n in enumerate(g.experts()):
        g.annotate(n.id, "bits", bits if i == 0 else 16)
    backend = get_backend("trt-a100")
    with pytest.raises(BackendError, match=r"supports bits \(4, 8, 16\).*--target trt-a100"):
        backend.check_bits(g)
    with pytest.raises(BackendError, match="supports bits"):
        write_artifact(g, backend, tmp_path / "art")
    assert not (tmp_path / "art").exists()


def test_int4_initializer_packing_round_trips_through_onnxruntime():
    codes = np.random.default_rng(0).integers(-8, 8, size=(6, 5)).astype(np.int8)
    node = onnx.helper.make_node("DequantizeLinear", ["w", "s"], ["y"], axis=0)
    graph = onnx.helper.make_graph([node], "g", [], [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT,
                                                                                          [6, 5])],
                                   [int4_initializer("w", codes), onnx.numpy_helper.from_array(np.ones(6, np.float32),
                                                                                               "s")])
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 21)])
    model.ir_version = 10
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    assert np.array_equal(sess.run(None, {})[0], codes.astype(np.float32))


def test_cost_table_and_check_command(tiny_dirs, tmp_path, capsys):
    g = _quantized(tiny_dirs, "mixtral")
    table = get_backend("trt-a100").cost_table(g)
    assert set(next(iter(table.values()))) == {4, 8, 16}
    out, _ = _emit(g, tmp_path / "art")
    assert cli(["check", str(out)]) == 0
    assert "passes TensorRT 10.x checks (0 errors" in capsys.readouterr().out
    assert cli(["check", str(out), "--trt-version", "10.0"]) == 1  # opset 21 > 20
    assert "[opset]" in capsys.readouterr().out
