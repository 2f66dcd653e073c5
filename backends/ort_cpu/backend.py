"""The ``ort-cpu`` backend: an ONNX model for ONNX Runtime's CPU execution provider.

Under the ``kernel`` dispatch (what the compile's default ``auto`` takes where dmpq's kernel library builds,
:func:`auto_dispatch`) a layer's 2/4/8-bit experts run as one ``ai.dmpq.MixedMoE`` node and the quantized
projections outside them as ``ai.dmpq.PanelMatMul``. Under ``fused`` (stock onnxruntime ops) a layer's
4-bit experts run as one ``com.microsoft.QMoE`` node, its 8-bit ones as another; 2-bit
experts as ``com.microsoft.MatMulNBits`` each, reached through gather/scatter inside an ``If``;
16-bit experts and everything else as fp32 ``MatMul`` (or ``MatMulNBits`` at the ``precision``
pass's bits). Attention is ``GroupQueryAttention`` over onnxruntime-genai's KV contract (see
``docs/ort-cpu.md`` for the emitted graph and measurements).
"""

from __future__ import annotations

import json
import logging
import tempfile
from pathlib import Path
from typing import Any, ClassVar

from ...ir.graph import Graph
from ...quant.formats import WeightFormat
from ..base import Backend, BackendError, ExpertCostRow
from ..onnx_io import (
    DEFAULT_EXTERNAL_MB,
    file_fields,
    initializer_bytes,
    io_fields,
    owned_weights,
    quantized_nonexpert_ids,
    require_folder,
    save_checked,
    use_external,
)
from ..onnx_lowering import DISPATCHES, OPSET, LoweringOptions, lower
from . import kernels
from .cost import ORT_CPU_BITS
from .genai import GENAI_CONFIG, genai_config, kv_bytes_per_token, resolve_max_length
from .kernels import DOMAIN as KERNEL_DOMAIN
from .matmulnbits import MatMulNBitsProjection

log = logging.getLogger(__name__)

# measured fastest on CPU (docs/ort-cpu.md, "Dispatch"): QMoE for 4/8-bit experts, gather-if for the rest
DEFAULT_DISPATCH = "fused"
# the kernel dispatch's dot-product paths that auto takes: the portable C++ one is 75-150x slower than AVX2
# (benchmarks/bench_kernel_paths.py), far behind the fused dispatch
AUTO_KERNEL_PATHS = ("avx512-vnni", "avx2")


def auto_dispatch(graph: Graph | None = None, group_size: int | None = None, scale_dtype: str | None = None
                  ) -> tuple[str, str, bool]:
    """What ``--dispatch auto`` (the compile's default) takes on this machine for ``graph``, why, and whether the
    user should hear it as a warning (this machine keeps the kernel from an artifact that could use it): ``kernel``
    where some expert shape of ``graph`` fits the kernel at ``group_size`` and ``scale_dtype``
    (``cost.kernel_joins``; without a graph this is not asked) and dmpq's kernel library builds and has a vector
    path here (Linux x86-64, a C++ compiler, AVX2 or AVX-512 VNNI): it was faster than ``fused`` on every CPU
    and shape measured (docs/ort-cpu.md, "Choosing the dispatch"). Else ``fused``, which runs wherever
    onnxruntime does."""
    from ..cost import expert_shapes
    from .cost import DEFAULT_GROUP_SIZE, KERNEL_BITS, SCALE_DTYPE, kernel_joins, kernel_library

    if graph is not None:
        gs = DEFAULT_GROUP_SIZE if group_size is None else group_size
        scales = SCALE_DTYPE if scale_dtype is None else scale_dtype
        shapes = sorted(set(expert_shapes(graph).values()))
        if not any(kernel_joins(h, i, b, gs, scales) for h, i in shapes for b in KERNEL_BITS):
            return "fused", (f"no expert fits dmpq's kernel (expert widths {shapes} at group size {gs} with "
                             f"{scales} scales; it takes float16 scales and groups of a multiple of 64 that divide "
                             "both widths)"), False
    library, info = kernel_library()
    if library is None:
        return "fused", f"dmpq's kernel library cannot be used here ({info['error']})", True
    if info["path"] not in AUTO_KERNEL_PATHS:
        return "fused", (f"dmpq's kernel library has only its {info['path']} path on this CPU (no AVX2), far slower "
                         "than onnxruntime's own kernels"), True
    return "kernel", f"dmpq's kernel library built here, its {info['path']} path on this CPU", False


