"""The ONNX lowering: fp32 parity with the interpreter per family and IR feature, MatMulNBits
packing, external data, option errors (the dispatch patterns' timing: benchmarks/bench_dispatch_block.py)."""


import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from dmpq_compile.backends.base import BackendError
from dmpq_compile.backends.onnx_io import decoder_feed
from dmpq_compile.backends.onnx_lowering import DISPATCHES, LoweringOptions, lower
from dmpq_compile.backends.ort_cpu import MODEL_FILE, OrtCpuBackend, pack_weight
from dmpq_compile.passes.infra.base import PassContext
from dmpq_compile.passes.quantize import QuantizePass

from dmpq_compile.frontend import load
from dmpq_compile.ir import Interpreter
from dmpq_compile.ir.weights import WeightStore
from dmpq_compile.quant import QuantSpec, dequantize, quantize
from dmpq_compile.quant.stored import store_quantized
from dmpq_compile.testing import TINY_FAMILIES, make_tiny_checkpoint

ort = pytest.importorskip("onnxruntime")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from bench_dispatch_block import moe_block_graph


def session(model):
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    src = model if isinstance(model, str) else model.SerializeToString()
    return ort.InferenceSession(src, opts, providers=["CPUExecutionProvider"])


def run(sess, lowered, ids, past=None):
    """logits and the new cache for ``ids [B, T]`` after ``past`` (list of (k, v) per layer)."""
    feed = decoder_feed(sess, ids, [t for pair in past for t in pair] if past else None)
    names = [lowered.logits] + [n for kv in lowered.kv_cache for n in (kv.present_key, kv.present_value)]
    out = sess.run(names, feed)
    return out[0], list(zip(out[1::2], out[2::2]))


def reference(graph, ids, quantize=False):
    with torch.no_grad():
        return Interpreter(graph, quantize=quantize)(torch.from_numpy(ids)).numpy()


def ids_for(graph, shape, seed=0):
    return np.random.default_rng(seed).integers(0, graph.meta["vocab_size"], shape, dtype=np.int64)


@pytest.mark.parametrize("genai", [False, True], ids=["plain-attention", "genai-gqa"])
@pytest.mark.parametrize("dispatch", DISPATCHES)
@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_fp32_lowering_matches_interpreter(family, dispatch, genai, tiny_dirs):
    graph = load(tiny_dirs(family))
    lowered = lower(graph, options=LoweringOptions(dispatch=dispatch, genai=genai))
    onnx.checker.check_model(lowered.model, full_check=True)
    ids = ids_for(graph, (2, 11))
    got, present = run(session(lowered.model), lowered, ids)
    assert np.abs(got - reference(graph, ids)).max() <= 1e-4
    assert len(present) == graph.meta["num_layers"] and present[0][0].shape[2] == 11


def test_gather_if_keeps_idle_experts_to_three_nodes(tiny_dirs):
    """Each expert's If adds its rows into the threaded output buffer; an idle expert runs only its
    flag Gather, the If and the else-branch Identity: no GatherND/Add/ScatterND outside the Ifs."""
    graph = load(tiny_dirs("olmoe"))
    lowered = lower(graph, options=LoweringOptions(dispatch="gather-if"))
    top = lowered.model.graph.node
    ifs = [n for n in top if n.op_type == "If"]
    assert len(ifs) == len(graph.experts())
    assert not [n for n in top if n.op_type in ("GatherND", "ScatterND")]
    for node in ifs:
        branches = {a.name: a.g for a in node.attribute}
        assert [n.op_type for n in branches["else_branch"].node] == ["Identity"]
        assert branches["then_branch"].node[-1].op_type == "ScatterND"
    produced = {out: n.op_type for n in top for out in n.output}
    kept = [{a.name: a.g for a in n.attribute}["else_branch"].node[0].input[0] for n in ifs]
    per_layer = len(graph.experts()) // int(graph.meta["num_layers"])
    for i, node in enumerate(ifs):  # the buffer an If leaves unchanged is the previous expert's result
        assert kept[i] == (ifs[i - 1].output[0] if i % per_layer else kept[i]) and kept[i] in produced
        assert i % per_layer or produced[kept[i]] == "ConstantOfShape"  # each layer starts from zeros


def _attn(graph):
    return next(graph.nodes("attention")).attrs


FEATURES = {  # family, checkpoint overrides, check that the IR really carries the feature
    "sliding-window": ("mixtral", {"sliding_window": 4}, lambda g: _attn(g)["sliding_window"] == 4),
    "tied-embeddings": ("mixtral", {"tie_word_embeddings": True},
                        lambda g: next(g.nodes("lm_head")).params["weight"] == next(g.nodes("embed")).params["weight"]),
    "clip-qkv": ("olmoe", {"clip_qkv": 0.3}, lambda g: _attn(g)["clip_qkv"] == 0.3),
    "dense-mlp-qwen2": ("qwen2_moe", {"mlp_only_layers": [0]}, lambda g: len(list(g.nodes("mlp"))) == 1),
    "dense-mlp-qwen3": ("qwen3_moe", {"mlp_only_layers": [1]}, lambda g: len(list(g.nodes("mlp"))) == 1),
}


