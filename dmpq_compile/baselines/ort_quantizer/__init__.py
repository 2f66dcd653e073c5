"""Peer baseline: ONNX Runtime's own weight quantizer on a ``torch.onnx`` export of the same model.

:func:`build_ort_quantizer_baseline` (:mod:`.build`) runs these steps, one module each:

1. Load the checkpoint with transformers (fp32, eager attention; :mod:`.export`). Record reference logits on
   validation inputs *before* anything is changed.
2. Replace every fused experts module (``gate_up_proj [E, 2I, H]``, ``down_proj [E, H, I]``)
   with :class:`GatherExperts` (:mod:`.experts`). It loops over *all* experts in a fixed order; each expert picks
   its tokens with ``nonzero``, runs its two projections as separate 2-D ``[K, N]`` weights and
   scatter-adds the weighted result. transformers 5's own implementations do not fit:

   * ``eager`` loops over the experts *hit by the input*: data-dependent Python control flow,
     so a trace keeps only the experts that the tracing input reached;
   * ``grouped_mm`` (the CPU default) exports to ``transformers::grouped_mm_fallback``, which
     ``torch.onnx`` cannot translate;
   * ``batched_mm`` gathers rows of 3-D weight tensors, which ``MatMulNBitsQuantizer`` leaves
     in fp32 (it quantizes only MatMuls whose weight is a constant 2-D tensor).

3. Export with ``torch.onnx.export(..., dynamo=True)`` (:mod:`.export`). The wrapper has the runtime's KV-cache
   interface (``input_ids``, ``past_key_values.{l}.key|value`` -> ``logits``,
   ``present.{l}.key|value``), with dynamic batch, sequence and past lengths. Tracing uses
   random inputs unrelated to the validation inputs.
4. Check the exported graph in onnxruntime against the reference logits (:mod:`.check`): one full pass, then
   a prefill followed by one-token decode steps. The batch size, lengths and tokens differ
   from the trace. A graph that is correct only for its tracing input fails here with
   :class:`ExportMismatchError`.
5. Run ``onnxruntime.quantization.matmul_nbits_quantizer.MatMulNBitsQuantizer`` (:mod:`.quantize`): the
   ``DEFAULT`` (min/max round-to-nearest) or ``HQQ`` algorithm, with the block size, the
   symmetric flag and the accuracy level. ``scope="all"`` quantizes every MatMul that has a
   constant weight (the tool's default); ``scope="experts"`` quantizes only the expert
   MatMuls, the same tensors that dmpq-compile quantizes.
6. Package the files as an ``ort-cpu`` artifact with
   :func:`dmpq_compile.artifact.write_prebuilt_artifact` (:mod:`.build`): the manifest, a report
   with routing frequencies from the ``profile`` statistics, and the tokenizer. ``dmpq_compile.runtime.load``
   and ``dmpq-compile bench`` run it like a compiled
   artifact.
"""

from .build import CheckedExport, build_ort_quantizer_baseline, export_checked, write_baseline
from .check import ValidationInputs, check_onnx_logits, compare_logits, validate_export, validation_inputs
from .config import (
    ALGOS,
    BLOCK_SIZES,
    EXPORT_ONLY,
    QUANT_BITS,
    SCOPES,
    BaselineError,
    ExportMismatchError,
    OrtQuantizerConfig,
)
from .experts import GatherExperts, make_experts_exportable
from .export import CachedCausalLM, export_cached_lm, kv_specs, load_export_model
from .quantize import quantize_onnx, quantized_model, strip_node_metadata

__all__ = [
    "ALGOS",
    "BLOCK_SIZES",
    "EXPORT_ONLY",
    "QUANT_BITS",
    "SCOPES",
    "BaselineError",
    "CachedCausalLM",
    "CheckedExport",
    "ExportMismatchError",
    "GatherExperts",
    "OrtQuantizerConfig",
    "ValidationInputs",
    "build_ort_quantizer_baseline",
    "check_onnx_logits",
    "compare_logits",
    "export_cached_lm",
    "export_checked",
    "kv_specs",
    "load_export_model",
    "make_experts_exportable",
    "quantize_onnx",
    "quantized_model",
    "strip_node_metadata",
    "validate_export",
    "validation_inputs",
    "write_baseline",
]