class OrtCpuBackend(Backend):
    """ONNX Runtime CPU target (MatMulNBits experts, KV-cached attention)."""

    name: ClassVar[str] = "ort-cpu"
    supported_bits: ClassVar[tuple[int, ...]] = ORT_CPU_BITS
    # 4-bit weights store 4.31 bits at group 64 (float16 scales, 4-bit zero points), so the
    # allocator has room for 8 bits where they lower KL most and 2 bits where they cost least;
    # below llama.cpp's Q4_K_M (about 4.8). Measured: docs/defaults.md
    default_budget_bits: ClassVar[float] = 4.5
    description: ClassVar[str] = ("ONNX Runtime CPU: MatMulNBits experts at 2/4/8 bits (float16 scales by "
                                  "default), fp32 elsewhere, KV cache")

    def __init__(self, scale_dtype: str | None = None, dispatch: str | None = None) -> None:
        """``scale_dtype``: how the scales of 2/4/8-bit weights are stored, ``float16`` (default,
        :data:`.cost.SCALE_DTYPE`: the products run on float16 activations) or ``float32`` (0.25
        more bits per weight at group 64, fp32 activations). ``dispatch``: the expert dispatch this
        backend emits and stores weights for (default :data:`DEFAULT_DISPATCH`; ``kernel`` stores one zero
        point a group unpacked, :meth:`weight_bytes`); ``compile`` resolves ``auto`` first
        (:func:`auto_dispatch`)."""
        from ...quant.spec import VALID_SCALE_DTYPES
        from .cost import SCALE_DTYPE

        self.scale_dtype = SCALE_DTYPE if scale_dtype is None else scale_dtype
        if self.scale_dtype not in VALID_SCALE_DTYPES:
            raise BackendError(f"ort-cpu scale_dtype must be one of {VALID_SCALE_DTYPES}, got {scale_dtype!r}")
        self.dispatch = DEFAULT_DISPATCH if dispatch is None else dispatch
        if self.dispatch not in DISPATCHES:
            raise BackendError(f"ort-cpu dispatch must be one of {DISPATCHES} (auto is resolved by the compile, "
                               f"compiler.resolve_defaults), got {dispatch!r}")

    def cost_table(self, graph: Graph, dispatch: str | None = None, **options: Any) -> dict[str, dict[int, ExpertCostRow]]:
        """Measured MatMulNBits/MatMul costs per expert and bits (see :mod:`.cost`; cached on disk).

        ``dispatch``: the one the artifact will be emitted with (default: this backend's). The
        ``kernel`` dispatch's node is measured only for ``kernel`` (``kernel`` in ``options`` overrides),
        and there a library that cannot be built is an error now, not at emit (where some expert's shape
        joins the node). Its rows' ``bytes`` are the weights as that dispatch stores them (``kernel``: one
        zero point a group unpacked, as :meth:`weight_bytes` counts), so ``--budget-mb`` holds for it."""
        from .cost import DEFAULT_GROUP_SIZE, expert_shapes, kernel_joins, kernel_library, ort_cpu_cost_table

        dispatch = self.dispatch if dispatch is None else dispatch
        if dispatch not in DISPATCHES:
            raise BackendError(f"dispatch must be one of {DISPATCHES}, got {dispatch!r}")
        options.setdefault("group_size", int(graph.meta.get("group_size", DEFAULT_GROUP_SIZE)))
        options.setdefault("scale_dtype", self.scale_dtype)
        options.setdefault("kernel", dispatch == "kernel")
        options.setdefault("panel", dispatch == "kernel")  # bytes as that dispatch stores them (weight_bytes)
        if dispatch == "kernel" and options["kernel"] and any(
                kernel_joins(h, i, b, options["group_size"], options["scale_dtype"])
                for h, i in set(expert_shapes(graph).values()) for b in options.get("bits", self.supported_bits)):
            library, info = kernel_library()
            if library is None:
                raise BackendError(f"--dispatch kernel: {info['error']}")
        return ort_cpu_cost_table(graph, **options)

    def supported_bits_for(self, kind: str) -> tuple[int, ...]:
        """Embedding tables are looked up at 2, 4 and 8 bits (see ``MatMulNBitsProjection.gather``) or
        kept fp32; everything else runs 2/4/8/16."""
        if kind == "embed":
            from .matmulnbits import LOOKUP_BITS

            return (*LOOKUP_BITS, 16)
        return self.supported_bits

    def weight_format(self, bits: int) -> WeightFormat:
        """Group-wise asymmetric codes with this backend's ``scale_dtype`` scales at 2/4/8 bits."""
        return WeightFormat(bits, scale_dtype=self.scale_dtype)

    def weight_bytes(self, n: int, k: int, bits: int, group_size: int, kind: str | None = None) -> int:
        """MatMulNBits codes + scales + packed zero points, or the fp32 weight at 16 bits. Under the ``kernel``
        dispatch a weight the kernels run (``cost.panel_matmul_joins``: every matrix but the embedding table,
        which stays a ``GatherBlockQuantized`` lookup) keeps one zero point a group unpacked."""
        from ..cost import layout_bytes
        from .cost import projection_layout

        panel = self.dispatch == "kernel" and kind != "embed"
        return layout_bytes(projection_layout(n, k, bits, group_size, self.scale_dtype, panel=panel))

    def emit(self, graph: Graph, out_dir: Path, *, accuracy_level: int = 4, dispatch: str | None = None,
             external_data: bool | None = None, external_data_threshold_mb: float = DEFAULT_EXTERNAL_MB,
             opset: int = OPSET, max_length: int | None = None, genai: bool = True) -> dict[str, Any]:
        """Write ``model.onnx`` (+ ``model.onnx.data`` when large) and ``genai_config.json`` into ``out_dir``.

        The graph follows onnxruntime-genai's decoder contract (``attention_mask`` input,
        ``GroupQueryAttention`` over a KV buffer that past and present may share), so the folder is an
        onnxruntime-genai model as it is (:mod:`.genai`).

        Args:
            graph: the IR with ``bits`` on every expert and, for quantized ones, ``quant``.
            out_dir: an existing (empty) folder.
            accuracy_level: MatMulNBits ``accuracy_level``; 4 quantizes activations to int8 inside
                the kernel (fast), 0 keeps them fp32 (exact match with the interpreter).
            dispatch: ``fused`` (one ``com.microsoft.QMoE`` per layer for its 4-bit and one for its 8-bit
                experts, the rest as ``gather-if``), ``kernel`` (one ``ai.dmpq.MixedMoE`` per layer for all its
                2/4/8-bit experts: dmpq's custom-op library, built here and copied into the artifact,
                :mod:`.kernels`), ``gather-if`` (experts compute only their tokens; idle
                experts skipped by an ``If``), ``gather`` (same without the ``If``) or ``dense`` (all
                experts, all tokens). None: this backend's (the layout :meth:`weight_bytes` counts).
            external_data: force (True) or forbid (False) external weight data; None decides by
                size against ``external_data_threshold_mb``.
            external_data_threshold_mb: weight size above which weights go to ``model.onnx.data``.
            opset: default-domain ONNX opset.
            max_length: positions (prompt + generated) onnxruntime-genai preallocates its shared KV buffer for,
                per sequence (``search.max_length`` in ``genai_config.json``; apps may lower it at load).
                None: the model's ``max_position_embeddings``, at most 4096.
            genai: False emits the graph that came before onnxruntime-genai's contract (plain-op attention
                with a growing cache, no ``attention_mask``, no padding, no ``genai_config.json``), which
                ``dmpq_compile.runtime`` still runs; for benchmarks against it.

        Returns:
            Manifest fields: model file names, opset, I/O names and KV-cache shapes, options, and
            ``expert_weights`` (each expert's initializers and their bytes on disk).

        Raises:
            BackendError: unsupported bits, unquantized experts, bad options or a model the
                ONNX checker rejects.
        """
        self.check_bits(graph)
        self.check_formats(graph)
        dispatch = self.dispatch if dispatch is None else dispatch
        if dispatch not in DISPATCHES:
            raise BackendError(f"dispatch must be one of {DISPATCHES}, got {dispatch!r}")
        out_dir = require_folder(out_dir)
        max_length = resolve_max_length(graph, max_length)
        with tempfile.TemporaryFile(dir=out_dir) as spill:  # large eager initializers wait here until written
            options = LoweringOptions(dispatch=dispatch, opset=opset, logits_to_keep=True, genai=genai)
            projection = MatMulNBitsProjection(accuracy_level, kernel=dispatch == "kernel")
            lowered = lower(graph, projection, options, defer=True, spill=spill)
            size = initializer_bytes(lowered.model)
            external = use_external(external_data, size, external_data_threshold_mb)
            path = save_checked(lowered.model, out_dir, external=external, deferred=lowered.deferred)
        io = io_fields(lowered)
        files = file_fields(lowered.model, external)
        library = None
        if any(n.domain == KERNEL_DOMAIN for n in lowered.model.graph.node):
            library = kernels.install(out_dir)  # the artifact carries the library its graph needs
        genai_fields = None
        if genai and io["kv_cache"]:  # a decoder: a lone MoE block (tests) has no attention, no genai model
            config = genai_config(graph, io, files["model_file"], max_length, custom_ops_library=library)
            (out_dir / GENAI_CONFIG).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
            genai_fields = {"config": GENAI_CONFIG, "max_length": max_length,
                            "kv_bytes_per_token": kv_bytes_per_token(io["kv_cache"])}
        log.info("emitted %s (%.1f MB weights%s, dispatch=%s, accuracy_level=%d)", path, size / 1e6,
                 ", external data" if external else "", dispatch, accuracy_level)
        return {
            **files,
            "execution_provider": "CPUExecutionProvider",
            "custom_ops_library": library,
            "dispatch": lowered.dispatch,
            "fusion": fusion_summary(projection.decisions),
            "accuracy_level": accuracy_level,
            "weight_bytes": size,
            "io": io,
            "genai": genai_fields,
            "requires": {"onnxruntime": ">=1.20", "numpy": ">=1.24", "tokenizers": ">=0.19"},
            "expert_weights": owned_weights(lowered.model, lowered.owners, {n.id for n in graph.experts()}),
            "nonexpert_weights": owned_weights(lowered.model, lowered.owners, quantized_nonexpert_ids(graph)),
        }


def fusion_summary(decisions: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The manifest's account of the fused dispatch's choices (None when nothing could fuse): how many
    layer-width groups and experts run fused, what decided, and each group's decision."""
    if not decisions:
        return None
    return {"groups": len(decisions), "fused_groups": sum(d["fused"] > 0 for d in decisions),
            "experts": sum(d["experts"] for d in decisions), "fused_experts": sum(d["fused"] for d in decisions),
            "basis": sorted({d["basis"] for d in decisions}), "decisions": decisions}
