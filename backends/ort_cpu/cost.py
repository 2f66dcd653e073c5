"""Measured cost table of the ``ort-cpu`` target (ONNX Runtime, CPU execution provider).

Each distinct expert shape ``(H, I)`` and bit-width is micro-benchmarked with exactly the
kernels the emitter uses, in both layouts the default ``fused`` dispatch can ship
(:mod:`dmpq_compile.passes.allocate.fusion` picks between them per layer and width, in the lowering
and in the allocator's latency term alike):

* **per-expert dispatch** (:func:`build_dispatch_model`): the expert inside the ``If`` that
  ``gather-if`` emits, with its row gather, weighting and scatter-add. Its projections are
  ``com.microsoft.MatMulNBits`` (bits 2/4/8, ``block_size`` = group size, ``accuracy_level=4``, packed
  uint8 zero points, float16 scales and so float16 activations, cast from and back to fp32 around
  each product as the emitter does) or a plain fp32 ``MatMul`` (bits 16). Timed with the rows
  routed (``decode_ms`` / ``prefill_ms``) and with none routed (``idle_*``: what the ``If`` costs
  every token that does not pick the expert);
* **fused** (4- and 8-bit experts whose widths are whole blocks): one ``com.microsoft.QMoE`` of this
  one expert, timed with the rows routed and with none (its fixed part, ``group_*``: the per-node
  cost a layer pays once per width it runs fused); ``fused_*`` is the difference;
* **kernel** (``--dispatch kernel``: 2/4/8-bit experts whose widths are whole groups of 64, float16
  scales): one ``ai.dmpq.MixedMoE`` (dmpq's custom op, :mod:`.kernels`) holding this one expert,
  built with the lowering's own layout helpers (:func:`.matmulnbits.mixed_moe_meta`,
  :func:`.matmulnbits.panel_codes`, :func:`.matmulnbits.panel_blocks`), timed with the rows routed to
  it and routed to an expert the node does not hold (its fixed part, ``kernel_fixed_*``: paid once per
  layer whatever widths the node holds); ``kernel_*`` is the difference. Measured only where the
  library builds (a C++ compiler, Linux x86-64); elsewhere these rows are None and the log says why.

The models run in an ``onnxruntime.InferenceSession`` with a configurable number of intra-op
threads.

Medians are taken per shape and bit-width of decode (M=1) and prefill (M=128, reported per token):
routed runs **cold** (the last-level cache flushed before every run by streaming a buffer twice its
size, so the weights come from DRAM) and, for per-expert dispatch, also **warm** (back-to-back
runs); the runs with no row routed read no weights and are timed warm. The table's ``decode_ms``
and ``prefill_ms`` (and ``fused_*``) are cold medians: in a real MoE model an expert's weights are
rarely still cached when the router picks it again. Results are cached on disk per CPU
model, thread count, onnxruntime version, group size, shape and bits (see
:class:`dmpq_compile.backends.cost.CostCache`); the kernel's in entries of their own, keyed as well by
the library's build (a hash of its sources, flags and compiler) and the dot-product path it picks here,
so a table measured without the library (or with another build) is never served as having kernel rows.

Entry points: :func:`ort_cpu_cost_table` (the backend's ``cost_table``), :func:`measure_shapes`
(the ``cost`` command) and :func:`measure_expert_cost` (one measurement, no cache).
"""

from __future__ import annotations

import logging
import statistics
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from dataclasses import field as dc_field
from pathlib import Path
from typing import Any

import numpy as np

from ...ir.graph import Graph
from ...quant.spec import DEFAULT_GROUP_SIZE
from ...sysinfo import available_cpus, cpu_model
from ..base import ExpertCostRow
from ..cost import (
    HOROWITZ_45NM,
    CostCache,
    CostError,
    EnergyModel,
    energy_mj,
    expert_bytes,
    expert_projections,
    expert_shapes,
    layout_bytes,
    mac_ops,
    matmulnbits_layout,
    merge_ops,
    rows_for_graph,
)

log = logging.getLogger(__name__)

TARGET = "ort-cpu"
ORT_CPU_BITS: tuple[int, ...] = (2, 4, 8, 16)
"""Bit-widths the ort-cpu kernels run: MatMulNBits 2/4/8 and fp32 MatMul for 16."""
SCALE_DTYPE = "float16"
"""The scales of every ort-cpu MatMulNBits (and GatherBlockQuantized) weight. MatMulNBits takes its
scales in the type of its activations, so the emitter casts each product's input to float16 and
its output back to fp32. Measured with onnxruntime 1.32 on this 2-core AVX2 machine
(``benchmarks/bench_scale_dtype.py``): the scales take half the bytes (4-bit group 64: 4.31 instead
of 4.56 stored bits per weight); the 2- and 8-bit kernels run as fast as with fp32 scales, the 4-bit
one 8-9 % slower per expert at Mixtral width. ``OrtCpuBackend(scale_dtype="float32")``
(``--scale-dtype float32``) keeps fp32 scales and activations."""
ACCURACY_LEVEL = 4
"""MatMulNBits ``accuracy_level`` the emitter uses (A quantized to int8 per block; with 0 the
2- and 8-bit CPU kernels were measured ~40x slower)."""
PREFILL_TOKENS = 128
DEFAULT_REPEATS = 5
FUSED_BITS: tuple[int, ...] = (4, 8)
"""Widths the default (``fused``) dispatch can run as one ``com.microsoft.QMoE`` per layer and width
(``MatMulNBitsProjection.fusable`` at ``accuracy_level`` 4); their experts are timed in both layouts."""
KERNEL_BITS: tuple[int, ...] = (2, 4, 8)
"""Widths ``--dispatch kernel`` runs in its one ``ai.dmpq.MixedMoE`` per layer (``kernel_fusable``)."""
KERNEL_BENCH_VERSION = 1
"""Bumped when the kernel benchmark changes (the library's own changes are in its build hash)."""
KERNEL_FIELDS = ("kernel_decode", "kernel_prefill", "kernel_fixed_decode", "kernel_fixed_prefill")
BENCH_VERSION = 6  # 3: gate and up in one MatMulNBits; 4: float16 scales; 5: 4/8-bit experts as QMoE;
# 6: per-expert dispatch (If, gather, scatter) routed and idle, QMoE routed and fixed
"""Bumped when the benchmark changes in a way that invalidates cached results."""
INVERSION_MARGIN = 0.10
"""How much slower a 4-bit expert's decode may measure than its 8-bit one before the table warns."""
SETTLE_S = 0.01
"""Untimed sleep after each cache flush. The flush is ~0.1 s of CPU; without yielding, the OS
scheduler tends to preempt the timed run that follows on a shared machine (measured here: cold
fp32 decode of a 2048x1024 expert, 1 thread, median 6.1 ms with the range 2.0-9.8 ms without the
sleep, 1.97 ms with the range 1.92-2.06 ms with it)."""
_FALLBACK_LLC_BYTES = 64 << 20
_MAX_EVICT_BYTES = 2 << 30

