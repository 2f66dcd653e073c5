"""Analytical cost table of the ``trt-a100`` target (TensorRT on an NVIDIA A100).

No GPU is needed: each projection of an expert is costed with a roofline,

    time = max(bytes / (BW * mem_efficiency), flops / (peak * compute_efficiency)) + launch overhead,

from NVIDIA's published A100 peak figures (cited next to the constants) and kernel-efficiency
factors that are **assumptions** (named constants in :class:`KernelAssumptions`, each with the
reason for its value). Decode is one token (M=1); prefill is M=128 reported per token.

Storage per bit-width, exactly what the trt-a100 emitter writes with ``precision="fp16"`` in the
weight formats the target declares (:mod:`.formats`, emitted by :mod:`dmpq_compile.backends.trt.qdq`;
TensorRT's explicit quantization is symmetric and its block quantization is INT4-only, NVIDIA
TensorRT documentation, "Working with Quantized Types"):

* 16: FP16 weights ``[K, N]``; FP16 tensor-core GEMM.
* 8: INT8 weights ``[K, N]`` with one fp16 scale per output channel, weight-only
  (``DequantizeLinear`` -> FP16 ``MatMul``); FP16 tensor-core GEMM.
* 4: INT4 weights ``[Kp, N]`` (K padded to whole groups, two codes per byte), one fp16 scale
  per ``group_size`` block, plus the emitter's zero-point correction: an fp16 ``[G, N]`` matrix
  applied to per-group activation sums (a ``ReduceSum`` and a ``[M, G] x [G, N]`` GEMM); FP16
  tensor-core GEMM after dequantization.

The INT8 tensor-core peak (624 TOPS) is recorded in :class:`A100Spec` but unused: the emitter's
INT8 is weight-only. TensorRT has no 2- or 3-bit integer weights, so those bit-widths are refused.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from ...ir.graph import Graph
from ...quant.spec import DEFAULT_GROUP_SIZE
from ..base import ExpertCostRow
from ..cost import (
    HOROWITZ_45NM,
    CostError,
    EnergyModel,
    energy_mj,
    expert_bytes,
    expert_projections,
    expert_shapes,
    mac_ops,
    merge_ops,
    rows_for_graph,
)
from .formats import TRT_WEIGHT_FORMATS

TARGET = "trt-a100"
TRT_BITS: tuple[int, ...] = (4, 8, 16)
PREFILL_TOKENS = 128
ACTIVATION_BYTES = 2  # FP16 activations in and out of every projection


@dataclass(frozen=True)
class A100Spec:
    """Published peak figures of one A100 variant (dense, i.e. without structured sparsity).

    Attributes:
        name: Variant name.
        hbm_gbs: Peak memory bandwidth, GB/s (10^9 bytes/s).
        fp16_tflops: Dense FP16 tensor-core peak, TFLOPS (the roofline's compute roof).
        int8_tops: Dense INT8 tensor-core peak, TOPS (for reference: the emitter's INT8 is
            weight-only and computes in FP16).
        source: Where the figures come from.
    """

    name: str
    hbm_gbs: float
    fp16_tflops: float
    int8_tops: float
    source: str


# Compute peaks, all variants: NVIDIA A100 Tensor Core GPU datasheet
# (nvidia-a100-datasheet-us-nvidia-1758950-r4-web.pdf, specification table): "FP16 Tensor Core
# 312 TFLOPS | 624 TFLOPS*", "BFLOAT16 Tensor Core 312 | 624*", "TF32 Tensor Core 156 | 312*",
# "INT8 Tensor Core 624 TOPS | 1248 TOPS*", where * = with sparsity; we use the dense values.
_FP16_TFLOPS = 312.0
_INT8_TOPS = 624.0
A100_VARIANTS: dict[str, A100Spec] = {
    # Same datasheet, A100 80GB SXM column: "GPU Memory Bandwidth 2,039 GB/s" (HBM2e).
    "sxm4-80gb": A100Spec("sxm4-80gb", 2039.0, _FP16_TFLOPS, _INT8_TOPS,
                          "NVIDIA A100 datasheet r4 (A100 80GB SXM: 2,039 GB/s; 312 TFLOPS FP16, 624 TOPS INT8)"),
    # NVIDIA A100 Tensor Core GPU Architecture whitepaper (2020), V100-vs-A100 comparison table:
    # memory bandwidth 1555 GB/sec for the 40 GB HBM2 A100 (SXM4); same tensor-core peaks.
    "sxm4-40gb": A100Spec("sxm4-40gb", 1555.0, _FP16_TFLOPS, _INT8_TOPS,
                          "NVIDIA A100 architecture whitepaper (A100 40GB: 1555 GB/s) + datasheet r4 peaks"),
}


@dataclass(frozen=True)
class KernelAssumptions:
    """Kernel-efficiency factors of the roofline. ASSUMPTIONS: not measured, not published.

    They are round numbers chosen for these reasons; change them (or pass your own) once a
    real A100 measurement exists. All compute efficiencies are relative to the FP16 tensor-core
    peak, because every bit-width the emitter writes runs its GEMM in FP16.

    Attributes:
        mem_efficiency: Fraction of peak HBM bandwidth a decode GEMV reaches, by bits. FP16 GEMV
            streams weights with little arithmetic per byte (0.80); INT8 weight-only adds a
            dequantizing multiply per weight (0.70); INT4 also unpacks nibbles (0.60).
        compute_efficiency: Fraction of the FP16 tensor-core peak an M=128 GEMM reaches, by bits.
            A 128-row GEMM fills few output tiles (FP16 0.60); INT8 and INT4 weight-only GEMMs
            also dequantize in their prologue (0.50, 0.45).
        launch_us: Per-kernel launch and tail overhead in microseconds. 3 us is a typical order
            of magnitude for a CUDA kernel launch without CUDA graphs.
        kernels: Kernels per projection, by bits: one GEMM (``DequantizeLinear``, the FP16 casts
            and the SiLU/product assumed fused into it), plus for INT4 the zero-point
            correction's ``ReduceSum`` and small GEMM (its ``Add`` assumed fused).
    """

    mem_efficiency: Mapping[int, float] = field(default_factory=lambda: {16: 0.80, 8: 0.70, 4: 0.60})
    compute_efficiency: Mapping[int, float] = field(default_factory=lambda: {16: 0.60, 8: 0.50, 4: 0.45})
    launch_us: float = 3.0
    kernels: Mapping[int, int] = field(default_factory=lambda: {16: 1, 8: 1, 4: 3})


DEFAULT_ASSUMPTIONS = KernelAssumptions()


@dataclass(frozen=True)
class TrtExpertCost:
    """Analytical cost of one expert shape at one bit-width."""

    h: int
    i: int
    bits: int
    decode_ms: float
    prefill_ms: float  # per token
    bytes: int
    energy_mj: float
    decode_bound: str  # "memory" or "compute" (of the largest projection)

    @property
    def bandwidth_gbs(self) -> float:
        """Weight bytes over the decode time, GB/s."""
        return self.bytes / (self.decode_ms * 1e-3) / 1e9

    def row(self) -> ExpertCostRow:
        return ExpertCostRow(decode_ms=self.decode_ms, prefill_ms=self.prefill_ms, bytes=self.bytes,
                             energy_mj=self.energy_mj)


def _check_bits(bits: int) -> None:
    if bits not in TRT_BITS:
        raise CostError(f"trt-a100 supports bits {TRT_BITS} (INT4 weight-only, INT8, FP16); {bits!r} is not "
                        f"supported by TensorRT")


def _spec(variant: str) -> A100Spec:
    try:
        return A100_VARIANTS[variant]
    except KeyError:
        raise CostError(f"unknown A100 variant {variant!r}; choose from {sorted(A100_VARIANTS)}") from None


def trt_weight_bytes(n: int, k: int, bits: int, group_size: int = DEFAULT_GROUP_SIZE,
                     zp_correction: bool = True) -> int:
    """Stored bytes of one ``K -> N`` weight on trt-a100 (layouts in the module docstring).

    Args:
        n: Output features.
        k: Input features.
        bits: 4, 8 or 16.
        group_size: INT4 block size (even; the emitter refuses odd ones).
        zp_correction: Count the INT4 zero-point correction matrix (the emitter leaves it out
            only when every zero point is 8, i.e. symmetric codes).
    """
    _check_bits(bits)
    if bits == 16:
        return 2 * n * k
    if TRT_WEIGHT_FORMATS[bits].per_channel:  # the declared 8-bit format: codes + one fp16 scale per channel
        return n * k * bits // 8 + 2 * n
    if group_size < 2 or group_size % 2:
        raise CostError(f"INT4 group size must be even and >= 2 (TensorRT INT4 tensors), got {group_size}")
    groups = -(-k // group_size)
    return n * groups * group_size // 2 + 2 * n * groups * (2 if zp_correction else 1)


def trt_expert_bytes(h: int, i: int, bits: int, group_size: int = DEFAULT_GROUP_SIZE) -> int:
    """Weight bytes of one expert on trt-a100."""
    return expert_bytes(h, i, lambda n, k: trt_weight_bytes(n, k, bits, group_size))


def projection_time_ms(n: int, k: int, m: int, bits: int, group_size: int = DEFAULT_GROUP_SIZE,
                       variant: str = "sxm4-80gb", assumptions: KernelAssumptions = DEFAULT_ASSUMPTIONS,
                       ) -> tuple[float, str]:
    """Roofline time (ms) of one ``[M, K] x [K, N]`` projection and which roof binds it.

    ``bytes = weight bytes + 2 * M * (K + N)`` (FP16 activations); ``flops = 2 * M * N * K``,
    plus ``2 * M * G * N`` for the INT4 zero-point correction; the FP16 tensor-core peak;
    ``assumptions.kernels[bits]`` launches.
    """
    spec = _spec(variant)
    moved = trt_weight_bytes(n, k, bits, group_size) + ACTIVATION_BYTES * m * (k + n)
    flops = 2.0 * m * n * k + (2.0 * m * -(-k // group_size) * n if bits == 4 else 0.0)
    mem_s = moved / (spec.hbm_gbs * 1e9 * assumptions.mem_efficiency[bits])
    compute_s = flops / (spec.fp16_tflops * 1e12 * assumptions.compute_efficiency[bits])
    bound = "memory" if mem_s >= compute_s else "compute"
    return (max(mem_s, compute_s) + assumptions.kernels[bits] * assumptions.launch_us * 1e-6) * 1e3, bound


def trt_expert_energy_mj(h: int, i: int, bits: int, group_size: int = DEFAULT_GROUP_SIZE,
                         model: EnergyModel = HOROWITZ_45NM) -> float:
    """Estimated energy (mJ) of one decoded token through one expert on trt-a100.

    Bytes: weights plus FP16 activations, all from DRAM. Ops: an FP16 multiply and fp32
    accumulate per MAC (every bit-width runs an FP16 GEMM); bits 8 and 4 add one FP16 multiply
    per weight (dequantization by its scale). With the default 45 nm DRAM figure this overstates
    HBM2e's per-byte energy; see docs/cost-tables.md.
    """
    _check_bits(bits)
    projections = expert_projections(h, i)
    moved = trt_expert_bytes(h, i, bits, group_size) + ACTIVATION_BYTES * sum(n + k for _, n, k in projections)
    macs = 3 * h * i
    ops = mac_ops(macs, "fp16_mul", "fp32_add")
    if bits != 16:
        ops = merge_ops(ops, {"fp16_mul": float(macs)})
    return energy_mj(moved, ops, model)


def trt_expert_cost(h: int, i: int, bits: int, group_size: int = DEFAULT_GROUP_SIZE, variant: str = "sxm4-80gb",
                    assumptions: KernelAssumptions = DEFAULT_ASSUMPTIONS,
                    prefill_tokens: int = PREFILL_TOKENS) -> TrtExpertCost:
    """Roofline cost of one expert ``(h, i)`` at ``bits`` (three projections, summed).

    Args:
        h: Hidden size.
        i: Expert intermediate size.
        bits: 4, 8 or 16.
        group_size: INT4 block size.
        variant: A100 variant.
        assumptions: Kernel-efficiency factors.
        prefill_tokens: Rows of the prefill GEMM (the result is per token).
    """
    _check_bits(bits)
    decode = [projection_time_ms(n, k, 1, bits, group_size, variant, assumptions)
              for _, n, k in expert_projections(h, i)]
    prefill = [projection_time_ms(n, k, prefill_tokens, bits, group_size, variant, assumptions)[0]
               for _, n, k in expert_projections(h, i)]
    slowest = max(decode)[1]
    return TrtExpertCost(h=h, i=i, bits=bits, decode_ms=sum(t for t, _ in decode),
                         prefill_ms=sum(prefill) / prefill_tokens, bytes=trt_expert_bytes(h, i, bits, group_size),
                         energy_mj=trt_expert_energy_mj(h, i, bits, group_size), decode_bound=slowest)


def trt_shape_costs(shapes: Iterable[tuple[int, int]], bits: Sequence[int] = TRT_BITS,
                    group_size: int = DEFAULT_GROUP_SIZE, variant: str = "sxm4-80gb",
                    assumptions: KernelAssumptions = DEFAULT_ASSUMPTIONS,
                    ) -> dict[tuple[int, int], dict[int, TrtExpertCost]]:
    """``{(H, I): {bits: TrtExpertCost}}`` for every distinct shape."""
    _spec(variant)
    for b in bits:
        _check_bits(b)
    return {s: {b: trt_expert_cost(s[0], s[1], b, group_size, variant, assumptions) for b in bits}
            for s in sorted(set(shapes))}


def trt_a100_cost_table(graph: Graph, group_size: int = DEFAULT_GROUP_SIZE, variant: str = "sxm4-80gb",
                        bits: Sequence[int] = TRT_BITS, assumptions: KernelAssumptions = DEFAULT_ASSUMPTIONS,
                        ) -> dict[str, dict[int, ExpertCostRow]]:
    """The analytical trt-a100 cost table ``{expert node id: {bits: ExpertCostRow}}``.

    Args:
        graph: The model; every ``expert`` node gets a row per bit-width.
        group_size: INT4 block size along K (one fp16 scale per block).
        variant: A100 variant, a key of :data:`A100_VARIANTS`.
        bits: Bit-widths to cost, a subset of :data:`TRT_BITS`.
        assumptions: Kernel-efficiency factors of the roofline.

    Returns:
        Rows with roofline ``decode_ms`` (M=1), ``prefill_ms`` (M=128, per token), stored
        ``bytes`` and the per-token ``energy_mj`` estimate.

    Raises:
        CostError: For bits TensorRT cannot run (2, 3) or an unknown variant.
    """
    shapes = expert_shapes(graph)
    costs = trt_shape_costs(shapes.values(), bits, group_size, variant, assumptions)
    per_shape = {s: {b: c.row() for b, c in row.items()} for s, row in costs.items()}
    return rows_for_graph(shapes, per_shape, bits)
