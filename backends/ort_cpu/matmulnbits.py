"""Packing stored quantized weights into ONNX Runtime ``com.microsoft.MatMulNBits`` inputs.

``MatMulNBits(A, B, scales, zero_points)`` computes ``A @ W.T`` with ``W [N, K]`` quantized in
blocks of ``block_size`` along K (ORT contrib-op schema, onnxruntime 1.32):

* ``B``: uint8 ``[N, k_blocks, block_size * bits / 8]``, codes bit-packed LSB-first inside each
  block (4-bit: low nibble first) -- exactly :func:`dmpq_compile.quant.pack_bits` of the codes
  padded to whole blocks;
* ``scales``: ``[N, k_blocks]`` in the type of ``A``. Weights quantized with float16 scales
  (ort-cpu's format) store them as float16; their products take ``A`` cast to float16 and give
  float16 out, cast back to fp32 (one Cast per distinct input, one per output), except at
  ``accuracy_level`` 0, where the scales are cast to fp32 (folded at load) and ``A`` stays fp32.
  Weights with float32 scales run on fp32 ``A`` as they are;
* ``zero_points``: uint8 ``[N, ceil(k_blocks * bits / 8)]``, packed like ``B`` (for 8 bits that
  is one uint8 per block);
* attributes ``K``, ``N``, ``bits`` (the CPU kernel accepts 2, 4 and 8; 3 fails at session
  creation), ``block_size`` (a power of two >= 16) and ``accuracy_level`` (4: the kernel may
  quantize ``A`` to int8 per block, much faster on CPU; 0: fp32 activations).

The dequantized weight is ``(q - zero) * scale``, the same ``affine-asym-v1`` formula the
reference interpreter applies to the same stored tensors.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
from onnx import TensorProto

from ...ir.graph import Node
from ...quant import QuantSpec, pack_bits, unpack_bits
from ...quant.spec import ASYM_GROUP
from ..base import BackendError
from ..onnx_lowering import Lowering

NBITS = (2, 4, 8)
ACCURACY_LEVELS = (0, 1, 2, 3, 4)


@dataclass(frozen=True)
class NBitsWeight:
    """The three MatMulNBits inputs of one ``[N, K]`` weight plus its attributes."""

    b: np.ndarray  # uint8 [N, k_blocks, blob]
    scales: np.ndarray  # float32 or float16 (the spec's scale_dtype) [N, k_blocks]
    zero_points: np.ndarray  # uint8 [N, ceil(k_blocks * bits / 8)]
    n: int
    k: int
    bits: int
    block_size: int


def check_block_size(block_size: int, where: str) -> None:
    """Raise unless ``block_size`` is a power of two >= 16 (MatMulNBits' requirement)."""
    if block_size < 16 or block_size & (block_size - 1):
        raise BackendError(f"{where}: group size {block_size} cannot run as MatMulNBits, which needs a power of "
                           "two >= 16; quantize with group_size 16, 32, 64 or 128")


def check_spec(spec: QuantSpec, where: str) -> None:
    """Raise unless ``spec``'s codes can run as MatMulNBits: 2/4/8 bits, group-wise asymmetric
    (``affine-asym-v1``, ort-cpu's declared format), a power-of-two group size >= 16."""
    if spec.bits not in NBITS:
        raise BackendError(f"{where}: {spec.bits}-bit weights cannot run on MatMulNBits (CPU supports {NBITS})")
    if spec.scheme != ASYM_GROUP:
        raise BackendError(f"{where}: {spec.bits}-bit {spec.scheme} codes cannot run as MatMulNBits (group-wise "
                           "asymmetric only); re-run the quantize pass for this target (--target ort-cpu)")
    check_block_size(spec.group_size, where)


def pack_weight(weights: Mapping[str, Any], quant: Mapping[str, Any], role: str, where: str) -> NBitsWeight:
    """Convert one role's stored tensors (see :mod:`dmpq_compile.quant.stored`) to MatMulNBits layout.

    Args:
        weights: the weight store holding the tensors named in ``quant``.
        quant: a node's ``quant`` annotation (spec + tensor keys).
        role: ``gate``, ``up`` or ``down``.
        where: node id, for error messages.

    Raises:
        BackendError: unsupported bits or group size, or missing/inconsistent stored tensors.
    """
    spec = QuantSpec.from_dict(quant["spec"])
    check_spec(spec, where)
    entry = quant["tensors"].get(role)
    if entry is None:
        raise BackendError(f"{where}: the quant annotation has no tensors for {role!r}; re-run the quantize pass")
    n, k = (int(v) for v in entry["shape"])
    bits, bs = spec.bits, spec.group_size
    blocks = -(-k // bs)
    packed = weights[entry["q"]].cpu().numpy()
    scales = weights[entry["scale"]].cpu().numpy().astype(np.float32, copy=False)
    if spec.scale_dtype == "float16":
        half = scales.astype(np.float16)
        if not np.array_equal(half.astype(np.float32), scales):
            raise BackendError(f"{where}.{role}: the spec stores float16 scales but the stored scales are not float16 "
                               "values; re-run the quantize pass")
        scales = half
    zeros = weights[entry["zero"]].cpu().numpy().astype(np.uint8, copy=False)
    if scales.shape != (n, blocks) or zeros.shape != (n, blocks):
        raise BackendError(f"{where}.{role}: scales {scales.shape} / zeros {zeros.shape} do not match "
                           f"[{n}, {blocks}] for K={k}, group {bs}; re-run the quantize pass")
    if k % bs:  # ragged K: pad the last block with its zero point, i.e. dequantized zeros
        codes = np.repeat(zeros[:, -1:], blocks * bs, axis=1)
        codes[:, :k] = unpack_bits(packed, bits, k)
        packed = pack_bits(codes, bits)
    b = np.ascontiguousarray(packed).reshape(n, blocks, bs * bits // 8)
    return NBitsWeight(b, np.ascontiguousarray(scales), pack_bits(zeros, bits), n, k, bits, bs)


class MatMulNBitsProjection:
    """Lowers quantized projections to ``MatMulNBits`` and 16-bit ones to fp32 ``MatMul``.

    Args:
        accuracy_level: MatMulNBits ``accuracy_level`` (4 = int8 activations, the fast CPU path).
    """

    def __init__(self, accuracy_level: int = 4) -> None:
        if accuracy_level not in ACCURACY_LEVELS:
            raise BackendError(f"accuracy_level must be one of {ACCURACY_LEVELS}, got {accuracy_level!r}")
        self.accuracy_level = accuracy_level
        # (id of a node list, fp32 value) -> (that list, its float16 Cast); the list is held so that its
        # id cannot be reused by a later If branch while the entry exists
        self._halves: dict[tuple[int, str], tuple[list, str]] = {}

    def __call__(self, lw: Lowering, x: str, node: Node, role: str) -> str:
        bits = node.ann.get("bits", 16)
        if bits >= 16:
            return lw.linear(x, node.params[role], hint=f"{node.id}.{role}")
        spec, (n, k), inputs = _packed_inputs(lw, node, role, flat=False)
        return self._matmul(lw, x, inputs, spec, n, k, f"{node.id}.{role}")

    def _matmul(self, lw: Lowering, x: str, inputs: list[str], spec: QuantSpec, n: int, k: int, hint: str) -> str:
        """One MatMulNBits on fp32 ``x``, fp32 out. Float16 scales: ``x`` cast to float16 (once per
        value and node list: If branches get their own) and the product cast back; at
        ``accuracy_level`` 0 (fp32 activations, the exact mode) the scales are cast to fp32
        instead, a constant ONNX Runtime folds when it loads the model."""
        half = spec.scale_dtype == "float16"
        if half and self.accuracy_level == 0:
            codes, scales, zeros = inputs
            inputs, half = [codes, lw.b.op("Cast", [scales], f"{hint}.scales", to=TensorProto.FLOAT), zeros], False
        if half:
            key = (id(lw.b.nodes), x)
            if key not in self._halves or self._halves[key][0] is not lw.b.nodes:
                self._halves[key] = (lw.b.nodes, lw.b.op("Cast", [x], f"{x}.half", to=TensorProto.FLOAT16))
            x = self._halves[key][1]
        y = lw.b.op("MatMulNBits", [x, *inputs], hint, domain="com.microsoft", K=k, N=n, bits=spec.bits,
                    block_size=spec.group_size, accuracy_level=self.accuracy_level)
        return lw.b.op("Cast", [y], hint, to=TensorProto.FLOAT) if half else y

    def gate_up(self, lw: Lowering, x: str, node: Node) -> tuple[str, str]:
        """A quantized SwiGLU's gate and up projections as one MatMulNBits of ``N = 2 I`` (their
        codes, scales and zero points stacked row-wise: MatMulNBits quantizes each output row on
        its own, so the result is exactly the two products side by side), then ``Split``. One
        kernel call instead of two per expert, on a weight twice as wide."""
        spec, (n, k), inputs = _packed_inputs(lw, node, ("gate", "up"), flat=False)
        y = self._matmul(lw, x, inputs, spec, n, k, f"{node.id}.gate_up")
        gate, up = lw.b.op("Split", [y], f"{node.id}.gate_up", n_out=2, axis=-1, num_outputs=2)
        return gate, up

    def gather(self, lw: Lowering, node: Node, ids: str) -> str:
        """Rows ``ids`` of a quantized embedding table, fp32 rows out: the same packed codes, scales
        and packed zero points as a MatMulNBits weight of the table ``[vocab, hidden]``, blocks along
        ``hidden``. At 4 and 8 bits one ``com.microsoft.GatherBlockQuantized``; at 2 bits, which that
        op does not take, standard ops unpack the gathered rows (:meth:`_unpack_rows`). Float16
        scales are cast to fp32 (a constant ONNX Runtime folds at load: the rows stay exact, and a
        lookup reads a few rows, so the wider scales cost memory, not time)."""
        spec, (_, k), inputs = _packed_inputs(lw, node, "weight", flat=True)
        if spec.bits not in LOOKUP_BITS or k % spec.group_size:
            raise BackendError(f"{node.id}: a {spec.bits}-bit table with hidden size {k} and group {spec.group_size} "
                               f"cannot be looked up ({LOOKUP_BITS} bits, whole groups only)")
        data, scales, zeros = inputs
        if spec.scale_dtype == "float16":
            scales = lw.b.op("Cast", [scales], f"{node.id}.scales", to=TensorProto.FLOAT)
        if spec.bits in GBQ_BITS:
            return lw.b.op("GatherBlockQuantized", [data, ids, scales, zeros], node.id, domain="com.microsoft",
                           gather_axis=0, quantize_axis=1, block_size=spec.group_size, bits=spec.bits)
        blocks, b = k // spec.group_size, lw.b
        codes = self._unpack_rows(lw, b.op("Gather", [data, ids], node.id, axis=0), spec.bits, node.id)
        codes = b.op("Reshape", [codes, b.const([0, 0, blocks, spec.group_size], np.int64)], node.id)
        zeros = self._unpack_rows(lw, b.op("Gather", [zeros, ids], f"{node.id}.zeros", axis=0), spec.bits, node.id)
        zeros = b.op("Slice", [b.op("Reshape", [zeros, b.const([0, 0, -1], np.int64)], node.id),
                               b.const([0], np.int64), b.const([blocks], np.int64), b.const([2], np.int64)], node.id)
        scales = b.op("Unsqueeze", [b.op("Gather", [scales, ids], f"{node.id}.scales", axis=0),
                                    b.const([-1], np.int64)], node.id)
        rows = b.op("Mul", [b.op("Sub", [b.op("Cast", [codes], node.id, to=TensorProto.FLOAT),
                                         b.op("Unsqueeze", [b.op("Cast", [zeros], node.id, to=TensorProto.FLOAT),
                                                            b.const([-1], np.int64)], node.id)], node.id),
                            scales], node.id)
        return b.op("Reshape", [rows, b.const([0, 0, k], np.int64)], node.id)

    @staticmethod
    def _unpack_rows(lw: Lowering, packed: str, bits: int, hint: str) -> str:
        """uint8 ``[B, T, n]`` of LSB-first packed ``bits``-bit codes -> uint8 ``[B, T, n, 8 / bits]``
        (code ``j`` of a byte is ``byte >> (j * bits) & (2**bits - 1)``)."""
        b = lw.b
        per = 8 // bits
        shifted = b.op("BitShift", [b.op("Unsqueeze", [packed, b.const([-1], np.int64)], hint),
                                    b.const(np.arange(per) * bits, np.uint8)], hint, direction="RIGHT")
        return b.op("BitwiseAnd", [shifted, b.const(2 ** bits - 1, np.uint8)], hint)


GBQ_BITS = (4, 8)  # GatherBlockQuantized's uint8 data (checked with onnxruntime 1.32)
UNPACK_BITS = (2,)  # unpacked with standard ops after the row Gather
LOOKUP_BITS = (*UNPACK_BITS, *GBQ_BITS)


def _packed_inputs(lw: Lowering, node: Node, role: str | tuple[str, ...], flat: bool
                   ) -> tuple[QuantSpec, tuple[int, int], list[str]]:
    """Deferred initializers (codes, scales, zero points) of ``node``'s quantized ``role`` (or of
    several roles of the same input width, stacked row-wise); codes ``[N, k_blocks, blob]``
    (MatMulNBits) or, ``flat``, ``[N, k_blocks * blob]``."""
    bits = node.ann.get("bits", 16)
    quant = node.ann.get("quant")
    if not quant or quant["spec"]["bits"] != bits:
        raise BackendError(f"node {node.id!r} is assigned {bits} bits but carries no matching packed weights "
                           "(annotation 'quant'); run the quantize pass before emitting")
    spec = QuantSpec.from_dict(quant["spec"])
    check_spec(spec, node.id)
    roles = (role,) if isinstance(role, str) else tuple(role)
    shapes = [tuple(int(v) for v in quant["tensors"][r]["shape"]) for r in roles]
    if len({k for _, k in shapes}) != 1:
        raise BackendError(f"{node.id}: {roles} have different input widths {shapes}; they cannot share a product")
    n, k = sum(s[0] for s in shapes), shapes[0][1]
    bits, bs = spec.bits, spec.group_size
    blocks = -(-k // bs)
    prefix = f"{node.id}.{'_'.join(roles)}"
    packed: dict[str, list[NBitsWeight]] = {}  # packed once, when the first of its three tensors is written

    def part(field: str):
        def make() -> np.ndarray:
            if prefix not in packed:
                packed.clear()
                packed[prefix] = [pack_weight(lw.graph.weights, quant, r, node.id) for r in roles]
            value = np.concatenate([getattr(p, field) for p in packed[prefix]], axis=0) if len(roles) > 1 \
                else getattr(packed[prefix][0], field)
            return value.reshape(n, -1) if flat and field == "b" else value
        return make

    codes = (n, blocks * bs * bits // 8) if flat else (n, blocks, bs * bits // 8)
    inputs = [lw.b.add_deferred(f"{prefix}.qweight", codes, np.uint8, part("b")),
              lw.b.add_deferred(f"{prefix}.scales", (n, blocks), np.dtype(spec.scale_dtype), part("scales")),
              lw.b.add_deferred(f"{prefix}.qzeros", (n, -(-blocks * bits // 8)), np.uint8, part("zero_points"))]
    return spec, (n, k), inputs