_clock: Callable[[], float] = time.perf_counter
"""Timer used for every timed run (a module attribute so tests can replace it)."""


def _ort() -> Any:
    """Import onnxruntime lazily, with an actionable error."""
    try:
        import onnxruntime
    except ImportError as e:  # pragma: no cover - onnxruntime is a dependency
        raise CostError("the ort-cpu cost table needs onnxruntime: pip install onnxruntime") from e
    return onnxruntime


# -- layout and bytes -------------------------------------------------------------------------
def projection_layout(n: int, k: int, bits: int, group_size: int, scale_dtype: str = SCALE_DTYPE,
                      panel: bool = False) -> dict[str, tuple[tuple[int, ...], str]]:
    """Initializer ``{name: (shape, dtype)}`` of one projection ``K -> N`` as the emitter stores it
    (``scale_dtype``: the emitted :data:`SCALE_DTYPE`; float32 for comparisons). ``panel``: as the kernel
    dispatch stores a weight that :func:`panel_matmul_joins` (in ``MixedMoE`` or ``PanelMatMul``): the codes,
    float16 scales and one zero point a group unpacked (MatMulNBits packs them to ``bits`` each)."""
    if bits == 16:
        return {"W": ((k, n), "float32")}
    if panel and panel_matmul_joins(n, k, bits, group_size, scale_dtype):
        groups = n * k // group_size
        return {"codes": ((n * k * bits // 8,), "uint8"), "scales": ((groups,), "float16"),
                "zeros": ((groups,), "uint8")}
    return matmulnbits_layout(n, k, bits, group_size, scale_dtype)


def ort_cpu_expert_bytes(h: int, i: int, bits: int, group_size: int = DEFAULT_GROUP_SIZE,
                         scale_dtype: str = SCALE_DTYPE, panel: bool = False) -> int:
    """Weight bytes of one expert on ort-cpu (codes + scales + zero points, or fp32 weights); ``panel``: as
    ``--dispatch kernel`` stores it (:func:`projection_layout`)."""
    _check_bits(bits)
    return expert_bytes(h, i, lambda n, k: layout_bytes(projection_layout(n, k, bits, group_size, scale_dtype,
                                                                          panel=panel)))


def _check_bits(bits: int) -> None:
    if bits not in ORT_CPU_BITS:
        raise CostError(f"ort-cpu runs bits {ORT_CPU_BITS}, not {bits!r} (MatMulNBits CPU kernels: 2, 4, 8; "
                        f"16 = fp32 MatMul)")


# -- energy -----------------------------------------------------------------------------------
def ort_cpu_expert_energy_mj(h: int, i: int, bits: int, group_size: int = DEFAULT_GROUP_SIZE,
                             model: EnergyModel = HOROWITZ_45NM, scale_dtype: str = SCALE_DTYPE,
                             panel: bool = False) -> float:
    """Estimated energy (mJ) of one decoded token through one expert on ort-cpu.

    Bytes moved: every weight byte once from DRAM (cold decode) plus fp32 activations in and out
    of each projection. Ops: bits 16 is an fp32 multiply and add per MAC; bits 2/4/8 with
    ``accuracy_level=4`` run int8 dot products (int8 multiply, int32 add per MAC) plus one fp32
    multiply and add per output and K-block (scaling and accumulating each block's partial sum).
    The SiLU and elementwise product (O(I) ops) are left out.
    """
    weight = ort_cpu_expert_bytes(h, i, bits, group_size, scale_dtype, panel)
    activations = sum(4 * (n + k) for _, n, k in expert_projections(h, i))
    macs = 3 * h * i
    if bits == 16:
        ops = mac_ops(macs, "fp32_mul", "fp32_add")
    else:
        blocks = sum(n * -(-k // group_size) for _, n, k in expert_projections(h, i))
        ops = merge_ops(mac_ops(macs, "int8_mul", "int32_add"), mac_ops(blocks, "fp32_mul", "fp32_add"))
    return energy_mj(weight + activations, ops, model)


# -- benchmark model --------------------------------------------------------------------------
def _random_array(shape: tuple[int, ...], dtype: str, rng: np.random.Generator, scale: float) -> np.ndarray:
    """Random initializer contents (values do not change the kernels' speed)."""
    if dtype == "uint8":
        return rng.integers(0, 256, size=shape, dtype=np.uint8)
    return (rng.standard_normal(size=shape, dtype=np.float32) * np.float32(scale)).astype(dtype, copy=False)


def _projection(role: str, x: str, n: int, k: int, bits: int, group_size: int,
                rng: np.random.Generator, scale_dtype: str = SCALE_DTYPE) -> tuple[list[Any], list[Any]]:
    """``(nodes, initializers)`` of one projection ``x [M, K] -> role [M, N]`` (float16 scales:
    with the Casts of its input and output, as emitted)."""
    from onnx import TensorProto, helper, numpy_helper

    layout = projection_layout(n, k, bits, group_size, scale_dtype)
    inits = [numpy_helper.from_array(_random_array(shape, dtype, rng, k ** -0.5 if name == "W" else 0.01),
                                     f"{role}.{name}")
             for name, (shape, dtype) in layout.items()]
    if bits == 16:
        return [helper.make_node("MatMul", [x, f"{role}.W"], [role], name=role)], inits
    half = scale_dtype == "float16"
    a, y = (f"{x}.h", f"{role}.h") if half else (x, role)
    node = helper.make_node("MatMulNBits", [a, f"{role}.B", f"{role}.scales", f"{role}.zero_points"], [y],
                            name=role, domain="com.microsoft", K=k, N=n, bits=bits, block_size=group_size,
                            accuracy_level=ACCURACY_LEVEL)
    if not half:
        return [node], inits
    return [helper.make_node("Cast", [x], [a], to=TensorProto.FLOAT16), node,
            helper.make_node("Cast", [y], [role], to=TensorProto.FLOAT)], inits


def build_expert_model(h: int, i: int, bits: int, group_size: int = DEFAULT_GROUP_SIZE, seed: int = 0,
                       scale_dtype: str = SCALE_DTYPE, layout: str | None = None) -> Any:
    """An ONNX model of one SwiGLU expert ``x [M, H] -> y [M, H]`` at ``bits`` (random weights;
    ``scale_dtype`` of the MatMulNBits weights: the emitted one, or float32 for comparisons).

    ``layout``: ``matmulnbits`` (the default: gate and up in one MatMulNBits, down in another, as
    per-expert dispatch runs them; fp32 MatMul at 16) or ``qmoe`` (one ``com.microsoft.QMoE`` of this
    one expert, with a second input ``w [M]``, the routing weight: how the fused dispatch runs
    :data:`FUSED_BITS` experts).

    Returns:
        ``onnx.ModelProto`` with input ``x`` (and ``w`` for ``qmoe``) and output ``down`` (``M`` symbolic).
    """
    from onnx import TensorProto, helper

    _check_bits(bits)
    rng = np.random.default_rng(seed)
    if layout not in (None, "matmulnbits", "qmoe"):
        raise CostError(f"unknown expert layout {layout!r}: use 'matmulnbits' or 'qmoe'")
    if layout == "qmoe":
        if not fuses(h, i, bits, group_size):
            raise CostError(f"QMoE does not run {h}x{i} experts at {bits} bits with group size {group_size}")
        return _qmoe_expert_model(h, i, bits, group_size, rng, scale_dtype)
    if bits == 16:
        gate, gate_w = _projection("gate", "x", i, h, bits, group_size, rng, scale_dtype)
        up, up_w = _projection("up", "x", i, h, bits, group_size, rng, scale_dtype)
    else:  # as the emitter lowers quantized experts: gate and up stacked in one MatMulNBits, then Split
        fused, gate_w = _projection("gate_up", "x", 2 * i, h, bits, group_size, rng, scale_dtype)
        gate = [*fused, helper.make_node("Split", ["gate_up"], ["gate", "up"], axis=-1, num_outputs=2)]
        up, up_w = [], []
    act = [helper.make_node("Sigmoid", ["gate"], ["gate_sig"]),
           helper.make_node("Mul", ["gate", "gate_sig"], ["gate_act"]),
           helper.make_node("Mul", ["gate_act", "up"], ["hidden"])]
    down, down_w = _projection("down", "hidden", h, i, bits, group_size, rng, scale_dtype)
    graph = helper.make_graph(
        [*gate, *up, *act, *down], f"expert_{h}x{i}_b{bits}",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["M", h])],
        [helper.make_tensor_value_info("down", TensorProto.FLOAT, ["M", h])],
        gate_w + up_w + down_w)
    opsets = [helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)]  # Split(num_outputs): >= 18
    return helper.make_model(graph, opset_imports=opsets, producer_name="dmpq-compile-cost")


def build_dispatch_model(h: int, i: int, bits: int, group_size: int = DEFAULT_GROUP_SIZE, seed: int = 0,
                         scale_dtype: str = SCALE_DTYPE) -> Any:
    """One expert as per-expert (``gather-if``) dispatch emits it: inputs ``x [M, H]`` and ``w [M]``
    (the expert's column of the routing weights, 0 where not routed); an ``If`` on "any row routed"
    whose then-branch gathers the routed rows (``NonZero``), runs the expert (:func:`build_expert_model`'s
    nodes), weights it and adds it into a zero ``[M, H]`` buffer (``GatherND``/``Add``/``ScatterND``),
    and whose else-branch passes the buffer through. With ``w`` all 0 it times what an expert costs a
    token that does not pick it."""
    from onnx import TensorProto, helper, numpy_helper

    expert = build_expert_model(h, i, bits, group_size, seed, scale_dtype, layout="matmulnbits").graph
    rename = {"x": "rows_x", "down": "y"}
    body = [helper.make_node("NonZero", ["w"], ["nz"]), helper.make_node("Transpose", ["nz"], ["rows"], perm=[1, 0]),
            helper.make_node("Reshape", ["rows", "minus_one"], ["flat_rows"]),
            helper.make_node("Gather", ["x", "flat_rows"], ["rows_x"], axis=0)]
    for node in expert.node:
        copy = helper.make_node(node.op_type, [rename.get(v, v) for v in node.input],
                                [rename.get(v, v) for v in node.output], domain=node.domain)
        copy.attribute.extend(node.attribute)
        body.append(copy)
    body += [helper.make_node("Gather", ["w", "rows"], ["row_w"], axis=0),  # [n, 1]
             helper.make_node("Mul", ["y", "row_w"], ["wy"]),
             helper.make_node("GatherND", ["acc", "rows"], ["old"]),
             helper.make_node("Add", ["old", "wy"], ["new"]),
             helper.make_node("ScatterND", ["acc", "rows", "new"], ["added"])]
    out = [helper.make_tensor_value_info("added", TensorProto.FLOAT, None)]
    then_branch = helper.make_graph(body, "routed", [], out)
    else_branch = helper.make_graph([helper.make_node("Identity", ["acc"], ["kept"])], "idle", [],
                                    [helper.make_tensor_value_info("kept", TensorProto.FLOAT, None)])
    nodes = [helper.make_node("Shape", ["x"], ["x_shape"]),
             helper.make_node("ConstantOfShape", ["x_shape"], ["acc"],
                              value=helper.make_tensor("z", TensorProto.FLOAT, [1], [0.0])),
             helper.make_node("ReduceSum", ["w", "axis0"], ["count"], keepdims=0),
             helper.make_node("Greater", ["count", "zero"], ["cond"]),
             helper.make_node("If", ["cond"], ["down"], then_branch=then_branch, else_branch=else_branch)]
    consts = [numpy_helper.from_array(np.array([-1], np.int64), "minus_one"),
              numpy_helper.from_array(np.array([0], np.int64), "axis0"),
              numpy_helper.from_array(np.array(0.0, np.float32), "zero")]
    graph = helper.make_graph(nodes, f"dispatch_{h}x{i}_b{bits}",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["M", h]),
                               helper.make_tensor_value_info("w", TensorProto.FLOAT, ["M"])],
                              [helper.make_tensor_value_info("down", TensorProto.FLOAT, ["M", h])],
                              list(expert.initializer) + consts)
    opsets = [helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)]
    return helper.make_model(graph, opset_imports=opsets, producer_name="dmpq-compile-cost")


