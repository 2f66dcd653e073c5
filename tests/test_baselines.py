"""The ORT-quantizer peer baseline: torch.onnx export with KV cache, its correctness check, ORT's
MatMulNBits quantizer, and the artifact running through dmpq_compile.runtime.

Tolerances (tiny random Mixtral, hidden 64, 2 layers, 4 experts top-2):
* fp32 export through the runtime vs PyTorch: max |diff| <= 1e-4 * max(1, max |logit|);
* 4-bit experts (block 32, accuracy_level 0) vs PyTorch: relative L2 error of the logits
  < 0.2 and top-1 agreement >= 0.75 (measured: 0.091 and 17/18 positions; the tiny model's
  random weights have a wide spread, so 4-bit rounding costs more than on a trained model);
* prefill + one-token decode vs one full pass of the same artifact: same 1e-4 bound.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from dmpq_compile.backends.cost import matmulnbits_bytes

from dmpq_compile.baselines import (
    BaselineError,
    ExportMismatchError,
    OrtQuantizerConfig,
    export_cached_lm,
    export_checked,
    load_export_model,
    make_experts_exportable,
    validate_export,
    write_baseline,
)
from dmpq_compile.baselines.ort_quantizer import GatherExperts, validation_inputs
from dmpq_compile.bench import weight_stats

EXACT = 1e-4
HIDDEN, INTER = 64, 64  # the tiny Mixtral's widths (dmpq_compile/testing/tiny.py)


def _limit(ref: np.ndarray) -> float:
    return EXACT * max(1.0, float(np.abs(ref).max()))


def _torch_logits(model_dir, ids: np.ndarray) -> np.ndarray:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(model_dir)).eval()
    with torch.no_grad():
        return model(torch.from_numpy(ids)).logits.numpy()


def _runtime_logits(artifact, ids: np.ndarray, prefill: int) -> tuple[np.ndarray, np.ndarray]:
    """(one full pass, prefill then one-token decode steps) through dmpq_compile.runtime."""
    from dmpq_compile.runtime import load

    session = load(artifact)
    full = session.logits(ids)
    logits, past = session.forward(ids[:, :prefill])
    steps = [logits]
    for t in range(prefill, ids.shape[1]):
        logits, past = session.forward(ids[:, t:t + 1], past)
        steps.append(logits)
    return full, np.concatenate(steps, axis=1)


@pytest.fixture(scope="module")
def mixtral_dir(tiny_dirs):
    return tiny_dirs("mixtral")


@pytest.fixture(scope="module")
def checked_export(mixtral_dir, tmp_path_factory):
    return export_checked(mixtral_dir, tmp_path_factory.mktemp("export"), seed=0)


def _cfg(tiny_corpus, **kw) -> OrtQuantizerConfig:
    return OrtQuantizerConfig(calib_corpus=str(tiny_corpus), calib_sequences=4, seq_len=32, **kw)


@pytest.fixture(scope="module")
def fresh_ids(mixtral_dir):
    # batch 2, 9 tokens: unlike the tracing (2 x 7 after 5 cached) and validation (3 x 15) inputs
    return np.random.default_rng(123).integers(0, 96, (2, 9)).astype(np.int64)


def test_config_rejects_bad_settings():
    for bad in ({"bits": 3}, {"block_size": 48}, {"algo": "gptq"}, {"scope": "attention"}, {"accuracy_level": 7},
                {"algo": "hqq", "is_symmetric": True}, {"tolerance": 0.0}):
        with pytest.raises(BaselineError):
            OrtQuantizerConfig(**bad)


def test_make_experts_exportable_needs_fused_experts():
    with pytest.raises(BaselineError, match="no fused experts"):
        make_experts_exportable(torch.nn.Sequential(torch.nn.Linear(4, 4)))


def test_gather_experts_keep_the_model_logits(mixtral_dir, fresh_ids):
    model = load_export_model(mixtral_dir)
    with torch.no_grad():
        before = model(torch.from_numpy(fresh_ids)).logits.numpy()
        assert make_experts_exportable(model) == model.config.num_hidden_layers
        after = model(torch.from_numpy(fresh_ids)).logits.numpy()
    assert sum(isinstance(m, GatherExperts) for m in model.modules()) == model.config.num_hidden_layers
    assert np.abs(after - before).max() <= _limit(before)


def test_export_is_checked_on_inputs_unlike_the_trace(checked_export):
    check = checked_export.check
    assert checked_export.validation.ids.shape == (3, 15)  # trace: batch 2, 7 tokens after 5 cached
    for mode in ("full", "incremental"):
        assert check[mode]["max_abs"] <= check["limit"]
        assert check[mode]["top1_agreement"] == 1.0


def test_export_check_detects_a_graph_traced_for_one_input(mixtral_dir, tmp_path):
    """A trace of transformers' eager loop keeps only the experts its input hit; simulate a trace
    whose input reached expert 0 only, and check that validation refuses the graph."""
    model = load_export_model(mixtral_dir)
    val = validation_inputs(model, seed=5)
    make_experts_exportable(model)
    for module in model.modules():
        if isinstance(module, GatherExperts):
            module.num_experts = 1  # the loop now covers expert 0 only, as such a trace would
    specs = export_cached_lm(model, tmp_path / "model.onnx")
    with pytest.raises(ExportMismatchError, match="tracing inputs"):
        validate_export(tmp_path / "model.onnx", specs, val)


def test_fp32_export_runs_through_the_runtime_like_pytorch(checked_export, mixtral_dir, tiny_corpus, tmp_path,
                                                           fresh_ids):
    from dmpq_compile.runtime import load

    art = write_baseline(checked_export, mixtral_dir, tmp_path / "fp32", _cfg(tiny_corpus, bits=16))
    ref = _torch_logits(mixtral_dir, fresh_ids)
    full, incremental = _runtime_logits(art, fresh_ids, prefill=6)
    assert np.abs(full - ref).max() <= _limit(ref)
    assert np.abs(incremental - ref).max() <= _limit(ref)
    manifest = load(art).manifest
    assert manifest["target"]["backend"] == "ort-cpu"
    assert set(manifest["quantization"]["bits_histogram"]) == {"16"}
    for entry in manifest["experts"].values():  # fp32 gate_up [H, 2I] + down [I, H]
        assert len(entry["tensors"]) == 2 and entry["bytes"] == 4 * 3 * HIDDEN * INTER


def test_4bit_experts_artifact(checked_export, mixtral_dir, tiny_corpus, tmp_path, fresh_ids):
    import json

    import onnx

    cfg = _cfg(tiny_corpus, bits=4, block_size=32, accuracy_level=0, scope="experts")
    art = write_baseline(checked_export, mixtral_dir, tmp_path / "q4", cfg)
    model = onnx.load(str(art / "model.onnx"), load_external_data=False)
    ops = [n.op_type for n in model.graph.node]
    layers, experts = 2, 4
    assert ops.count("MatMulNBits") == layers * experts * 2  # gate_up + down of every expert, nothing else
    report = json.loads((art / "report.json").read_text())
    assert report["quantization"]["quantized_expert_matmuls"] == layers * experts * 2
    assert report["quantization"]["quantized_other_matmuls"] == 0
    assert abs(sum(r["freq"] for r in report["experts"]) - layers * 2) < 1e-6  # top-2 per layer
    manifest = json.loads((art / "manifest.json").read_text())
    assert manifest["quantization"]["bits_histogram"] == {"4": layers * experts}
    per_expert = matmulnbits_bytes(2 * INTER, HIDDEN, 4, 32) + matmulnbits_bytes(HIDDEN, INTER, 4, 32)
    for entry in manifest["experts"].values():  # B, scales and zero points of two MatMulNBits, from the manifest
        assert len(entry["tensors"]) == 6 and entry["bytes"] == per_expert
    stats = weight_stats(art, manifest, {key: 1.0 for key in manifest["experts"]})
    assert stats.macs_int8 == layers * experts * 3 * HIDDEN * INTER  # every expert counted, 3-D codes included

    ref = _torch_logits(mixtral_dir, fresh_ids)
    full, incremental = _runtime_logits(art, fresh_ids, prefill=6)
    rel = np.linalg.norm(full - ref) / np.linalg.norm(ref)
    assert rel < 0.2
    assert (full.argmax(-1) == ref.argmax(-1)).mean() >= 0.75
    assert np.abs(incremental - full).max() <= _limit(full)


def test_existing_output_is_refused(checked_export, mixtral_dir, tiny_corpus, tmp_path):
    from dmpq_compile.runtime import ArtifactError

    (tmp_path / "taken").mkdir()
    with pytest.raises(ArtifactError, match="already exists"):
        write_baseline(checked_export, mixtral_dir, tmp_path / "taken", _cfg(tiny_corpus))


def test_cli_parses_the_baseline_command():
    from dmpq_compile.cli import build_parser

    args = build_parser().parse_args(["baseline", "ort-quantizer", "m", "-o", "o", "--block-size", "32",
                                      "--scope", "experts"])
    assert (args.kind, args.block_size, args.scope, args.bits) == ("ort-quantizer", 32, "experts", 4)
