"""TensorRT weight formats of the ``trt-a100`` target and the projection strategy that emits them.

TensorRT's explicit quantization is **symmetric**: ``DequantizeLinear`` zero points must be zero
(onnx-tensorrt ``docs/operators.md``, TensorRT 10.x: "DequantizeLinear | INT8, FP8, FP4, INT4 |
``x_zero_point`` must be zero"; the parser's ``QuantDequantLinearHelper`` rejects non-zero ones:
"TensorRT only supports symmetric quantization"). The target declares its formats per bit-width
(:mod:`.formats`): the ``quantize`` pass stores 4-bit experts as affine *asymmetric* group-wise
codes (``w ~ (q - z) * s``, q and z in ``[0, 2**b - 1]``, groups along K) and 8-bit experts as
symmetric per-channel codes (see :mod:`dmpq_compile.quant.rtn`); sensitivity and the reference
interpreter measured the same formats. Both are written bit for bit; the emitter refuses codes
of another format (``Backend.check_formats``). For a projection ``y = x @ W.T`` with
``W [N, K]`` (ONNX ``MatMul`` takes ``B = W.T`` of shape ``[K, N]``):

**4 bits -- INT4 block quantization, exact.** With ``c = q - 8`` in ``[-8, 7]``::

    W[n, k] = (q - z) * s = c * s[n, g(k)] + (8 - z[n, g(k)]) * s[n, g(k)]

The first term is TensorRT's INT4 weight-only format: an ``INT4`` initializer ``[K, N]`` (two
codes per byte, first in the low nibble: ONNX ``TensorProto`` INT4 packing) feeding
``DequantizeLinear(axis=0, block_size=group_size)`` with scales ``[K / group_size, N]`` (the
stored ``[N, G]`` scales transposed: ONNX opset 21 ``DequantizeLinear`` blocked quantization
requires the scale to have the input's rank with ``ceil(dim / block_size)`` on the blocked axis),
which feeds ``MatMul``'s weight input directly. The second term depends on ``k`` only through its
group, so ``x @ term2.T = GroupSum(x) @ C.T`` with ``C = (8 - z) * s`` of shape ``[N, G]`` and
``GroupSum`` = ``Reshape`` to ``[..., G, group_size]`` + ``ReduceSum``: one small dense GEMM
(``G * N`` values, 1/group_size of the weight) restores the zero points exactly. A K that is not a
multiple of the group size is zero-padded on the activation side (``Pad``); padded codes are 8
(c = 0). GPTQ/HQQ codes are kept bit for bit.

**8 bits -- INT8 per output channel, exact.** TensorRT block quantization is INT4 only
(TensorRT ``IDequantizeLayer``: "a 2-D tensor for block quantization (supported for
DataType::kINT4 only)"), so the target declares per-channel symmetric narrow-range INT8 and the
passes quantize 8-bit experts in it (scheme ``sym-channel-v1``; RTN: ``s[n] = max_k |W[n, k]| /
127``, ``c = clamp(round_half_even(W / s), -127, 127)``; GPTQ: its own codes on the same grid).
The stored codes ``c = q - 128`` are written unchanged as an ``INT8`` initializer ``[K, N]``
feeding ``DequantizeLinear(axis=1)`` with the stored scales ``[N]`` -> ``MatMul``. Activations are
not quantized (weight-only; see ``docs/trt-a100.md`` for what TensorRT documents about INT8
weight-only GEMMs).

**16 bits -- FP16 weights** (``precision="fp16"``) or FP32 (``precision="fp32"``).

Precision: with ``"fp16"`` the projection casts its input to FP16, scales are FP16 (in a strongly
typed network the ``DequantizeLinear`` output type is the scale type, parser
``QuantDequantLinearHelper``) and the ``MatMul`` runs in FP16; the result is cast back to FP32,
the dtype the backend-neutral lowering uses between ops. ``"fp32"`` keeps everything FP32 (exact
format checks). :func:`reference_weights` returns the float weights these graphs compute with, for
the reference interpreter's ``RunOptions.weight_override``.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from onnx import TensorProto

from ...ir.graph import QUANT_ROLES, Graph, Node
from ...quant import QuantSpec, pack_bits
from ...quant.stored import load_quantized
from ..base import BackendError
from .formats import TRT_WEIGHT_FORMATS

log = logging.getLogger(__name__)

PRECISIONS = ("fp16", "fp32")
INT4_OFFSET = 8  # c = q - 8 maps the stored 4-bit codes [0, 15] onto INT4's [-8, 7]
INT8_QMAX = 127  # symmetric, narrow range: codes in [-127, 127]
_FP16_TINY = float(np.finfo(np.float16).smallest_subnormal)
_FP16_MAX = float(np.finfo(np.float16).max)


def _float_dtype(precision: str) -> np.dtype:
    if precision not in PRECISIONS:
        raise BackendError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    return np.dtype(np.float16 if precision == "fp16" else np.float32)


def to_scale_dtype(scale: np.ndarray, precision: str, where: str) -> np.ndarray:
    """Scales in the network's float type; fp16 underflow is lifted to the smallest subnormal.

    TensorRT rejects non-positive scales ("Scale coefficients must all be positive", parser
    ``QuantDequantLinearHelper``), so a scale that rounds to 0 in fp16 becomes 2**-24.

    Raises:
        BackendError: A scale overflows fp16.
    """
    scale = np.asarray(scale, dtype=np.float32)
    if precision == "fp32":
        return scale
    if float(scale.max(initial=0.0)) > _FP16_MAX:
        raise BackendError(f"{where}: a quantization scale ({float(scale.max()):.3g}) overflows fp16; "
                           "emit with precision='fp32'")
    out = scale.astype(np.float16)
    tiny = out == 0
    if tiny.any():
        log.warning("%s: %d scales underflow fp16 and were raised to %.3g", where, int(tiny.sum()), _FP16_TINY)
        out[tiny] = np.float16(_FP16_TINY)
    return out


def round_to(values: np.ndarray, precision: str) -> np.ndarray:
    """``values`` rounded to the network's float type, returned as float32."""
    return np.asarray(values, dtype=np.float32).astype(_float_dtype(precision)).astype(np.float32)