@pytest.mark.parametrize("genai", [False, True], ids=["plain-attention", "genai-gqa"])
@pytest.mark.parametrize("feature", sorted(FEATURES))
def test_ir_features_and_incremental_decoding(feature, genai, tmp_path):
    family, overrides, present = FEATURES[feature]
    graph = load(make_tiny_checkpoint(family, tmp_path, **overrides))
    assert present(graph)
    lowered = lower(graph, options=LoweringOptions(genai=genai))
    sess = session(lowered.model)
    ids = ids_for(graph, (1, 12), seed=3)
    full, _ = run(sess, lowered, ids)
    assert np.abs(full - reference(graph, ids)).max() <= 1e-4
    logits, past = run(sess, lowered, ids[:, :5])
    steps = [logits]
    for t in range(5, 12):
        logits, past = run(sess, lowered, ids[:, t:t + 1], past)
        steps.append(logits)
    assert np.abs(np.concatenate(steps, axis=1) - full).max() <= 1e-4


def test_tied_embeddings_share_one_table(tmp_path):
    graph = load(make_tiny_checkpoint("mixtral", tmp_path, tie_word_embeddings=True))
    model = lower(graph).model
    names = {i.name for i in model.graph.initializer}
    assert "model.embed_tokens.weight" in names and "model.embed_tokens.weight.T" not in names
    assert any(n.op_type == "Gemm" for n in model.graph.node)


def test_qkv_bias_and_shared_expert_are_lowered(tiny_dirs):
    graph = load(tiny_dirs("qwen2_moe"))
    names = {i.name for i in lower(graph).model.graph.initializer}
    assert "model.layers.0.self_attn.q_proj.bias" in names
    assert "model.layers.0.mlp.shared_expert_gate.weight.T" in names


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("k", [64, 80])  # 80: ragged last block
def test_matmulnbits_packing_matches_dequantized(bits, k):
    torch.manual_seed(bits)
    w = torch.randn(24, k) * 0.1
    store = WeightStore()
    spec = QuantSpec(bits=bits, group_size=32)
    qt = quantize(w, spec)
    entry = store_quantized(store, "w", qt)
    packed = pack_weight(store, {"spec": spec.to_dict(), "tensors": {"up": entry}}, "up", "E0")
    assert packed.b.shape == (24, 3 if k == 80 else 2, 32 * bits // 8)
    model = _single_matmulnbits(packed)
    x = np.random.default_rng(0).standard_normal((5, k)).astype(np.float32)
    got = session(model).run(None, {"x": x})[0]
    assert np.abs(got - x @ dequantize(qt).numpy().T).max() <= 1e-5


def _single_matmulnbits(p):
    from onnx import TensorProto, helper, numpy_helper

    inits = [numpy_helper.from_array(a, n) for a, n in ((p.b, "B"), (p.scales, "S"), (p.zero_points, "Z"))]
    node = helper.make_node("MatMulNBits", ["x", "B", "S", "Z"], ["y"], domain="com.microsoft", K=p.k, N=p.n,
                            bits=p.bits, block_size=p.block_size, accuracy_level=0)
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["m", p.k])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["m", p.n])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)])


def test_unsupported_bits_and_group_sizes_are_refused(tiny_dirs, tmp_path):
    graph = load(tiny_dirs("mixtral"))
    for n in graph.experts():
        graph.annotate(n.id, "bits", 4)
    with pytest.raises(BackendError, match="run the quantize pass"):
        OrtCpuBackend().emit(graph, tmp_path)
    graph.annotate(graph.experts()[0].id, "bits", 3)
    with pytest.raises(BackendError, match="supports bits"):
        OrtCpuBackend().emit(graph, tmp_path)
    store = WeightStore()
    spec = QuantSpec(bits=4, group_size=48)
    entry = store_quantized(store, "w", quantize(torch.randn(8, 96), spec))
    with pytest.raises(BackendError, match="power of two"):
        pack_weight(store, {"spec": spec.to_dict(), "tensors": {"up": entry}}, "up", "E0")


def test_bad_options_name_the_choices(tiny_dirs, tmp_path):
    graph = load(tiny_dirs("olmoe"))
    with pytest.raises(BackendError, match="gather"):
        LoweringOptions(dispatch="scatter")
    with pytest.raises(BackendError, match="accuracy_level"):
        OrtCpuBackend().emit(graph, tmp_path, accuracy_level=7)


