"""Running ONNX Runtime's ``MatMulNBitsQuantizer`` on an export, and saving the result."""

from __future__ import annotations

import logging
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ...backends.onnx_io import (
    DATA_FILE,
    MODEL_FILE,
    file_fields,
    initializer_bytes,
    owned_weights,
    save_model,
    use_external,
)
from ...ir.graph import expert_node
from .config import EXPORT_ONLY, BaselineError, OrtQuantizerConfig

log = logging.getLogger(__name__)

_EXPERT_WEIGHT = re.compile(r"^model\.layers\.(\d+)\.(?:[\w.]*\.)?experts\.(\d+)\.(gate_up|down)$")


@dataclass
class SavedModel:
    """An ONNX model written to a folder: its files, their manifest fields, quantization stats, weight bytes."""

    files: list[Path]  # model.onnx, then model.onnx.data when the weights are external
    fields: dict[str, Any]  # format, file names, opsets (backends.onnx_io.file_fields)
    stats: dict[str, Any]
    weight_bytes: int
    experts: dict[str, dict[str, Any]]  # expert id -> {"tensors", "bytes"} (backends.onnx_io.owned_weights)


def expert_of(weight: str) -> str | None:
    """``"L{layer}.E{expert}"`` of an exported expert weight (``model.layers.{l}...experts.{e}.gate_up|down``),
    None for any other initializer. The names are those :class:`~.experts.GatherExperts` gives its parameters."""
    m = _EXPERT_WEIGHT.match(weight)
    return expert_node(int(m.group(1)), int(m.group(2))) if m else None


def _ort_quantizer_module() -> Any:
    """Import ``onnxruntime.quantization.matmul_nbits_quantizer`` without its side effects on logging.

    The module calls ``logging.basicConfig(level=INFO)`` on import, which would switch the whole
    process's root logger to INFO; a temporary handler makes that call a no-op. Its per-node
    INFO messages are lowered to WARNING unless someone configured that logger.
    """
    import importlib
    import sys

    name = "onnxruntime.quantization.matmul_nbits_quantizer"
    if name not in sys.modules:
        root, guard = logging.getLogger(), logging.NullHandler()
        root.addHandler(guard)
        try:
            importlib.import_module(name)
        finally:
            root.removeHandler(guard)
        ort_log = logging.getLogger(name)
        if ort_log.level == logging.NOTSET:
            ort_log.setLevel(logging.WARNING)
    return sys.modules[name]


def _algo_config(cfg: OrtQuantizerConfig) -> Any:
    nbits = _ort_quantizer_module()
    if cfg.algo == "hqq":
        if cfg.accuracy_level:
            log.info("ORT's HQQ quantizer writes no accuracy_level; MatMulNBits runs with its default (0)")
        return nbits.HQQWeightOnlyQuantConfig(block_size=cfg.block_size, bits=cfg.bits)
    return nbits.DefaultWeightOnlyQuantConfig(block_size=cfg.block_size, is_symmetric=cfg.is_symmetric,
                                        accuracy_level=cfg.accuracy_level or None, bits=cfg.bits)


def _weight_of(node: Any, initializers: set[str]) -> str | None:
    return node.input[1] if node.op_type == "MatMul" and len(node.input) > 1 and node.input[1] in initializers \
        else None


def _name_nodes(model: Any) -> None:
    """Give unnamed nodes unique names (``nodes_to_exclude`` matches by name)."""
    for i, node in enumerate(model.graph.node):
        if not node.name:
            node.name = f"dmpq_node_{i}"


def _excluded_matmuls(model: Any, scope: str) -> list[str]:
    if scope == "all":
        return []
    inits = {t.name for t in model.graph.initializer}
    return [n.name for n in model.graph.node
            if (w := _weight_of(n, inits)) is not None and expert_of(w) is None]