def int4_initializer(name: str, codes: np.ndarray) -> TensorProto:
    """An ONNX ``INT4`` initializer from signed codes in ``[-8, 7]`` (row-major, low nibble first)."""
    codes = np.asarray(codes)
    if codes.size and (int(codes.min()) < -8 or int(codes.max()) > 7):
        raise BackendError(f"{name}: INT4 codes must lie in [-8, 7]")
    nibbles = (codes.astype(np.int16) & 0xF).astype(np.uint8).reshape(-1)
    t = TensorProto()
    t.name, t.data_type = name, TensorProto.INT4
    t.dims.extend(int(d) for d in codes.shape)
    t.raw_data = pack_bits(nibbles, 4).tobytes()
    return t


# -- numeric formats --------------------------------------------------------------------------
@dataclass(frozen=True)
class Int4Weight:
    """One projection in the exact INT4 + zero-point-correction format (see module docstring).

    Attributes:
        codes: int8 ``[Kp, N]`` in ``[-8, 7]`` (``Kp`` = K padded to whole groups).
        scale: float32 ``[G, N]`` block scales (rounded to the network precision later).
        zp_corr: float32 ``[G, N]``, ``(8 - z) * s``.
        k: Real input features; ``kp = G * block``.
        block: Group size (DequantizeLinear ``block_size``).
    """

    codes: np.ndarray
    scale: np.ndarray
    zp_corr: np.ndarray
    k: int
    block: int

    @property
    def groups(self) -> int:
        return int(self.scale.shape[0])

    @property
    def kp(self) -> int:
        return self.groups * self.block


