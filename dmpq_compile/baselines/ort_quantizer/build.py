"""The ORT-quantizer baseline end to end: export and check once, then quantize and package as an artifact.

The artifact is packaged by :func:`dmpq_compile.artifact.write_prebuilt_artifact`: the files are
the quantized export, the IR of the same checkpoint describes them (bits and quant spec per
expert, routing frequencies), and the manifest's ``target`` says which runtime runs them
(``ort-cpu``) and who made them (``target.producer``).
"""

from __future__ import annotations

import gc
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from ...backends.onnx_io import MODEL_FILE
from ...backends.onnx_lowering import KVSpec
from ...ir.graph import expert_node
from .check import ValidationInputs, check_onnx_logits, validate_export, validation_inputs
from .config import DEFAULT_CONFIG, EXPORT_ONLY, BaselineError, OrtQuantizerConfig
from .experts import make_experts_exportable
from .export import export_cached_lm, load_export_model
from .quantize import expert_of, quantized_model

RUNTIME = "ort-cpu"  # the artifact runs on ONNX Runtime's CPU execution provider, like an ort-cpu compile


@dataclass(frozen=True)
class CheckedExport:
    """An fp32 torch.onnx export that passed :func:`validate_export`, ready to quantize."""

    path: Path  # model.onnx (weights in model.onnx.data next to it)
    specs: list[KVSpec]
    validation: ValidationInputs
    check: dict[str, Any]
    seconds: float
    opset: int


def export_checked(model_dir: str | Path, folder: str | Path, opset: int = 21, seed: int = 0,
                   tolerance: float = 1e-4) -> CheckedExport:
    """Load ``model_dir``, make its experts exportable, export into ``folder`` and check the graph.

    Raises:
        BaselineError: unsupported model or failed export.
        ExportMismatchError: the exported logits differ from the unmodified PyTorch model's.
    """
    model = load_export_model(model_dir)
    val = validation_inputs(model, seed=seed + 1)
    make_experts_exportable(model, seed=seed)
    path = Path(folder) / MODEL_FILE
    t0 = time.perf_counter()
    specs = export_cached_lm(model, path, opset, seed)
    seconds = time.perf_counter() - t0
    del model
    gc.collect()
    check = validate_export(path, specs, val, tolerance)
    return CheckedExport(path, specs, val, check, round(seconds, 3), opset)


