"""ort-cpu's fused expert dispatch: one ``com.microsoft.QMoE`` per layer and bit-width.

* the QMoE weights are the stored codes, scales and zero points byte for byte (gate/up rows
  interleaved): dequantized, they equal the interpreter's weights exactly;
* exact mode (``accuracy_level`` 0): logits of all four families match the interpreter to 1e-4;
* the shipped level (4): the next-token distributions match the per-expert dispatch's;
* one node per layer and width; 16-bit experts, and widths QMoE cannot serve exactly at level 0,
  stay per-expert; each expert's bytes in the manifest are what the per-expert layout stores.
"""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from dmpq_compile.backends.onnx_io import decoder_feed
from dmpq_compile.backends.ort_cpu import MODEL_FILE, OrtCpuBackend
from dmpq_compile.backends.ort_cpu.matmulnbits import MatMulNBitsProjection, _qmoe_part, qmoe_layout
from dmpq_compile.passes.infra.base import PassContext
from dmpq_compile.passes.quantize import QuantizePass

from dmpq_compile.artifact import write_artifact
from dmpq_compile.frontend import load
from dmpq_compile.ir import Interpreter
from dmpq_compile.ir.interpreter import RunOptions
from dmpq_compile.quant import QuantSpec, unpack_bits
from dmpq_compile.testing import TINY_FAMILIES


def _graph(path, cycle, group_size=32):
    graph = load(path)
    for i, node in enumerate(graph.experts()):
        graph.annotate(node.id, "bits", cycle[i % len(cycle)])
    QuantizePass(group_size=group_size).call(graph, PassContext(progress=False))
    return graph


def _emit(graph, folder, dispatch, level):
    folder.mkdir()
    OrtCpuBackend().emit(graph, folder, dispatch=dispatch, accuracy_level=level)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    sess = ort.InferenceSession(str(folder / MODEL_FILE), opts, providers=["CPUExecutionProvider"])
    return sess, onnx.load(str(folder / MODEL_FILE), load_external_data=False)


def _ids(graph, shape, seed=0):
    return np.random.default_rng(seed).integers(0, graph.meta["vocab_size"], shape, dtype=np.int64)


def _log_softmax(x):
    x = x.astype(np.float64) - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_qmoe_weights_dequantize_to_the_interpreters(bits, tiny_dirs):
    graph = _graph(tiny_dirs("olmoe"), (bits,), group_size=16)
    layer = [n for n in graph.experts() if n.attrs["layer"] == 0]
    spec = QuantSpec.from_dict(layer[0].ann["quant"]["spec"])
    inter, hidden = (int(v) for v in layer[0].ann["quant"]["tensors"]["gate"]["shape"])

    class Lw:  # what _qmoe_part reads of a lowering
        pass

    lw = Lw()
    lw.graph = graph
    fields = {name: _qmoe_part(lw, layer, name)() for name, _, _ in qmoe_layout(len(layer), hidden, inter, spec)}
    for name, shape, dtype in qmoe_layout(len(layer), hidden, inter, spec):
        assert fields[name].shape == shape and fields[name].dtype == dtype, name
    interp = Interpreter(graph)
    for e, node in enumerate(layer):
        stored = interp.weights(node.id, RunOptions())
        for fc, rows, k in (("fc1", 2 * inter, hidden), ("fc2", hidden, inter)):
            blocks = k // spec.group_size
            codes = unpack_bits(fields[fc][e], bits, k).astype(np.float32)
            zeros = unpack_bits(fields[f"{fc}_zero_points"][e], bits, blocks).astype(np.float32)
            scales = fields[f"{fc}_scales"][e].astype(np.float32)
            w = ((codes.reshape(rows, blocks, -1) - zeros[..., None]) * scales[..., None]).reshape(rows, k)
            if fc == "fc1":  # rows interleave gate and up (swiglu_fusion=1)
                assert np.array_equal(w[0::2], stored["gate"].numpy()) and np.array_equal(w[1::2], stored["up"].numpy())
            else:
                assert np.array_equal(w, stored["down"].numpy())


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_fused_4bit_experts_match_the_interpreter_exactly(family, tiny_dirs, tmp_path):
    graph = _graph(tiny_dirs(family), (4,))
    sess, model = _emit(graph, tmp_path / "a", "fused", 0)
    layers = {n.attrs["layer"] for n in graph.experts()}
    assert sum(n.op_type == "QMoE" for n in model.graph.node) == len(layers)
    assert not [n for n in model.graph.node if n.op_type == "If" and "expert" in n.name]
    ids = _ids(graph, (2, 24))
    with torch.no_grad():
        ref = Interpreter(graph, quantize=True)(torch.from_numpy(ids)).numpy()
    assert np.abs(sess.run(["logits"], decoder_feed(sess, ids))[0] - ref).max() <= 1e-4


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_fused_dispatch_at_the_shipped_level_matches_per_expert_dispatch(family, tiny_dirs, tmp_path):
    """Mixed 2/4/8/16-bit experts at accuracy level 4: one QMoE per layer for the 4-bit and one for the
    8-bit experts, 2- and 16-bit experts per expert; next-token distributions as the per-expert
    dispatch's (KL <= 1e-5, the issue's bound)."""
    graph = _graph(tiny_dirs(family), (2, 4, 8, 16))
    fused, model = _emit(graph, tmp_path / "fused", "fused", 4)
    per_expert, _ = _emit(graph, tmp_path / "gather-if", "gather-if", 4)
    layers = {n.attrs["layer"] for n in graph.experts()}
    qmoe = [n for n in model.graph.node if n.op_type == "QMoE"]
    assert len(qmoe) == 2 * len(layers)
    assert sorted({a.i for n in qmoe for a in n.attribute if a.name == "expert_weight_bits"}) == [4, 8]
    ids = _ids(graph, (2, 32), seed=1)
    a = fused.run(["logits"], decoder_feed(fused, ids))[0]
    b = per_expert.run(["logits"], decoder_feed(per_expert, ids))[0]
    lp, lq = _log_softmax(b), _log_softmax(a)
    kl = float((np.exp(lp) * (lp - lq)).sum(-1).mean())
    assert kl <= 1e-5, kl