def int4_from_stored(weights: Mapping[str, Any], quant: Mapping[str, Any], role: str, where: str) -> Int4Weight:
    """The stored 4-bit codes of one role in TensorRT's INT4 block format (exact).

    Raises:
        BackendError: Not 4-bit, an odd group size (INT4 tensors need an even element count) or
            missing tensors.
    """
    spec = QuantSpec.from_dict(quant["spec"])
    if spec.bits != 4 or spec.scheme != TRT_WEIGHT_FORMATS[4].scheme:
        raise BackendError(f"{where}.{role}: expected 4-bit {TRT_WEIGHT_FORMATS[4].scheme} stored codes, got "
                           f"{spec.bits}-bit {spec.scheme}")
    if spec.group_size < 2 or spec.group_size % 2:
        raise BackendError(f"{where}.{role}: group size {spec.group_size} is odd; TensorRT INT4 weights need an "
                           "even element count (quantize with group_size 32, 64 or 128)")
    if role not in quant.get("tensors", {}):
        raise BackendError(f"{where}: the quant annotation has no tensors for {role!r}; re-run the quantize pass")
    qt = load_quantized(weights, quant, role)
    n, k = qt.shape
    q = qt.q.numpy().astype(np.int16)  # [N, K]
    scale, zero = qt.scale.numpy().astype(np.float32), qt.zero.numpy().astype(np.float32)  # [N, G]
    groups, block = scale.shape[1], spec.group_size
    codes = np.full((n, groups * block), INT4_OFFSET, dtype=np.int16)
    codes[:, :k] = q
    codes = (codes - INT4_OFFSET).astype(np.int8)
    return Int4Weight(np.ascontiguousarray(codes.T), np.ascontiguousarray(scale.T),
                      np.ascontiguousarray(((INT4_OFFSET - zero) * scale).T), k, block)


def int4_dequantized(w: Int4Weight, precision: str) -> np.ndarray:
    """float32 ``[N, K]``: the weight the INT4 graph multiplies by, at ``precision``."""
    s = to_scale_dtype(w.scale, precision, "int4").astype(np.float32)
    main = round_to(w.codes.astype(np.float32) * np.repeat(s, w.block, axis=0), precision)
    corr = np.repeat(round_to(w.zp_corr, precision), w.block, axis=0)
    return np.ascontiguousarray((main + corr)[: w.k].T)


def int8_from_stored(weights: Mapping[str, Any], quant: Mapping[str, Any], role: str,
                     where: str) -> tuple[np.ndarray, np.ndarray]:
    """The stored 8-bit per-channel codes of one role as INT8 ``[K, N]`` and scales ``[N]`` (bit for bit).

    Raises:
        BackendError: Not the declared 8-bit format (e.g. group-wise asymmetric codes quantized
            without this target) or missing tensors.
    """
    spec, fmt = QuantSpec.from_dict(quant["spec"]), TRT_WEIGHT_FORMATS[8]
    if spec.bits != 8 or spec.scheme != fmt.scheme:
        raise BackendError(f"{where}.{role}: trt-a100 runs {fmt.describe()}, but the stored codes are "
                           f"{spec.bits}-bit {spec.scheme}; re-run the quantize pass for this target "
                           "(--target trt-a100)")
    if role not in quant.get("tensors", {}):
        raise BackendError(f"{where}: the quant annotation has no tensors for {role!r}; "
                           "re-run the quantize pass")
    qt = load_quantized(weights, quant, role)
    codes = qt.q.numpy().astype(np.int16) - qt.zero.numpy().astype(np.int16)  # [N, K] in [-127, 127]
    if codes.size and int(np.abs(codes).max()) > INT8_QMAX:
        raise BackendError(f"{where}.{role}: stored INT8 codes leave [-{INT8_QMAX}, {INT8_QMAX}]")
    return np.ascontiguousarray(codes.astype(np.int8).T), qt.scale.numpy().astype(np.float32)[:, 0]


