"""Expert identities and bytes come from the artifact's manifest: the emitters record each
expert's tensors and bytes on disk, the cost tables predict the same bytes, and the bench reads
them without looking at initializer names."""

import json
import shutil

import numpy as np
import onnx
import pytest
from dmpq_compile.backends import get_backend
from dmpq_compile.backends.cost import expert_shapes
from dmpq_compile.backends.onnx_io import tensor_bytes
from dmpq_compile.backends.ort_cpu import OrtCpuBackend
from dmpq_compile.backends.ort_cpu.cost import ort_cpu_expert_bytes
from dmpq_compile.backends.trt.cost import trt_expert_bytes
from dmpq_compile.passes.infra.base import PassContext
from dmpq_compile.passes.quantize import QuantizePass

from dmpq_compile.artifact import write_artifact
from dmpq_compile.bench import BenchConfig, bench, weight_stats
from dmpq_compile.frontend import load
from dmpq_compile.runtime.manifest import ArtifactError

GROUP = 32


def _quantized(model_dir, bits_cycle, backend=None):
    g = load(model_dir)
    g.meta["group_size"] = GROUP
    for i, node in enumerate(g.experts()):
        g.annotate(node.id, "bits", bits_cycle[i % len(bits_cycle)])
    return QuantizePass(group_size=GROUP).call(g, PassContext(progress=False, backend=backend)).graph


@pytest.fixture(scope="module")
def ort_artifact(tiny_dirs, tmp_path_factory):
    g = _quantized(tiny_dirs("olmoe"), (2, 4, 8, 16), OrtCpuBackend())
    return g, write_artifact(g, OrtCpuBackend(), tmp_path_factory.mktemp("ort") / "art")


def _manifest(path):
    return json.loads((path / "manifest.json").read_text())