def test_exact_mode_keeps_what_qmoe_cannot_serve_exactly_per_expert(tiny_dirs):
    graph = _graph(tiny_dirs("mixtral"), (2, 4, 8, 16))
    exact, fast = MatMulNBitsProjection(0), MatMulNBitsProjection(4)
    fusable = {n.ann["bits"]: (exact.fusable(None, n), fast.fusable(None, n)) for n in graph.experts()}
    # QMoE's 2-bit kernel uses a lookup table at group >= 32; its 8-bit kernel int8 activations at level 0
    assert fusable == {2: (False, False), 4: (True, True), 8: (False, True), 16: (False, False)}


def test_fused_experts_store_the_same_bytes_as_per_expert(tiny_dirs, tmp_path):
    graph = _graph(tiny_dirs("qwen3_moe"), (2, 4, 8, 16))
    manifests = {}
    for dispatch in ("fused", "gather-if"):
        art = write_artifact(graph, OrtCpuBackend(), tmp_path / dispatch, emit_options={"dispatch": dispatch})
        manifests[dispatch] = json.loads((art / "manifest.json").read_text())
    fused, per_expert = (manifests[d]["experts"] for d in ("fused", "gather-if"))
    assert {k: v["bytes"] for k, v in fused.items()} == {k: v["bytes"] for k, v in per_expert.items()}
    assert manifests["fused"]["storage"]["bytes"] <= manifests["gather-if"]["storage"]["bytes"]
    shared = [k for k, v in fused.items() if any(".qmoe" in t for t in v["tensors"])]
    assert shared and all(graph.node(k).ann["bits"] < 16 for k in shared)


def _annotate_costs(graph, group_ms):
    """Cost rows of the ort-cpu shape: per-expert routed 1.0 ms, idle 0.01 ms; fused 0.8 ms plus a fixed
    ``group_ms`` per layer and width (4/8 bits); routing frequencies 1/8."""
    for node in graph.experts():
        rows = {}
        for b in (2, 4, 8, 16):
            fused = {"fused_decode_ms": 0.8, "fused_prefill_ms": 0.1, "group_decode_ms": group_ms,
                     "group_prefill_ms": group_ms / 100} if b in (4, 8) else {}
            rows[b] = {"decode_ms": 1.0, "prefill_ms": 0.1, "bytes": 1, "energy_mj": 0.0, "idle_decode_ms": 0.01,
                       "idle_prefill_ms": 0.0001, **fused}
        graph.annotate(node.id, "cost", {"ort-cpu": rows})
        graph.annotate(node.id, "freq", 0.125)