def fuses(h: int, i: int, bits: int, group_size: int) -> bool:
    """Whether the fused dispatch can run this expert shape at ``bits`` (``FUSED_BITS``, whole blocks)."""
    return bits in FUSED_BITS and not (h % group_size or i % group_size)


def kernel_joins(h: int, i: int, bits: int, group_size: int, scale_dtype: str = SCALE_DTYPE) -> bool:
    """Whether the kernel dispatch runs this expert shape at ``bits`` inside its ``MixedMoE`` node
    (``MatMulNBitsProjection.kernel_fusable``: 2/4/8 bits, float16 scales, a group size that is a multiple
    of 64 dividing both widths)."""
    return bits in KERNEL_BITS and scale_dtype == "float16" and not group_size % 64 \
        and not (h % group_size or i % group_size)


def panel_matmul_joins(n: int, k: int, bits: int, group_size: int, scale_dtype: str = SCALE_DTYPE) -> bool:
    """Whether the kernel dispatch runs a quantized ``[n, k]`` projection outside the experts (attention, the
    LM head, shared experts) as dmpq's ``PanelMatMul`` (``MatMulNBitsProjection``): the experts' rule on bits,
    scales and groups, ``k`` whole groups, ``n`` whole 16-row panels."""
    return bits in KERNEL_BITS and scale_dtype == "float16" and not group_size % 64 and not k % group_size \
        and not n % 16


