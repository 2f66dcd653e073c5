"""The ``ort-cpu`` backend: an ONNX model for ONNX Runtime's CPU execution provider.

Experts run as ``com.microsoft.MatMulNBits`` at their own bit-width (2/4/8), 16-bit experts and
everything else as fp32 ``MatMul``; tokens reach experts through gather/scatter dispatch and
attention keeps a KV cache (see ``docs/ort-cpu.md`` for the emitted graph and measurements).
"""

from __future__ import annotations

import logging
from dataclasses import asdict
from pathlib import Path
from typing import Any, ClassVar

import onnx

from ...ir.graph import Graph
from ..base import Backend, BackendError, ExpertCostRow
from ..onnx_lowering import DISPATCHES, OPSET, LoweringOptions, lower
from .matmulnbits import MatMulNBitsProjection

log = logging.getLogger(__name__)

MODEL_FILE = "model.onnx"
DATA_FILE = "model.onnx.data"
DEFAULT_DISPATCH = "gather-if"  # measured fastest on CPU, see docs/ort-cpu.md
PROTOBUF_LIMIT = 1_800_000_000  # stay clear of protobuf's 2 GiB message limit


class OrtCpuBackend(Backend):
    """ONNX Runtime CPU target (MatMulNBits experts, KV-cached attention)."""

    name: ClassVar[str] = "ort-cpu"
    supported_bits: ClassVar[tuple[int, ...]] = (2, 4, 8, 16)
    description: ClassVar[str] = "ONNX Runtime CPU: MatMulNBits experts at 2/4/8 bits, fp32 elsewhere, KV cache"

    def cost_table(self, graph: Graph, **options: Any) -> dict[str, dict[int, ExpertCostRow]]:
        """Measured MatMulNBits/MatMul costs per expert and bits (see :mod:`.cost`; cached on disk)."""
        from .cost import DEFAULT_GROUP_SIZE, ort_cpu_cost_table

        options.setdefault("group_size", int(graph.meta.get("group_size", DEFAULT_GROUP_SIZE)))
        return ort_cpu_cost_table(graph, **options)

    def emit(self, graph: Graph, out_dir: Path, *, accuracy_level: int = 4, dispatch: str = DEFAULT_DISPATCH,
             external_data: bool | None = None, external_data_threshold_mb: float = 100.0,
             opset: int = OPSET) -> dict[str, Any]:
        """Write ``model.onnx`` (+ ``model.onnx.data`` when large) into ``out_dir``.

        Args:
            graph: the IR with ``bits`` on every expert and, for quantized ones, ``quant``.
            out_dir: an existing (empty) folder.
            accuracy_level: MatMulNBits ``accuracy_level``; 4 quantizes activations to int8 inside
                the kernel (fast), 0 keeps them fp32 (exact match with the interpreter).
            dispatch: ``gather-if`` (experts compute only their tokens; idle experts skipped by an
                ``If``), ``gather`` (same without the ``If``) or ``dense`` (all experts, all tokens).
            external_data: force (True) or forbid (False) external weight data; None decides by
                size against ``external_data_threshold_mb``.
            external_data_threshold_mb: weight size above which weights go to ``model.onnx.data``.
            opset: default-domain ONNX opset.

        Returns:
            Manifest fields: model file names, opset, I/O names and KV-cache shapes, options.

        Raises:
            BackendError: unsupported bits, unquantized experts, bad options or a model the
                ONNX checker rejects.
        """
        self.check_bits(graph)
        if dispatch not in DISPATCHES:
            raise BackendError(f"dispatch must be one of {DISPATCHES}, got {dispatch!r}")
        out_dir = Path(out_dir)
        if not out_dir.is_dir():
            raise BackendError(f"{out_dir} is not a folder; the artifact writer creates it before emit")
        lowered = lower(graph, MatMulNBitsProjection(accuracy_level), LoweringOptions(dispatch=dispatch, opset=opset))
        size = sum(len(t.raw_data) for t in lowered.model.graph.initializer)
        external = _use_external(external_data, size, external_data_threshold_mb)
        path = out_dir / MODEL_FILE
        if external:
            onnx.save_model(lowered.model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                            location=DATA_FILE, size_threshold=1024)
        else:
            onnx.save_model(lowered.model, str(path))
        try:
            onnx.checker.check_model(str(path), full_check=True)
        except onnx.checker.ValidationError as e:
            raise BackendError(f"the emitted ONNX model fails onnx.checker: {e}") from e
        log.info("emitted %s (%.1f MB weights%s, dispatch=%s, accuracy_level=%d)", path, size / 1e6,
                 ", external data" if external else "", dispatch, accuracy_level)
        return {
            "format": "onnx",
            "model_file": MODEL_FILE,
            "external_data_file": DATA_FILE if external else None,
            "opset": opset,
            "custom_domains": {d.domain: d.version for d in lowered.model.opset_import if d.domain},
            "execution_provider": "CPUExecutionProvider",
            "dispatch": lowered.dispatch,
            "accuracy_level": accuracy_level,
            "weight_bytes": size,
            "io": {"input_ids": lowered.input_ids, "logits": lowered.logits,
                   "kv_cache": [asdict(kv) for kv in lowered.kv_cache]},
            "requires": {"onnxruntime": ">=1.20", "numpy": ">=1.24", "tokenizers": ">=0.19"},
        }


def _use_external(external_data: bool | None, size: int, threshold_mb: float) -> bool:
    if external_data is False and size > PROTOBUF_LIMIT:
        raise BackendError(f"the weights take {size / 1e9:.2f} GB, over protobuf's 2 GB limit for one file; "
                           "allow external data (external_data=None or True)")
    if external_data is not None:
        return external_data
    if threshold_mb < 0:
        raise BackendError(f"external_data_threshold_mb must be >= 0, got {threshold_mb}")
    return size > threshold_mb * 1e6 or size > PROTOBUF_LIMIT