@pytest.mark.parametrize("group_ms, fused", [(0.0, True), (100.0, False)])
def test_the_cost_table_chooses_the_layout(group_ms, fused, tiny_dirs, tmp_path):
    """Where the fused op's fixed part outweighs what its experts save, the group runs per expert (no
    QMoE); the manifest says what was chosen and on what basis, and the logits agree either way."""
    graph = _graph(tiny_dirs("olmoe"), (4,))
    plain, plain_model = _emit(graph, tmp_path / "plain", "fused", 4)  # no cost table: fused
    _annotate_costs(graph, group_ms)
    art = write_artifact(graph, OrtCpuBackend(), tmp_path / "costed", emit_options={"dispatch": "fused"})
    model = onnx.load(str(art / MODEL_FILE), load_external_data=False)
    layers = {n.attrs["layer"] for n in graph.experts()}
    assert sum(n.op_type == "QMoE" for n in plain_model.graph.node) == len(layers)
    assert sum(n.op_type == "QMoE" for n in model.graph.node) == (len(layers) if fused else 0)
    summary = json.loads((art / "manifest.json").read_text())["target"]["fusion"]
    assert summary["basis"] == ["cost table (decode)"] and summary["groups"] == len(layers)
    assert summary["fused_groups"] == (len(layers) if fused else 0)
    d = summary["decisions"][0]
    per_layer = len(graph.experts()) // len(layers)
    assert d["decode_ms"]["per_expert"] == pytest.approx(per_layer * (0.125 + 0.01))
    sess = ort.InferenceSession(str(art / MODEL_FILE), providers=["CPUExecutionProvider"])
    ids = _ids(graph, (1, 16), seed=2)
    a = sess.run(["logits"], decoder_feed(sess, ids))[0]
    b = plain.run(["logits"], decoder_feed(plain, ids))[0]
    lp, lq = _log_softmax(b), _log_softmax(a)
    assert float((np.exp(lp) * (lp - lq)).sum(-1).mean()) <= 1e-5


@pytest.mark.parametrize("family", ["olmoe", "qwen2_moe"])
def test_quantized_qkv_run_as_one_product(family, tiny_dirs, tmp_path):
    """4-bit attention: q, k and v as one MatMulNBits over their stacked rows, then Split; the logits are
    the three separate products' (MatMulNBits computes each output row on its own)."""
    from dmpq_compile.passes import make_pass

    graph = _graph(tiny_dirs(family), (4,))
    make_pass("precision", nonexpert_bits=4).call(graph, PassContext(progress=False, backend=OrtCpuBackend()))
    QuantizePass(group_size=32).call(graph, PassContext(progress=False))

    class Separate(MatMulNBitsProjection):
        def stacked(self, lw, x, node, roles):  # q, k and v one by one; other stacks as before
            if roles == ("q", "k", "v"):
                return tuple(self(lw, x, node, r) for r in roles)
            return super().stacked(lw, x, node, roles)

    models = {}
    for name, projection in (("stacked", MatMulNBitsProjection(4)), ("separate", Separate(4))):
        from dmpq_compile.backends.onnx_lowering import LoweringOptions, lower

        models[name] = lower(graph, projection, LoweringOptions(dispatch="fused", logits_to_keep=True,
                                                                genai=True)).model
    layers = len({n.attrs["layer"] for n in graph.experts()})
    count = {k: sum(n.op_type == "MatMulNBits" for n in m.graph.node) for k, m in models.items()}
    assert count["separate"] - count["stacked"] == 2 * layers
    ids = _ids(graph, (2, 12), seed=3)
    out = {}
    for name, model in models.items():
        sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
        out[name] = sess.run(["logits"], decoder_feed(sess, ids, logits_to_keep=0))[0]
    np.testing.assert_allclose(out["stacked"], out["separate"], rtol=0, atol=1e-5)