def build_kernel_model(h: int, i: int, bits: int, group_size: int = DEFAULT_GROUP_SIZE, seed: int = 0) -> Any:
    """One expert as the kernel dispatch emits it: an ``ai.dmpq.MixedMoE`` whose table holds expert 0 at
    ``bits`` and an expert 1 it does not hold (bits 0), with random codes, float16 scales and zero points in
    the lowering's panel layout. Inputs ``x [M, H]``, ``top_i [M, 1]`` (int64) and ``top_w [M, 1]``: rows
    routed to expert 0 time the node with the expert, rows routed to expert 1 its fixed part."""
    from onnx import TensorProto, helper, numpy_helper

    from .kernels import DOMAIN
    from .matmulnbits import mixed_moe_meta, panel_blocks, panel_codes

    if not kernel_joins(h, i, bits, group_size):
        raise CostError(f"MixedMoE does not run {h}x{i} experts at {bits} bits with group size {group_size}")
    rng = np.random.default_rng(seed)
    meta, sizes = mixed_moe_meta({0: bits}, 2, h, i, group_size)
    parts: dict[str, list[np.ndarray]] = {"codes": [], "scales": [], "zeros": []}
    for n, k in ((i, h), (i, h), (h, i)):  # gate, up, down: as _mixed_part writes them
        parts["codes"].append(panel_codes(rng.integers(0, 2 ** bits, (n, k), dtype=np.uint8), bits))
        parts["scales"].append(panel_blocks((rng.standard_normal((n, k // group_size), np.float32) * 0.01)
                                            .astype(np.float16)))
        parts["zeros"].append(panel_blocks(rng.integers(0, 2 ** bits, (n, k // group_size), dtype=np.uint8)))
    inits = [numpy_helper.from_array(np.concatenate(parts[name]), name) for name in ("codes", "scales", "zeros")]
    if [int(t.dims[0]) for t in inits] != sizes:
        raise CostError(f"internal error: MixedMoE probe tensors {[t.dims for t in inits]} do not match its table {sizes}")
    inits.append(numpy_helper.from_array(meta, "meta"))
    node = helper.make_node("MixedMoE", ["x", "top_i", "top_w", "codes", "scales", "zeros", "meta"], ["down"],
                            name="mixed_moe", domain=DOMAIN, hidden=h, inter=i, block_size=group_size,
                            accuracy_level=ACCURACY_LEVEL)
    graph = helper.make_graph([node], f"expert_{h}x{i}_b{bits}_kernel",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["M", h]),
                               helper.make_tensor_value_info("top_i", TensorProto.INT64, ["M", 1]),
                               helper.make_tensor_value_info("top_w", TensorProto.FLOAT, ["M", 1])],
                              [helper.make_tensor_value_info("down", TensorProto.FLOAT, ["M", h])], inits)
    opsets = [helper.make_opsetid("", 21), helper.make_opsetid(DOMAIN, 1)]
    return helper.make_model(graph, opset_imports=opsets, producer_name="dmpq-compile-cost")


def kernel_library(build: bool = True) -> tuple[Path | None, dict[str, Any]]:
    """The kernel library to measure with and what identifies its measurements: ``(path, {"build": hash of
    its sources, flags and compiler, "path": its dot-product path here, "pool": DMPQ_KERNEL_POOL})``, or
    ``(None, {"error": why})`` where it cannot be built (or ``build`` is False)."""
    import os

    from ..base import BackendError
    from . import kernels

    if not build:
        return None, {"error": "not asked for"}
    try:
        library = kernels.build()
        path = kernels.describe(library)["path"]  # refuses a DMPQ_KERNEL_PATH this CPU lacks
    except BackendError as e:
        return None, {"error": str(e)}
    return library, {"build": library.parent.name, "path": path, "pool": os.environ.get("DMPQ_KERNEL_POOL", "ort")}


def _qmoe_expert_model(h: int, i: int, bits: int, group_size: int, rng: np.random.Generator,
                       scale_dtype: str) -> Any:
    """One expert as the fused dispatch emits a width group of one: QMoE with ``k = 1``; input ``w [M]``
    is the routing weight (1: routed; 0: the kernel skips the row, which times the node's fixed part)."""
    from onnx import TensorProto, helper, numpy_helper

    from ...quant import QuantSpec
    from .matmulnbits import qmoe_attributes, qmoe_layout

    spec = QuantSpec(bits=bits, group_size=group_size, scale_dtype=scale_dtype)
    inits, names = [], {}
    for field, shape, dtype in qmoe_layout(1, h, i, spec):
        inits.append(numpy_helper.from_array(_random_array(shape, np.dtype(dtype).name, rng, 0.01), field))
        names[field] = field
    nodes = []
    for field in ("fc1_scales", "fc2_scales"):
        if scale_dtype == "float16":
            nodes.append(helper.make_node("Cast", [field], [f"{field}.f32"], to=TensorProto.FLOAT))
            names[field] = f"{field}.f32"
    nodes += [helper.make_node("Unsqueeze", ["w", "one_col"], ["probs"]),  # [M, 1]
              helper.make_node("QMoE", ["x", "probs", names["fc1"], names["fc1_scales"], "", names["fc2"],
                                        names["fc2_scales"], "", "", "", "", names["fc1_zero_points"],
                                        names["fc2_zero_points"], "", "probs"], ["down"], domain="com.microsoft",
                               k=1, **qmoe_attributes(bits, group_size, ACCURACY_LEVEL))]
    inits.append(numpy_helper.from_array(np.array([1], np.int64), "one_col"))
    graph = helper.make_graph(nodes, f"expert_{h}x{i}_b{bits}_qmoe",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["M", h]),
                               helper.make_tensor_value_info("w", TensorProto.FLOAT, ["M"])],
                              [helper.make_tensor_value_info("down", TensorProto.FLOAT, ["M", h])], inits)
    opsets = [helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)]
    return helper.make_model(graph, opset_imports=opsets, producer_name="dmpq-compile-cost")


def make_session(model: Any, threads: int, library: Path | None = None) -> Any:
    """An ``InferenceSession`` on the CPU provider with ``threads`` intra-op threads (and the custom-op
    ``library`` registered, for the kernel's models).

    Spinning of idle pool threads is turned off so the benchmark does not steal cycles from the
    cache flush between cold runs (or from other processes sharing the machine).
    """
    ort = _ort()
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.log_severity_level = 3
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if library is not None:
        so.register_custom_ops_library(str(library))
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])