def write_baseline(export: CheckedExport, model_dir: str | Path, out: str | Path,
                   cfg: OrtQuantizerConfig = DEFAULT_CONFIG, overwrite: bool = False,
                   progress: bool = True) -> Path:
    """Quantize a checked export with ``cfg`` and write the artifact ``out`` (atomically).

    One export can be written several times with different bits, block sizes or scopes.
    """
    from ...artifact import write_prebuilt_artifact
    from ...compiler import expert_table
    from ...frontend import load as load_ir
    from ...runtime.manifest import ArtifactError

    model_dir, out = Path(model_dir), Path(out)
    if out.exists() and not overwrite:
        raise ArtifactError(f"{out} already exists; choose another output path or pass --overwrite")
    if export.opset != cfg.opset:
        raise BaselineError(f"the export uses opset {export.opset} but the config asks for {cfg.opset}; re-export")
    t0 = time.perf_counter()
    graph = load_ir(model_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{out.name}.", suffix=".work", dir=out.parent) as work:
        saved = quantized_model(export.path, Path(work), cfg)
        stats = saved.stats
        quality = check_onnx_logits(saved.files[0], export.specs, export.validation)
        _annotate(graph, cfg, stats.pop("quantized_expert_weights", []))
        profile = _profile(graph, model_dir, cfg, progress)
        report = {"baseline": "ort-quantizer", "config": asdict(cfg), "export_seconds": export.seconds,
                  "export_check": export.check, "quantization": stats, "vs_pytorch": quality, "profile": profile,
                  "experts": expert_table(graph),
                  "compile_seconds": round(export.seconds + time.perf_counter() - t0, 3)}
        target = {"backend": RUNTIME, **saved.fields, "execution_provider": "CPUExecutionProvider",
                  **_target_fields(cfg, export.specs, stats, saved.weight_bytes), "expert_weights": saved.experts}
        return write_prebuilt_artifact(graph, saved.files, target, out, report=report, overwrite=overwrite)


def build_ort_quantizer_baseline(model_dir: str | Path, out: str | Path,
                                 cfg: OrtQuantizerConfig = DEFAULT_CONFIG, overwrite: bool = False,
                                 progress: bool = True) -> Path:
    """Export ``model_dir`` with torch.onnx, check it, quantize it with ORT, write an artifact at ``out``.

    Memory: holds the transformers model and then the IR graph (metadata, routing profile)
    and the ONNX model; meant for models of a few GB at most.

    Raises:
        BaselineError: unsupported model or settings, a failed export, or an ONNX graph
            whose logits differ from the PyTorch model's (:class:`ExportMismatchError`).
        ArtifactError: ``out`` exists (without ``overwrite``).
    """
    from ...runtime.manifest import ArtifactError

    out = Path(out)
    if out.exists() and not overwrite:
        raise ArtifactError(f"{out} already exists; choose another output path or pass --overwrite")
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{out.name}.", suffix=".export", dir=out.parent) as work:
        export = export_checked(model_dir, work, cfg.opset, cfg.seed, cfg.tolerance)
        return write_baseline(export, model_dir, out, cfg, overwrite, progress)


def _annotate(graph: Any, cfg: OrtQuantizerConfig, expert_weights: list[str]) -> None:
    """Bits and quant spec on every expert node: quantized only if both its MatMuls were."""
    done: dict[str, int] = {}
    for w in expert_weights:
        key = expert_of(w)
        done[key] = done.get(key, 0) + 1
    graph.meta["group_size"] = cfg.block_size
    spec = {"bits": cfg.bits, "group_size": cfg.block_size, "method": f"ort-{cfg.algo}",
            "scheme": "ort-sym" if cfg.is_symmetric else "ort-asym", "tool": "MatMulNBitsQuantizer"}
    for node in graph.experts():
        key = expert_node(node.attrs['layer'], node.attrs['expert'])
        if done.get(key) == 2:
            graph.annotate(node.id, "bits", cfg.bits)
            graph.annotate(node.id, "quant", {"spec": spec})
        else:
            graph.annotate(node.id, "bits", EXPORT_ONLY)


def _profile(graph: Any, model_dir: Path, cfg: OrtQuantizerConfig, progress: bool) -> dict[str, Any]:
    """Routing frequencies on calibration text (as the ``profile`` pass computes them), or a uniform
    ``top_k / E`` assumption without a corpus; bench uses them for bytes read per token."""
    if cfg.calib_corpus is None:
        freq = graph.meta["top_k"] / graph.meta["num_experts"]
        for node in graph.experts():
            graph.annotate(node.id, "freq", freq)
        return {"source": "uniform assumption top_k / num_experts (no calibration corpus)"}
    from ...compiler import calibration_ids
    from ...passes.profile import route_statistics

    ids = calibration_ids(model_dir, cfg.calib_corpus, cfg.calib_sequences, cfg.seq_len)
    counts, mass, total = route_statistics(graph, ids, progress=progress)
    for node in graph.experts():
        layer, e = node.attrs["layer"], node.attrs["expert"]
        graph.annotate(node.id, "tokens", int(counts[layer][e]))
        graph.annotate(node.id, "freq", float(counts[layer][e]) / total)
        graph.annotate(node.id, "mass", float(mass[layer][e]) / total)
    return {"source": f"routing counts on {cfg.calib_corpus!r} calib split", "tokens": total}


def _target_fields(cfg: OrtQuantizerConfig, specs: list[KVSpec], stats: dict[str, Any], size: int) -> dict:
    import onnxruntime
    import torch

    return {
        "dispatch": "nonzero-gather (torch.export of GatherExperts; every expert runs, on its routed tokens only)",
        "accuracy_level": cfg.accuracy_level if cfg.bits != EXPORT_ONLY and cfg.algo == "default" else None,
        "weight_bytes": size,
        "io": {"input_ids": "input_ids", "logits": "logits", "kv_cache": [asdict(s) for s in specs]},
        "requires": {"onnxruntime": ">=1.20", "numpy": ">=1.24", "tokenizers": ">=0.19"},
        "producer": {"baseline": "ort-quantizer", "exporter": f"torch.onnx dynamo (torch {torch.__version__})",
                     "quantizer": None if cfg.bits == EXPORT_ONLY else
                     f"onnxruntime {onnxruntime.__version__} MatMulNBitsQuantizer ({cfg.algo})",
                     "bits": cfg.bits, "block_size": cfg.block_size, "is_symmetric": cfg.is_symmetric,
                     "scope": cfg.scope, "quantized": {k: v for k, v in stats.items()
                                                       if k != "quantized_expert_weights"}},
    }