def quantize_onnx(src: str | Path, cfg: OrtQuantizerConfig) -> tuple[Any, dict[str, Any]]:
    """Run ``MatMulNBitsQuantizer`` on the model at ``src`` (with its external data).

    Returns:
        ``(quantized ModelProto, stats)``; stats count the MatMuls quantized (experts / other) and
        those kept in fp32, and list the expert weights that were quantized
        (``quantized_expert_weights``) and which expert each input of their ``MatMulNBits``
        belongs to (``expert_tensors``, ``{initializer: "L{layer}.E{expert}"}``).
    """
    import onnx

    model = onnx.load(str(src))
    _name_nodes(model)
    inits = {t.name for t in model.graph.initializer}
    weights = {n.name: w for n in model.graph.node if (w := _weight_of(n, inits)) is not None}
    exclude = _excluded_matmuls(model, cfg.scope)
    t0 = time.perf_counter()
    quantizer = _ort_quantizer_module().MatMulNBitsQuantizer(model, nodes_to_exclude=exclude,
                                                             algo_config=_algo_config(cfg))
    quantizer.process()
    out = quantizer.model.model
    inits = {t.name for t in out.graph.initializer}
    sources = {n.name: weights[n.name.rsplit(f"_Q{cfg.bits}", 1)[0]] for n in out.graph.node  # the quantizer's naming
               if n.op_type == "MatMulNBits" and n.name.rsplit(f"_Q{cfg.bits}", 1)[0] in weights}
    quantized = list(sources.values())
    experts = sorted(w for w in quantized if expert_of(w) is not None)
    stats = {"seconds": round(time.perf_counter() - t0, 3), "matmuls_with_constant_weight": len(weights),
             "quantized_expert_matmuls": len(experts), "quantized_other_matmuls": len(quantized) - len(experts),
             "fp32_matmuls": len(weights) - len(quantized), "quantized_expert_weights": experts,
             "expert_tensors": {name: expert_of(sources[n.name]) for n in out.graph.node if n.name in sources
                                and expert_of(sources[n.name]) for name in n.input[1:] if name in inits}}
    if not quantized:
        raise BaselineError("MatMulNBitsQuantizer quantized no MatMul; the export has no MatMul with a constant "
                            "2-D weight")
    log.info("quantized %d expert and %d other MatMuls to %d bits (%d kept fp32)", len(experts),
             stats["quantized_other_matmuls"], cfg.bits, stats["fp32_matmuls"])
    return out, stats


def save_onnx(model: Any, folder: Path) -> SavedModel:
    """Save ``model`` as ``folder/model.onnx``, its weights in ``model.onnx.data`` above
    :data:`~dmpq_compile.backends.onnx_io.DEFAULT_EXTERNAL_MB` MB (:func:`~dmpq_compile.backends.onnx_io.use_external`)."""
    size = initializer_bytes(model)
    folder.mkdir(parents=True, exist_ok=True)
    external = use_external(None, size)
    save_model(model, folder, external=external)
    files = [folder / MODEL_FILE] + ([folder / DATA_FILE] if external else [])
    return SavedModel(files, file_fields(model, external), {}, size, {})


def quantized_model(fp32: Path, folder: Path, cfg: OrtQuantizerConfig) -> SavedModel:
    """Quantize the exported model at ``fp32`` with ``cfg`` (bits 16: keep it fp32) and save it into ``folder``.

    Node metadata is stripped first (:func:`strip_node_metadata`). ``stats`` are
    :func:`quantize_onnx`'s, less ``expert_tensors``, plus ``stripped_node_metadata_bytes``;
    ``experts`` lists each expert's initializers (quantized or fp32) and their bytes on disk.
    """
    import onnx

    if cfg.bits == EXPORT_ONLY:
        model = onnx.load(str(fp32))
        stats: dict[str, Any] = {"quantized_expert_matmuls": 0, "quantized_other_matmuls": 0,
                                 "quantized_expert_weights": []}
    else:
        model, stats = quantize_onnx(fp32, cfg)
    owners = stats.pop("expert_tensors", {})
    inits = {t.name for t in model.graph.initializer}
    owners.update({w: key for n in model.graph.node if (w := _weight_of(n, inits)) and (key := expert_of(w))})
    stats["stripped_node_metadata_bytes"] = strip_node_metadata(model)
    saved = save_onnx(model, folder)
    return SavedModel(saved.files, saved.fields, stats, saved.weight_bytes, owned_weights(model, owners))


def strip_node_metadata(model: Any) -> int:
    """Drop the debugging ``metadata_props`` torch.onnx puts on every node (module path, FX node,
    stack); they are not needed to run and made up ~5 MB of a 12 MB tiny model. Returns the bytes."""
    removed = 0
    graphs = [model.graph]
    while graphs:
        graph = graphs.pop()
        for node in graph.node:
            removed += sum(len(p.key) + len(p.value) for p in node.metadata_props)
            del node.metadata_props[:]
            graphs.extend(a.g for a in node.attribute if a.HasField("g"))
            graphs.extend(g for a in node.attribute for g in a.graphs)
    return removed
