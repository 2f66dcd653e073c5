"""Peer baselines: other tools' quantization of the same checkpoint, wrapped as dmpq artifacts.

``ort_quantizer``: a ``torch.onnx`` export of the Hugging Face model (KV-cache interface,
export-friendly experts) quantized by ONNX Runtime's own ``MatMulNBitsQuantizer``. The result
is an ``ort-cpu`` artifact that :func:`dmpq_compile.runtime.load` and ``dmpq-compile bench`` run
like a compiled one.
"""

from .ort_quantizer import (
    BaselineError,
    CheckedExport,
    ExportMismatchError,
    OrtQuantizerConfig,
    build_ort_quantizer_baseline,
    export_cached_lm,
    export_checked,
    load_export_model,
    make_experts_exportable,
    quantize_onnx,
    validate_export,
    write_baseline,
)

__all__ = [
    "BaselineError",
    "CheckedExport",
    "ExportMismatchError",
    "OrtQuantizerConfig",
    "build_ort_quantizer_baseline",
    "export_cached_lm",
    "export_checked",
    "load_export_model",
    "make_experts_exportable",
    "quantize_onnx",
    "validate_export",
    "write_baseline",
]
