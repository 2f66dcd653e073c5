"""`--budget-bits`: the whole model's stored bits per weight.

The budget rests on each backend's account of how it stores a weight
(``Backend.weight_bytes`` / ``float_bytes``, summed by ``passes.infra.storage.stored_weight_bytes``).
These tests check that account against what the emitters write, tensor class by tensor class,
and that a compile at ``--budget-bits B`` emits weights of at most ``B`` stored bits per
parameter, using the room it has."""

from __future__ import annotations

import json
import math

import onnx
import pytest
from dmpq_compile.backends import BackendError, get_backend
from dmpq_compile.passes import PassManager, make_pass
from dmpq_compile.passes.infra.base import PassContext
from dmpq_compile.passes.infra.storage import stored_weight_bytes

from dmpq_compile.artifact import write_artifact
from dmpq_compile.cli import main
from dmpq_compile.compiler import CompileConfig
from dmpq_compile.frontend import load

# constants of the graph that are not weights (shapes, axes, epsilons, rotary frequencies)
SMALL_CONSTANTS = 4096


@pytest.mark.parametrize("family", ["mixtral", "olmoe", "qwen2_moe"])
@pytest.mark.parametrize("target,nonexpert", [("ort-cpu", 16), ("ort-cpu", 8), ("ort-cpu:float32", 8),
                                              ("trt-a100", 16), ("trt-a100", 4)])
def test_predicted_bytes_equal_the_emitted_ones(tmp_path, tiny_dirs, calib_ids, family, target, nonexpert):
    name, _, scales = target.partition(":")  # ort-cpu:float32 = --scale-dtype float32
    backend = get_backend(name, scale_dtype=scales) if scales else get_backend(name)
    graph = load(tiny_dirs(family))
    graph.meta["group_size"] = 32
    bits = tuple(b for b in backend.supported_bits)
    passes = [make_pass("profile"), make_pass("precision", nonexpert_bits=nonexpert),
              make_pass("allocate", allocator="frequency", budget=sum(bits) / len(bits), bits=bits),
              make_pass("quantize", group_size=32)]
    graph = PassManager(passes).run(graph, PassContext(calibration=calib_ids(family), backend=backend,
                                                       progress=False))
    assert len({n.ann["bits"] for n in graph.experts()}) > 1  # a mix, so every expert format is checked
    predicted = stored_weight_bytes(graph, backend)
    art = write_artifact(graph, backend, tmp_path / "art")
    manifest = json.loads((art / "manifest.json").read_text())
    for node_id, entry in {**manifest["experts"], **manifest["nonexpert"]}.items():
        if "bytes" in entry:
            assert predicted[node_id] == entry["bytes"], node_id
    if name == "ort-cpu":
        assert manifest["storage"]["scales"] == {scales or "float16": len([n for n in graph.nodes()
                                                  if n.ann.get("bits", 16) < 16])}
    emitted = manifest["storage"]["weights"]["bytes"]  # every initializer of the model file
    assert 0 <= emitted - sum(predicted.values()) < SMALL_CONSTANTS
    params = sum(math.prod(graph.weights.shape(k)) for k in {k for n in graph.nodes() for k in n.params.values()})
    assert manifest["storage"]["weights"]["bits_per_weight"] == pytest.approx(8 * emitted / params, abs=1e-3)