def test_external_data_passes_path_checker_and_runs(tiny_dirs, tmp_path):
    graph = load(tiny_dirs("qwen3_moe"))
    fields = OrtCpuBackend().emit(graph, tmp_path, external_data=True)
    assert fields["external_data_file"] and (tmp_path / fields["external_data_file"]).stat().st_size > 100_000
    assert (tmp_path / MODEL_FILE).stat().st_size < 200_000
    onnx.checker.check_model(str(tmp_path / MODEL_FILE), full_check=True)
    ids = ids_for(graph, (1, 6))
    lowered = lower(graph)
    got, _ = run(session(str(tmp_path / MODEL_FILE)), lowered, ids)
    assert np.abs(got - reference(graph, ids)).max() <= 1e-4
    auto = tmp_path / "auto"
    auto.mkdir()
    assert OrtCpuBackend().emit(graph, auto)["external_data_file"] is None  # tiny: below the 100 MB default


def test_dispatch_patterns_agree_on_a_moe_block(tmp_path):
    graph = moe_block_graph(64, 32, 8, 2)
    ids = np.arange(40, dtype=np.int64)[None, :]
    ref = reference(graph, ids, quantize=True)
    for dispatch in DISPATCHES:
        folder = tmp_path / dispatch
        folder.mkdir()
        OrtCpuBackend().emit(graph, folder, dispatch=dispatch, accuracy_level=0)
        sess = session(str(folder / MODEL_FILE))
        assert np.abs(sess.run(["logits"], decoder_feed(sess, ids))[0] - ref).max() <= 1e-4
        one = sess.run(["logits"], decoder_feed(sess, ids[:, :1]))[0]  # decode-sized: most experts idle
        assert np.abs(one - ref[:, :1]).max() <= 1e-4


def _producers(model):
    return {out: n for n in model.graph.node for out in n.output}


@pytest.mark.parametrize("backend", [OrtCpuBackend(), None], ids=["float16-scales", "float32-scales"])
def test_matmulnbits_scales_follow_the_stored_spec(tiny_dirs, backend):
    """ort-cpu quantizes with float16 scales: each MatMulNBits reads float16 scales and a float16
    input (a Cast of the fp32 value) and its output is cast back; at accuracy_level 0 the scales
    are widened instead and the result is exact. Codes stored with float32 scales (quantized
    without the target's declaration) run as they are, with no Cast."""
    from dmpq_compile.backends.ort_cpu.matmulnbits import MatMulNBitsProjection
    from onnx import TensorProto

    graph = load(tiny_dirs("mixtral"))
    for i, n in enumerate(graph.experts()):
        graph.annotate(n.id, "bits", (2, 4, 8)[i % 3])
    graph = QuantizePass(group_size=32).call(graph, PassContext(progress=False, backend=backend)).graph
    half = backend is not None
    ids = ids_for(graph, (2, 7))
    ref = reference(graph, ids, quantize=True)
    for level, tol in ((0, 1e-4), (4, 0.05)):
        lowered = lower(graph, MatMulNBitsProjection(accuracy_level=level))
        model, made = lowered.model, _producers(lowered.model)
        scales = {t.name: t.data_type for t in model.graph.initializer if t.name.endswith(".scales")}
        assert scales and set(scales.values()) == {TensorProto.FLOAT16 if half else TensorProto.FLOAT}
        for node in (n for n in model.graph.node if n.op_type == "MatMulNBits"):
            before, scale_src = made.get(node.input[0]), made.get(node.input[2])
            if half and level == 4:
                assert before.op_type == "Cast" and before.attribute[0].i == TensorProto.FLOAT16
                after = [n for n in model.graph.node if node.output[0] in n.input]
                assert [n.op_type for n in after] == ["Cast"] and after[0].attribute[0].i == TensorProto.FLOAT
            else:
                assert before is None or before.op_type != "Cast"
                assert (scale_src is not None and scale_src.op_type == "Cast") == half  # widened at level 0
        got, _ = run(session(model), lowered, ids)
        assert np.abs(got - ref).max() < tol, (level, np.abs(got - ref).max())


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_panels_come_from_the_packed_codes_as_from_the_unpacked_ones(bits):
    """The emit lays stored (packed) codes into MixedMoE's and PanelMatMul's panels without unpacking them."""
    from dmpq_compile.backends.ort_cpu.matmulnbits import panel_codes, panel_packed

    from dmpq_compile.quant.packing import pack_bits

    codes = np.random.default_rng(bits).integers(0, 2 ** bits, size=(48, 160), dtype=np.uint8)
    packed = pack_bits(codes, bits)
    assert np.array_equal(panel_packed(packed, bits, 48, 160), panel_codes(codes, bits))