def int8_dequantized(codes: np.ndarray, scale: np.ndarray, precision: str) -> np.ndarray:
    """float32 ``[N, K]`` the INT8 graph multiplies by."""
    s = to_scale_dtype(scale, precision, "int8").astype(np.float32)
    return np.ascontiguousarray(round_to(codes.astype(np.float32) * s[None, :], precision).T)


def node_bits(node: Node) -> int:
    return int(node.ann.get("bits", 16))


def _stored_quant(node: Node, bits: int) -> Mapping[str, Any]:
    quant = node.ann.get("quant")
    if not quant or quant["spec"]["bits"] != bits:
        raise BackendError(f"node {node.id!r} is assigned {bits} bits but carries no matching packed weights "
                           "(annotation 'quant'); run the quantize pass before emitting")
    return quant


def reference_weights(graph: Graph, precision: str = "fp16",
                      keep_fp32: frozenset[str] = frozenset()) -> dict[str, dict[str, torch.Tensor]]:
    """``RunOptions.weight_override`` making the reference interpreter use the emitted weights.

    Every quantized projection (experts, and the non-expert weights the ``precision`` policy gave
    4 or 8 bits) gets the float weights its TensorRT format dequantizes to; with
    ``precision="fp16"`` every other matrix weight (attention, embeddings, lm_head, shared
    experts, except the keys in ``keep_fp32``: the routers) is rounded to fp16 as emitted.
    Remaining differences to the ONNX graph are activation roundings only.

    Returns:
        ``{node id: {role: float32 tensor}}`` (weights in the IR's ``[out, in]`` layout).
    """
    _float_dtype(precision)
    out: dict[str, dict[str, torch.Tensor]] = {}
    for node in graph.nodes():
        roles: dict[str, torch.Tensor] = {}
        quantizable = QUANT_ROLES.get(node.kind, ())
        bits = node_bits(node) if quantizable else 16
        for role, key in node.params.items():
            if role in quantizable and bits == 4:
                w4 = int4_from_stored(graph.weights, _stored_quant(node, 4), role, node.id)
                roles[role] = torch.from_numpy(int4_dequantized(w4, precision))
            elif role in quantizable and bits == 8:
                codes, scale = int8_from_stored(graph.weights, _stored_quant(node, 8), role, node.id)
                roles[role] = torch.from_numpy(int8_dequantized(codes, scale, precision))
            elif precision == "fp16" and key not in keep_fp32 and graph.weights[key].dim() == 2:
                roles[role] = graph.weights[key].detach().to(torch.float16).to(torch.float32)
        if roles:
            out[node.id] = roles
    return out