@pytest.mark.parametrize("family", ["mixtral", "olmoe", "qwen2_moe"])
def test_predicted_bytes_equal_the_emitted_ones_under_the_kernel_dispatch(tmp_path, tiny_dirs, calib_ids, family):
    """The kernel dispatch keeps one zero point a group unpacked (MixedMoE, PanelMatMul): the budget counts it."""
    from dmpq_compile.backends.ort_cpu.kernels import DOMAIN

    backend = get_backend("ort-cpu", dispatch="kernel")
    graph = load(tiny_dirs(family))
    graph.meta["group_size"] = 64  # the kernel's groups are multiples of 64
    passes = [make_pass("profile"), make_pass("precision", nonexpert_bits=4),
              make_pass("allocate", allocator="frequency", budget=4.0, bits=(2, 4, 8)),
              make_pass("quantize", group_size=64)]
    graph = PassManager(passes).run(graph, PassContext(calibration=calib_ids(family), backend=backend,
                                                       progress=False))
    predicted = stored_weight_bytes(graph, backend)
    art = write_artifact(graph, backend, tmp_path / "art")
    manifest = json.loads((art / "manifest.json").read_text())
    assert manifest["target"]["dispatch"] == "kernel"
    model = onnx.load(str(art / "model.onnx"), load_external_data=False)
    ops = {n.op_type for n in model.graph.node if n.domain == DOMAIN}  # only mixtral's tiny experts are whole groups
    kinds = {"MixedMoE", "PanelMatMul"} if family == "mixtral" else {"PanelMatMul"}
    assert ops == kinds | {"GroupQueryAttention"}  # attention has no weights: nothing for the budget
    for node_id, entry in {**manifest["experts"], **manifest["nonexpert"]}.items():
        if "bytes" in entry:
            assert predicted[node_id] == entry["bytes"], node_id
    emitted = manifest["storage"]["weights"]["bytes"]
    assert 0 <= emitted - sum(predicted.values()) < SMALL_CONSTANTS
    # at real widths the packed zero points differ: an OLMoE expert matrix (1024 x 2048, group 64) at 4 bits
    fused = get_backend("ort-cpu")
    groups = 1024 * 2048 // 64
    assert backend.weight_bytes(1024, 2048, 4, 64, kind="expert") == 1024 * 2048 // 2 + 3 * groups
    assert fused.weight_bytes(1024, 2048, 4, 64, kind="expert") == 1024 * 2048 // 2 + 2 * groups + groups // 2
    assert backend.weight_bytes(1024, 2048, 8, 64, kind="expert") == fused.weight_bytes(1024, 2048, 8, 64)
    # the embedding table stays a GatherBlockQuantized lookup; a width that is no whole group stays MatMulNBits
    assert backend.weight_bytes(50304, 2048, 4, 64, kind="embed") == fused.weight_bytes(50304, 2048, 4, 64)
    assert backend.weight_bytes(1024, 2016, 4, 32, kind="attention") == fused.weight_bytes(1024, 2016, 4, 32)


def _compile(tiny_dirs, tiny_corpus, out, *flags):
    return main(["compile", str(tiny_dirs("mixtral")), "-o", str(out), "--calib-corpus", str(tiny_corpus),
                 "--calib-sequences", "4", "--seq-len", "32", "--no-progress", *flags])


@pytest.mark.parametrize("target", ["ort-cpu", "trt-a100"])
def test_budget_bits_bounds_the_stored_weights_and_uses_the_room(tmp_path, tiny_dirs, tiny_corpus, target, capsys):
    # the smallest feasible budget, from the refusal of one below it
    assert _compile(tiny_dirs, tiny_corpus, tmp_path / "low", "--target", target, "--budget-bits", "1",
                    "--nonexpert-bits", "4") == 1
    err = capsys.readouterr().err
    assert "--budget-bits 1.00 is infeasible" in err and "stores" in err
    smallest = float(err.split("the model stores ")[1].split(" bits")[0])
    assert not (tmp_path / "low").exists()
    budgets = (smallest + 0.01, smallest + 1.5)
    stored = []
    for i, budget in enumerate(budgets):
        out = tmp_path / f"a{i}"
        assert _compile(tiny_dirs, tiny_corpus, out, "--target", target, "--budget-bits", str(budget),
                        "--nonexpert-bits", "4") == 0
        assert "in the weight tensors" in capsys.readouterr().out
        storage = json.loads((out / "report.json").read_text())["storage"]
        stored.append(storage["weights"]["bits_per_weight"])
        assert stored[-1] <= budget + 8 * SMALL_CONSTANTS / storage["params"]
        report = json.loads((out / "report.json").read_text())
        stats = next(p["stats"] for p in report["passes"] if p["name"] == "allocate")
        used = float(stats["used"].split()[0])
        assert stats["budget"] == f"{budget:.2f} stored bits per weight"
        assert used == pytest.approx(stored[-1], abs=SMALL_CONSTANTS * 8 / storage["params"])
    # at the smallest budget every expert has the lowest bits; more room buys more bits
    low = min(get_backend(target).supported_bits)
    assert {r["bits"] for r in json.loads((tmp_path / "a0" / "report.json").read_text())["experts"]} == {low}
    assert stored[1] > stored[0] + 0.5