def test_manifest_expert_bytes_are_the_cost_table_bytes(ort_artifact):
    g, art = ort_artifact
    manifest = _manifest(art)
    model = onnx.load(str(art / "model.onnx"), load_external_data=False)
    sizes = {t.name: tensor_bytes(t) for t in model.graph.initializer}
    shapes = expert_shapes(g)
    owners: dict[str, list[str]] = {}
    for key, entry in manifest["experts"].items():
        for t in entry["tensors"]:
            owners.setdefault(t, []).append(key)
    for node in g.experts():
        entry = manifest["experts"][node.id]
        h, i = shapes[node.id]
        assert entry["bytes"] == ort_cpu_expert_bytes(h, i, node.ann["bits"], GROUP)
        # the tensors are in the model file; a fused group's stacked tensors are shared out equally
        assert entry["bytes"] == sum(sizes[t] // len(owners[t]) for t in entry["tensors"])
        # W (fp32), gate_up + down (B, scales, zeros), or a QMoE group's fc1 + fc2 (codes, scales, zeros)
        assert len(entry["tensors"]) == (3 if node.ann["bits"] == 16 else 6)
        for t in entry["tensors"]:  # a tensor of several experts holds one layer's experts of one width
            assert len({(g.node(k).attrs["layer"], g.node(k).ann["bits"]) for k in owners[t]}) == 1


def test_trt_manifest_expert_bytes_are_the_cost_table_bytes(tiny_dirs, tmp_path):
    backend = get_backend("trt-a100")
    g = _quantized(tiny_dirs("qwen3_moe"), (4, 8, 16), backend)  # in the target's formats (8 bits: INT8 per channel)
    art = write_artifact(g, backend, tmp_path / "trt")
    manifest, shapes = _manifest(art), expert_shapes(g)
    for node in g.experts():
        h, i = shapes[node.id]
        assert manifest["experts"][node.id]["bytes"] == trt_expert_bytes(h, i, node.ann["bits"], GROUP), node.id


def _rename_initializers(model: onnx.ModelProto) -> dict[str, str]:
    """Give every initializer an opaque name (``t0``, ``t1``, ...), in every (sub)graph that uses it."""
    names = {t.name: f"t{k}" for k, t in enumerate(model.graph.initializer)}
    for t in model.graph.initializer:
        t.name = names[t.name]
    graphs = [model.graph]
    while graphs:
        graph = graphs.pop()
        for node in graph.node:
            node.input[:] = [names.get(i, i) for i in node.input]
            graphs.extend(a.g for a in node.attribute if a.HasField("g"))
    return names


def test_bench_reads_experts_from_the_manifest_not_from_names(ort_artifact, tmp_path):
    g, art = ort_artifact
    manifest = _manifest(art)
    rng = np.random.default_rng(0)
    freqs = {n.id: float(rng.uniform(0.1, 0.9)) for n in g.experts()}
    before = weight_stats(art, manifest, freqs)

    renamed = tmp_path / "renamed"
    shutil.copytree(art, renamed)
    model = onnx.load(str(renamed / "model.onnx"))
    names = _rename_initializers(model)
    onnx.save_model(model, str(renamed / "model.onnx"))
    for entry in manifest["experts"].values():
        entry["tensors"] = [names[t] for t in entry["tensors"]]
    after = weight_stats(renamed, manifest, freqs)
    assert after.file_bytes < before.file_bytes  # shorter names: a smaller model.onnx, the same weights
    assert (after.read_bytes_per_token, after.macs_int8, after.macs_fp32) == (
        before.read_bytes_per_token, before.macs_int8, before.macs_fp32)

    # the expert part is exactly frequency x the manifest's bytes (= the cost table's bytes)
    idle = weight_stats(renamed, manifest, {})
    shapes = expert_shapes(g)
    expected = sum(freqs[n.id] * ort_cpu_expert_bytes(*shapes[n.id], n.ann["bits"], GROUP) for n in g.experts())
    assert after.read_bytes_per_token - idle.read_bytes_per_token == pytest.approx(expected)
    int8 = sum(freqs[n.id] * 3 * shapes[n.id][0] * shapes[n.id][1] for n in g.experts() if n.ann["bits"] < 16)
    assert after.macs_int8 - idle.macs_int8 == pytest.approx(int8)


def test_embedding_counts_one_row_unless_also_read_as_a_matrix(ort_artifact):
    g, art = ort_artifact
    manifest = _manifest(art)
    model = onnx.load(str(art / "model.onnx"), load_external_data=False)
    embed = next(iter(g.nodes("embed"))).params["weight"]
    table = next(t for t in model.graph.initializer if t.name == embed)
    full = sum(tensor_bytes(t) for t in model.graph.initializer)
    experts = sum(e["bytes"] for e in manifest["experts"].values())
    stats = weight_stats(art, manifest, {})
    assert stats.read_bytes_per_token == pytest.approx(full - experts - tensor_bytes(table) * (1 - 1 / table.dims[0]))

    from onnx import TensorProto, helper

    from dmpq_compile.bench import _gathered_tables

    tied = helper.make_graph(
        [helper.make_node("Gather", ["emb", "ids"], ["x"]), helper.make_node("Gather", ["pos", "ids"], ["p"]),
         helper.make_node("Gemm", ["x", "emb"], ["logits"], transB=1)], "tied",
        [helper.make_tensor_value_info("ids", TensorProto.INT64, [None])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, None)])
    assert _gathered_tables(tied) == {"pos"}  # the tied table is read in full by the lm_head
    quantized = helper.make_graph(  # a quantized table: codes, scales and zero points are all row-read
        [helper.make_node("GatherBlockQuantized", ["q", "ids", "s", "z"], ["x"], domain="com.microsoft"),
         helper.make_node("MatMul", ["x", "w"], ["logits"])], "quantized",
        [helper.make_tensor_value_info("ids", TensorProto.INT64, [None])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, None)])
    assert _gathered_tables(quantized) == {"q", "s", "z"}


def test_manifest_without_expert_tensors_gives_no_byte_figures(ort_artifact, tmp_path, caplog):
    _, art = ort_artifact
    manifest = _manifest(art)
    for entry in manifest["experts"].values():
        del entry["tensors"]
    with pytest.raises(ArtifactError, match="re-create it"):
        weight_stats(art, manifest, {})
    old = tmp_path / "old"
    shutil.copytree(art, old)
    (old / "manifest.json").write_text(json.dumps(manifest))
    res = bench([old], BenchConfig(corpus=None, rss=False, rounds=1, prefill_tokens=4, decode_tokens=1),
                progress=False)[0]
    assert res["decode_ms"] > 0 and "read_bytes_per_token" not in res and "energy_mj_per_token" not in res
    assert "no bytes read" in caplog.text