# -- cache flushing ---------------------------------------------------------------------------
def llc_bytes() -> int | None:
    """Size of the largest data/unified CPU cache from sysfs, or None when unknown."""
    best = None
    for index in sorted(Path("/sys/devices/system/cpu/cpu0/cache").glob("index*")):
        try:
            kind = (index / "type").read_text().strip()
            size = (index / "size").read_text().strip()
        except OSError:
            continue
        if kind == "Instruction" or not size:
            continue
        mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(size[-1].upper(), 1)
        value = int(size.rstrip("KMGkmg")) * mult
        best = value if best is None else max(best, value)
    return best


def default_evict_bytes() -> int:
    """Twice the last-level cache (capped at 2 GiB); 128 MiB when the cache size is unknown."""
    llc = llc_bytes()
    if llc is None:
        log.warning("cannot read the last-level cache size from sysfs; flushing with %d MiB",
                    2 * _FALLBACK_LLC_BYTES >> 20)
        llc = _FALLBACK_LLC_BYTES
    return min(2 * llc, _MAX_EVICT_BYTES)


class CacheEvictor:
    """Flushes CPU caches by reading and writing a buffer larger than the last-level cache."""

    def __init__(self, nbytes: int) -> None:
        if nbytes < 4096:
            raise CostError(f"cache-flush buffer must be at least 4 KiB, got {nbytes} bytes")
        self.nbytes = nbytes
        self._buf = np.ones(nbytes // 8, dtype=np.int64)

    def evict(self) -> None:
        """Touch every cache line of the buffer (read-modify-write, so lines are dirty and owned)."""
        np.bitwise_xor(self._buf, 1, out=self._buf)

    def evict_and_settle(self) -> None:
        """:meth:`evict`, then sleep :data:`SETTLE_S` so the next timed run starts on a fresh slice."""
        self.evict()
        time.sleep(SETTLE_S)


# -- measuring --------------------------------------------------------------------------------
@dataclass
class ExpertMeasurement:
    """Timings of one expert shape at one bit-width (samples in ms; prefill samples per token).

    ``decode_*`` / ``prefill_*``: the expert under per-expert dispatch with every row routed to it
    (:func:`build_dispatch_model`), cold and warm; ``idle_*``: the same with no row routed (warm).
    Where the width fuses (:func:`fuses`): ``fused_*`` one QMoE of this expert with every row routed
    (cold) and ``group_*`` with none (warm: the node's fixed part); empty lists otherwise. Where the
    kernel takes the width (:func:`kernel_joins`) and its library was built: ``kernel_decode`` /
    ``kernel_prefill`` one MixedMoE holding this expert with every row routed to it (cold) and
    ``kernel_fixed_*`` with every row routed to an expert it does not hold (warm); empty otherwise.
    """

    h: int
    i: int
    bits: int
    group_size: int
    threads: int
    bytes: int
    energy_mj: float
    decode_cold: list[float]
    decode_warm: list[float]
    prefill_cold: list[float]
    prefill_warm: list[float]
    prefill_tokens: int = PREFILL_TOKENS
    idle_decode: list[float] = dc_field(default_factory=list)
    idle_prefill: list[float] = dc_field(default_factory=list)
    fused_decode: list[float] = dc_field(default_factory=list)
    fused_prefill: list[float] = dc_field(default_factory=list)
    group_decode: list[float] = dc_field(default_factory=list)
    group_prefill: list[float] = dc_field(default_factory=list)
    kernel_decode: list[float] = dc_field(default_factory=list)
    kernel_prefill: list[float] = dc_field(default_factory=list)
    kernel_fixed_decode: list[float] = dc_field(default_factory=list)
    kernel_fixed_prefill: list[float] = dc_field(default_factory=list)

    @property
    def decode_ms(self) -> float:
        """Median cold decode latency (what the cost table uses)."""
        return statistics.median(self.decode_cold)

    @property
    def decode_warm_ms(self) -> float:
        return statistics.median(self.decode_warm)

    @property
    def prefill_ms(self) -> float:
        """Median cold prefill latency per token."""
        return statistics.median(self.prefill_cold)

    @property
    def prefill_warm_ms(self) -> float:
        return statistics.median(self.prefill_warm)

    @property
    def bandwidth_gbs(self) -> float:
        """Weight bytes over the cold decode median, in GB/s (10^9 bytes per second)."""
        return self.bytes / (self.decode_ms * 1e-3) / 1e9

    def spread(self, name: str = "decode_cold") -> float:
        """``(max - min) / median`` of one sample list (0 for a single sample)."""
        samples = getattr(self, name)
        return (max(samples) - min(samples)) / statistics.median(samples)

    def row(self) -> ExpertCostRow:
        """The cost-table row: medians; the fused and kernel parts as routed minus fixed (>= 0), None where the
        expert cannot run in that op (or the kernel was not measured)."""
        med = statistics.median
        idle = (med(self.idle_decode), med(self.idle_prefill)) if self.idle_decode else (0.0, 0.0)
        fused: dict[str, Any] = {}
        if self.fused_decode:
            group = med(self.group_decode), med(self.group_prefill)
            fused = {"group_decode_ms": group[0], "group_prefill_ms": group[1],
                     "fused_decode_ms": max(0.0, med(self.fused_decode) - group[0]),
                     "fused_prefill_ms": max(0.0, med(self.fused_prefill) - group[1])}
        if self.kernel_decode:
            fixed = med(self.kernel_fixed_decode), med(self.kernel_fixed_prefill)
            fused |= {"kernel_fixed_decode_ms": fixed[0], "kernel_fixed_prefill_ms": fixed[1],
                      "kernel_decode_ms": max(0.0, med(self.kernel_decode) - fixed[0]),
                      "kernel_prefill_ms": max(0.0, med(self.kernel_prefill) - fixed[1])}
        return ExpertCostRow(decode_ms=self.decode_ms, prefill_ms=self.prefill_ms, bytes=self.bytes,
                             energy_mj=self.energy_mj, idle_decode_ms=idle[0], idle_prefill_ms=idle[1], **fused)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ExpertMeasurement:
        return cls(**dict(data))


def _time_runs(run: Callable[[], Any], repeats: int, before: Callable[[], None] | None = None) -> list[float]:
    """Milliseconds of ``repeats`` calls of ``run`` (``before`` runs untimed ahead of each)."""
    samples = []
    for _ in range(repeats):
        if before is not None:
            before()
        start = _clock()
        run()
        samples.append((_clock() - start) * 1e3)
    return samples


def _time_model(sess: Any, feeds: Mapping[str, Mapping[str, np.ndarray]], repeats: int, evictor: CacheEvictor,
                plan: Mapping[str, tuple[str, bool]]) -> dict[str, list[float]]:
    """``{sample name: ms per run}`` for ``plan``'s ``{name: (feed, cold)}`` on ``sess``, after warm-up runs
    of every feed (the first runs prepack weights and size buffers); cold runs flush the caches first."""
    used = {feed for feed, _ in plan.values()}
    for name in sorted(used) + sorted(used):
        sess.run(None, dict(feeds[name]))
    return {name: _time_runs(lambda f=feeds[feed]: sess.run(None, dict(f)), repeats,
                             evictor.evict_and_settle if cold else None)
            for name, (feed, cold) in plan.items()}


def measure_expert_cost(h: int, i: int, bits: int, group_size: int = DEFAULT_GROUP_SIZE, threads: int | None = None,
                        repeats: int = DEFAULT_REPEATS, prefill_tokens: int = PREFILL_TOKENS,
                        evictor: CacheEvictor | None = None, seed: int = 0,
                        scale_dtype: str = SCALE_DTYPE, kernel: Path | None = None) -> ExpertMeasurement:
    """Benchmark one expert of shape ``(h, i)`` at ``bits`` on this machine (no cache).

    Args:
        h: Hidden size (gate/up input, down output).
        i: Expert intermediate size.
        bits: 2, 4 or 8 (MatMulNBits) or 16 (fp32 MatMul).
        group_size: MatMulNBits ``block_size`` (ignored for bits 16).
        threads: Intra-op threads; default all CPUs this process may use.
        repeats: Timed runs per median (each of the four medians).
        prefill_tokens: Rows of the prefill input.
        evictor: Cache flusher for cold runs; default one of :func:`default_evict_bytes`.
        seed: Seed of the random weights and inputs.
        scale_dtype: MatMulNBits scales (the emitted :data:`SCALE_DTYPE`, or float32 to compare).
        kernel: dmpq's kernel library (:func:`kernel_library`) to time the kernel layout with too, where it
            takes the width (:func:`kernel_joins`); None: no kernel samples.

    Returns:
        The sample lists, the weight bytes and the energy estimate.
    """
    _check_bits(bits)
    if repeats < 1 or prefill_tokens < 1:
        raise CostError(f"repeats and prefill_tokens must be >= 1, got {repeats}, {prefill_tokens}")
    threads = threads or available_cpus()
    evictor = evictor or CacheEvictor(default_evict_bytes())
    rng = np.random.default_rng(seed + 1)
    x1 = rng.standard_normal((1, h), dtype=np.float32)
    xp = rng.standard_normal((prefill_tokens, h), dtype=np.float32)
    feeds = {"decode": {"x": x1, "w": np.ones(1, np.float32)}, "prefill": {"x": xp, "w": np.ones(prefill_tokens, np.float32)},
             "idle_decode": {"x": x1, "w": np.zeros(1, np.float32)},
             "idle_prefill": {"x": xp, "w": np.zeros(prefill_tokens, np.float32)}}
    samples = _time_model(make_session(build_dispatch_model(h, i, bits, group_size, seed, scale_dtype), threads),
                          feeds, repeats, evictor, {"decode_warm": ("decode", False), "prefill_warm": ("prefill", False),
                                                    "decode_cold": ("decode", True), "prefill_cold": ("prefill", True),
                                                    "idle_decode": ("idle_decode", False),
                                                    "idle_prefill": ("idle_prefill", False)})
    if fuses(h, i, bits, group_size):
        sess = make_session(build_expert_model(h, i, bits, group_size, seed, scale_dtype, layout="qmoe"), threads)
        samples |= _time_model(sess, feeds, repeats, evictor, {
            "fused_decode": ("decode", True), "fused_prefill": ("prefill", True),
            "group_decode": ("idle_decode", False), "group_prefill": ("idle_prefill", False)})
    if kernel is not None and kernel_joins(h, i, bits, group_size, scale_dtype):
        samples |= measure_kernel_cost(h, i, bits, group_size, threads, repeats, prefill_tokens, evictor, seed,
                                       kernel, per_token=False)
    for name in samples:
        if "prefill" in name:
            samples[name] = [ms / prefill_tokens for ms in samples[name]]
    return ExpertMeasurement(h=h, i=i, bits=bits, group_size=group_size, threads=threads,
                             bytes=ort_cpu_expert_bytes(h, i, bits, group_size, scale_dtype),
                             energy_mj=ort_cpu_expert_energy_mj(h, i, bits, group_size, scale_dtype=scale_dtype),
                             prefill_tokens=prefill_tokens, **samples)


def measure_kernel_cost(h: int, i: int, bits: int, group_size: int, threads: int, repeats: int, prefill_tokens: int,
                        evictor: CacheEvictor, seed: int, library: Path, per_token: bool = True
                        ) -> dict[str, list[float]]:
    """The kernel layout's samples (:data:`KERNEL_FIELDS`, ms; prefill per token unless ``per_token`` is False)
    of one expert: :func:`build_kernel_model` with every row routed to the expert (cold) and to the expert the
    node does not hold (warm: the node's fixed part)."""
    rng = np.random.default_rng(seed + 1)
    x1 = rng.standard_normal((1, h), dtype=np.float32)
    xp = rng.standard_normal((prefill_tokens, h), dtype=np.float32)

    def feed(x: np.ndarray, expert: int) -> dict[str, np.ndarray]:
        m = len(x)
        return {"x": x, "top_i": np.full((m, 1), expert, np.int64), "top_w": np.ones((m, 1), np.float32)}

    feeds = {"decode": feed(x1, 0), "prefill": feed(xp, 0), "fixed_decode": feed(x1, 1), "fixed_prefill": feed(xp, 1)}
    sess = make_session(build_kernel_model(h, i, bits, group_size, seed), threads, library)
    samples = _time_model(sess, feeds, repeats, evictor, {
        "kernel_decode": ("decode", True), "kernel_prefill": ("prefill", True),
        "kernel_fixed_decode": ("fixed_decode", False), "kernel_fixed_prefill": ("fixed_prefill", False)})
    if per_token:
        samples = {k: [ms / prefill_tokens for ms in v] if "prefill" in k else v for k, v in samples.items()}
    return samples


def kernel_cache_key(h: int, i: int, bits: int, group_size: int, threads: int, prefill_tokens: int,
                     evict_bytes: int, kernel: Mapping[str, Any]) -> dict[str, Any]:
    """Everything that changes a kernel measurement: :func:`cache_key`'s fields, the kernel benchmark's version
    and the library's build and path (:func:`kernel_library`)."""
    return {**cache_key(h, i, bits, group_size, threads, prefill_tokens, evict_bytes), "layout": "mixed_moe",
            "kernel_bench_version": KERNEL_BENCH_VERSION, "kernel_build": kernel["build"],
            "kernel_path": kernel["path"], "kernel_pool": kernel["pool"]}


def cache_key(h: int, i: int, bits: int, group_size: int, threads: int, prefill_tokens: int,
              evict_bytes: int, scale_dtype: str = SCALE_DTYPE) -> dict[str, Any]:
    """Everything that changes an ort-cpu measurement (the disk-cache key)."""
    return {"target": TARGET, "bench_version": BENCH_VERSION, "cpu": cpu_model(), "threads": threads,
            "onnxruntime": _ort().__version__, "group_size": group_size if bits != 16 else 0,
            "h": h, "i": i, "bits": bits, "accuracy_level": ACCURACY_LEVEL, "prefill_tokens": prefill_tokens,
            "scale_dtype": scale_dtype if bits != 16 else None,
            "evict_mib": evict_bytes >> 20}


def _check_request(bits: Sequence[int], group_size: int, repeats: int) -> None:
    for b in bits:
        _check_bits(b)
    if any(b != 16 for b in bits) and (group_size < 16 or group_size & (group_size - 1)):
        raise CostError(f"group size must be a power of two >= 16 for MatMulNBits, got {group_size}")
    if repeats < 1:
        raise CostError(f"repeats must be >= 1, got {repeats}")


def measure_shapes(shapes: Iterable[tuple[int, int]], bits: Sequence[int] = ORT_CPU_BITS,
                   group_size: int = DEFAULT_GROUP_SIZE, threads: int | None = None, repeats: int = DEFAULT_REPEATS,
                   cache: bool = True, progress: bool = True, prefill_tokens: int = PREFILL_TOKENS,
                   evict_bytes: int | None = None, cache_dir: Path | None = None, scale_dtype: str = SCALE_DTYPE,
                   kernel: bool = True, refresh: bool = False) -> dict[tuple[int, int], dict[int, ExpertMeasurement]]:
    """Measure (or read from the disk cache) every shape at every bit-width.

    Args:
        shapes: Expert shapes ``(H, I)``; duplicates are measured once.
        bits: Bit-widths, a subset of :data:`ORT_CPU_BITS`.
        group_size: MatMulNBits block size (power of two >= 16).
        threads: Intra-op threads; default all CPUs this process may use.
        repeats: Timed runs behind each median.
        cache: Read cached entries (no measuring) and store new ones; False measures everything
            and touches no cache.
        refresh: With ``cache``: measure everything again and replace the cached entries (the way out
            of a measurement a noisy moment spoiled: cached entries are otherwise kept for good).
        progress: Show a progress bar on stderr.
        prefill_tokens: Rows of the prefill input.
        evict_bytes: Cache-flush buffer size; default :func:`default_evict_bytes`.
        cache_dir: Cache root; default :func:`dmpq_compile.backends.cost.cost_cache_dir`.
        scale_dtype: MatMulNBits scales (and so activations) as the emitter will store them.
        kernel: Also measure the kernel layout (``--dispatch kernel``) where it takes the width, building
            dmpq's kernel library if needed; where it cannot be built, a warning says why and the
            measurements have no kernel samples.

    Returns:
        ``{(H, I): {bits: ExpertMeasurement}}``.

    Raises:
        CostError: For unsupported bits, a bad group size or repeats < 1.
    """
    bits = tuple(bits)
    _check_request(bits, group_size, repeats)
    threads = threads or available_cpus()
    evict_bytes = evict_bytes or default_evict_bytes()
    store = CostCache(cache_dir) if cache else None
    todo = [(s, b) for s in sorted(set(shapes)) for b in bits]
    library, kernel_id = None, {}
    if kernel and any(kernel_joins(h, i, b, group_size, scale_dtype) for (h, i), b in todo):
        library, kernel_id = kernel_library()
        if library is None:
            log.warning("ort-cpu cost table: no kernel rows (--dispatch kernel's layout is not measured): %s",
                        kernel_id["error"])
    out: dict[tuple[int, int], dict[int, ExpertMeasurement]] = {}
    evictor: CacheEvictor | None = None
    bar = _progress(len(todo), progress)
    try:
        for (h, i), b in todo:
            key = cache_key(h, i, b, group_size, threads, prefill_tokens, evict_bytes, scale_dtype)
            hit = store.get(key) if store and not refresh else None
            if hit is not None:
                m = ExpertMeasurement.from_dict({k: v for k, v in hit.items() if k not in KERNEL_FIELDS})
            else:
                evictor = evictor or CacheEvictor(evict_bytes)
                log.info("measuring ort-cpu expert %dx%d at %d bits (%d threads)", h, i, b, threads)
                m = measure_expert_cost(h, i, b, group_size, threads, repeats, prefill_tokens, evictor,
                                        scale_dtype=scale_dtype)
                if store:
                    _store(store, key, m.to_dict())
            if library is not None and kernel_joins(h, i, b, group_size, scale_dtype):
                kkey = kernel_cache_key(h, i, b, group_size, threads, prefill_tokens, evict_bytes, kernel_id)
                samples = store.get(kkey) if store and not refresh else None
                if samples is None:
                    evictor = evictor or CacheEvictor(evict_bytes)
                    log.info("measuring ort-cpu expert %dx%d at %d bits in dmpq's MixedMoE (%d threads)", h, i, b,
                             threads)
                    samples = measure_kernel_cost(h, i, b, group_size, threads, repeats, prefill_tokens, evictor, 0,
                                                  library)
                    if store:
                        _store(store, kkey, samples)
                for name in KERNEL_FIELDS:
                    setattr(m, name, list(samples[name]))
            out.setdefault((h, i), {})[b] = m
            bar.set_postfix_str(f"{h}x{i} {b}b")
            bar.update()
    finally:
        bar.close()
    for (h, i), per_bits in out.items():
        _warn_inverted(h, i, per_bits, threads)
    return out


def _warn_inverted(h: int, i: int, per_bits: Mapping[int, ExpertMeasurement], threads: int,
                   margin: float = INVERSION_MARGIN) -> None:
    """Warn where one token's expert at 4 bits measured slower than at 8 bits (cold decode, per-expert or in
    the kernel) by more than ``margin``: it reads about half the bytes, so a run a busy moment spoiled is the
    likelier cause, and a cached entry would keep it for every later compile."""
    if 4 not in per_bits or 8 not in per_bits:
        return
    rows = per_bits[4].row(), per_bits[8].row()
    for what, (low, high) in (("per-expert", (rows[0].decode_ms, rows[1].decode_ms)),
                              ("kernel", (rows[0].kernel_decode_ms, rows[1].kernel_decode_ms))):
        if low is not None and high is not None and low > high * (1 + margin):
            log.warning("ort-cpu cost: expert %dx%d's %s decode measured %.3g ms at 4 bits against %.3g ms at 8 bits, "
                        "for about half the bytes: probably a noisy measurement. Measure it again on a quiet machine "
                        "with `dmpq-compile cost --target ort-cpu --shape %d,%d --threads %d --remeasure`", h, i, what,
                        low, high, h, i, threads)


def _store(store: CostCache, key: Mapping[str, Any], data: Mapping[str, Any]) -> None:
    """Write one measurement to the cache; a cache that cannot be written only costs a warning."""
    try:
        store.put(key, dict(data))
    except OSError as e:
        log.warning("could not write the cost cache under %s (%s); set $DMPQ_CACHE_DIR to a writable "
                    "folder to keep measurements", store.root, e)


def _progress(total: int, enabled: bool) -> Any:
    """A tqdm bar on stderr (disabled when not wanted)."""
    from tqdm import tqdm

    return tqdm(total=total, desc="ort-cpu cost", unit="kernel", disable=not enabled, leave=False)


def ort_cpu_cost_table(graph: Graph, group_size: int = DEFAULT_GROUP_SIZE, threads: int | None = None,
                       repeats: int = DEFAULT_REPEATS, cache: bool = True, progress: bool = True,
                       bits: Sequence[int] = ORT_CPU_BITS, panel: bool = False, **options: Any
                       ) -> dict[str, dict[int, ExpertCostRow]]:
    """The measured ort-cpu cost table ``{expert node id: {bits: ExpertCostRow}}``.

    Each distinct expert shape is measured once per bit-width (or read from the disk cache).

    Args:
        graph: The model; every ``expert`` node gets a row per bit-width.
        group_size: MatMulNBits block size the emitter will use.
        threads: Intra-op threads (default all CPUs); part of the cache key.
        repeats: Timed runs behind each median.
        cache: Use the disk cache (see :func:`measure_shapes`).
        progress: Show a progress bar on stderr.
        bits: Bit-widths to cost (default all of :data:`ORT_CPU_BITS`).
        panel: Price ``bytes`` and ``energy_mj`` as ``--dispatch kernel`` stores the weights (one zero point a
            group unpacked, :func:`projection_layout`), which is what its artifact holds; False: MatMulNBits'
            layout (the ``fused`` and per-expert dispatches). The latencies do not depend on it.
        **options: ``prefill_tokens``, ``evict_bytes``, ``cache_dir``, ``scale_dtype`` or ``kernel``
            (measure the kernel layout too: default True) for :func:`measure_shapes`.

    Returns:
        Rows whose ``decode_ms`` and ``prefill_ms`` are cold medians (prefill per token),
        ``bytes`` the exact initializer bytes and ``energy_mj`` the per-token estimate.
    """
    shapes = expert_shapes(graph)
    measured = measure_shapes(shapes.values(), bits, group_size, threads, repeats, cache, progress, **options)
    per_shape = {s: {b: m.row() for b, m in row.items()} for s, row in measured.items()}
    if panel:
        scales = options.get("scale_dtype", SCALE_DTYPE)
        per_shape = {(h, i): {b: replace(
            r, bytes=ort_cpu_expert_bytes(h, i, b, group_size, scales, panel=True),
            energy_mj=ort_cpu_expert_energy_mj(h, i, b, group_size, scale_dtype=scales, panel=True))
            for b, r in row.items()} for (h, i), row in per_shape.items()}
    return rows_for_graph(shapes, per_shape, bits)