def test_float_nonexperts_name_the_fix(tmp_path, tiny_dirs, tiny_corpus, capsys):
    assert _compile(tiny_dirs, tiny_corpus, tmp_path / "a", "--budget-bits", "4") == 1
    err = capsys.readouterr().err
    assert "lower --nonexpert-bits" in err and "weights outside the experts alone store" in err


def test_budget_guard_counts_stored_bits(tiny_dirs):
    from dmpq_compile.passes.allocate.base import stored_bits_budget
    from dmpq_compile.passes.infra.base import PassResult
    from dmpq_compile.passes.infra.budget_guard import BudgetGuard, BudgetOverrunError

    backend = get_backend("ort-cpu")
    g = load(tiny_dirs("mixtral"))
    g.meta["group_size"] = 32
    for n in g.experts():
        g.annotate(n.id, "freq", 0.5)
        g.annotate(n.id, "bits", 4)
    budget, stored = stored_bits_budget(g, backend, 0.0, backend.supported_bits)
    used = budget.fixed + 8 * sum(v[4] for v in stored.values()) / budget.params  # all experts at 4 bits
    predicted = stored_weight_bytes(g, backend)
    assert used == pytest.approx(8 * sum(predicted.values()) / budget.params)
    alloc = make_pass("allocate", allocator="uniform", budget_kind="stored-bits", budget=used)
    guard = BudgetGuard(backend)
    guard.after(2, alloc, PassResult(g, True))  # exactly at the budget: fine
    assert guard.broken_by is None
    g.annotate(g.experts()[0].id, "bits", 8)
    with pytest.raises(BudgetOverrunError, match=r"stored bits per weight used, over the budget of"):
        guard.after(3, make_pass("quantize"), PassResult(g, True))


def test_scale_dtype_option(tiny_dirs, tiny_corpus, tmp_path):
    """--scale-dtype float32 stores float32 scales at 0.25 more bits per weight (group 64) and keeps the
    products' activations fp32; trt-a100 has its own format, and backends refuse options they lack."""
    half, full = tmp_path / "f16", tmp_path / "f32"
    assert _compile(tiny_dirs, tiny_corpus, half, "--budget-bits", "4", "--nonexpert-bits", "4") == 0
    assert _compile(tiny_dirs, tiny_corpus, full, "--budget-bits", "4", "--nonexpert-bits", "4",
                    "--scale-dtype", "float32") == 0
    storage = {p: json.loads((p / "manifest.json").read_text())["storage"] for p in (half, full)}
    assert set(storage[half]["scales"]) == {"float16"} and set(storage[full]["scales"]) == {"float32"}
    model = onnx.load(str(full / "model.onnx"), load_external_data=False)
    assert not [n for n in model.graph.node if n.op_type == "Cast" and n.attribute[0].i == onnx.TensorProto.FLOAT16]
    # the same budget buys fewer code bits with the wider scales
    assert storage[full]["experts"]["code_bits"] <= storage[half]["experts"]["code_bits"]
    with pytest.raises(ValueError, match="--scale-dtype chooses how ort-cpu"):
        CompileConfig.from_dict({"target": "trt-a100", "quantize": {"scale_dtype": "float32"}})
    with pytest.raises(BackendError, match="takes no option"):
        get_backend("trt-a100", scale_dtype="float32")
    with pytest.raises(BackendError, match="scale_dtype must be one of"):
        get_backend("ort-cpu", scale_dtype="bfloat16")