# -- the projection strategy ------------------------------------------------------------------
class TrtQdqProjection:
    """Lowers expert/shared-expert/MLP projections, and attention / lm_head weights given bits by
    the ``precision`` policy, to TensorRT-parsable Q/DQ + ``MatMul``.

    Plugs into :func:`dmpq_compile.backends.onnx_lowering.lower` as its ``projection``.

    Args:
        precision: ``"fp16"`` (FP16 GEMMs, FP32 between ops) or ``"fp32"``.
    """

    def __init__(self, precision: str = "fp16") -> None:
        self.dtype = _float_dtype(precision)
        self.precision = precision
        self._lw: Any = None
        self._casts: dict[str, str] = {}  # activation -> its fp16 cast, within one lowering
        self.formats: dict[str, str] = {}  # "node.role" -> format name, for the manifest

    @property
    def onnx_float(self) -> int:
        return TensorProto.FLOAT16 if self.precision == "fp16" else TensorProto.FLOAT

    def _cast_in(self, lw: Any, x: str) -> str:
        if self.precision == "fp32":
            return x
        if lw is not self._lw:
            self._lw, self._casts = lw, {}
        if x not in self._casts:
            self._casts[x] = lw.b.op("Cast", [x], f"{x}.fp16", to=TensorProto.FLOAT16)
        return self._casts[x]

    def _cast_out(self, lw: Any, y: str, hint: str) -> str:
        return y if self.precision == "fp32" else lw.b.op("Cast", [y], hint, to=TensorProto.FLOAT)

    def __call__(self, lw: Any, x: str, node: Node, role: str) -> str:
        bits, prefix = node_bits(node), f"{node.id}.{role}"
        if bits == 16:
            self.formats[prefix] = f"{self.precision}"
            key = node.params[role]
            w = lw.graph.weights[key].detach().to(torch.float32).cpu().numpy().T.astype(self.dtype)
            b = lw.b.add_initializer(f"{key}.T.{self.precision}", np.ascontiguousarray(w))
            return self._cast_out(lw, lw.b.op("MatMul", [self._cast_in(lw, x), b], prefix), prefix)
        if bits == 8:
            return self._int8(lw, x, node, role, prefix)
        if bits == 4:
            return self._int4(lw, x, node, role, prefix)
        raise BackendError(f"node {node.id!r}: {bits}-bit weights have no TensorRT format (supported: 4, 8, 16)")

    def _int8(self, lw: Any, x: str, node: Node, role: str, prefix: str) -> str:
        codes, scale = int8_from_stored(lw.graph.weights, _stored_quant(node, 8), role, node.id)
        b = lw.b
        q = b.add_initializer(f"{prefix}.int8", codes)
        s = b.add_initializer(f"{prefix}.scale", to_scale_dtype(scale, self.precision, prefix))
        w = b.op("DequantizeLinear", [q, s], prefix, axis=1)
        self.formats[prefix] = "int8-per-channel"
        return self._cast_out(lw, b.op("MatMul", [self._cast_in(lw, x), w], prefix), prefix)

    def _int4(self, lw: Any, x: str, node: Node, role: str, prefix: str) -> str:
        w4 = int4_from_stored(lw.graph.weights, _stored_quant(node, 4), role, node.id)
        b, rank = lw.b, 2 if node.kind == "expert" else 3  # experts see flattened [n, K] tokens, others [B, T, K]
        if w4.kp != w4.k:  # ragged K: zero-pad the activations to whole groups
            pads = [0] * (2 * rank)
            pads[-1] = w4.kp - w4.k
            x = b.op("Pad", [x, b.const(pads, np.int64)], prefix, mode="constant")
        name = f"{prefix}.int4"
        if name not in b.initializers:
            b.add_proto(int4_initializer(name, w4.codes))
        s = b.add_initializer(f"{prefix}.scale", to_scale_dtype(w4.scale, self.precision, prefix))
        w = b.op("DequantizeLinear", [name, s], prefix, axis=0, block_size=w4.block)
        main = self._cast_out(lw, b.op("MatMul", [self._cast_in(lw, x), w], prefix), prefix)
        self.formats[prefix] = f"int4-block{w4.block}+zp"
        if not np.any(w4.zp_corr):
            return main
        shape = [0] * (rank - 1) + [w4.groups, w4.block]
        sums = b.op("ReduceSum", [b.op("Reshape", [x, b.const(shape, np.int64)], prefix), b.const([-1], np.int64)],
                    prefix, keepdims=0)  # [..., G] in fp32
        c = b.add_initializer(f"{prefix}.zp_corr", w4.zp_corr.astype(self.dtype))
        corr = self._cast_out(lw, b.op("MatMul", [self._cast_in(lw, sums), c], prefix), prefix)
        return b.op("Add", [main, corr], prefix)


def emitted_formats(projection: TrtQdqProjection) -> dict[str, int]:
    """How many projections each weight format was used for (manifest summary)."""
    counts: dict[str, int] = {}
    for fmt in projection.formats.values():
        counts[fmt] = counts.get(fmt, 0) + 1
    return dict(sorted(counts.items()))

