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
from ..base import BackendError, ExpertCostRow
from ..onnx_lowering import Lowering
from .kernels import DOMAIN as KERNEL_DOMAIN

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


def pack_weight(weights: Mapping[str, Any], quant: Mapping[str, Any], role: str, where: str,
                codes: bool = True) -> NBitsWeight:
    """Convert one role's stored tensors (see :mod:`dmpq_compile.quant.stored`) to MatMulNBits layout
    (``codes=False``: scales and zero points only, ``b`` empty; the codes are the large part).

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
    if not codes:
        return NBitsWeight(np.empty((n, blocks, 0), np.uint8), np.ascontiguousarray(scales), pack_bits(zeros, bits),
                           n, k, bits, bs)
    packed = weights[entry["q"]].cpu().numpy()
    if k % bs:  # ragged K: pad the last block with its zero point, i.e. dequantized zeros
        codes = np.repeat(zeros[:, -1:], blocks * bs, axis=1)
        codes[:, :k] = unpack_bits(packed, bits, k)
        packed = pack_bits(codes, bits)
    b = np.ascontiguousarray(packed).reshape(n, blocks, bs * bits // 8)
    return NBitsWeight(b, np.ascontiguousarray(scales), pack_bits(zeros, bits), n, k, bits, bs)


def _cost_row(node: Node, target: str, bits: int) -> ExpertCostRow | None:
    """``node``'s cost-table row for ``target`` at ``bits`` (annotation keys are ints, or strings after JSON);
    fields an older table lacks take the row's defaults."""
    rows = node.ann.get("cost", {}).get(target, {})
    row = rows.get(bits, rows.get(str(bits)))
    return None if row is None else ExpertCostRow(**row)


class MatMulNBitsProjection:
    """Lowers quantized projections to ``MatMulNBits`` and 16-bit ones to fp32 ``MatMul``.

    Args:
        accuracy_level: MatMulNBits ``accuracy_level`` (4 = int8 activations, the fast CPU path).
    """

    def __init__(self, accuracy_level: int = 4, kernel: bool = False) -> None:
        if accuracy_level not in ACCURACY_LEVELS:
            raise BackendError(f"accuracy_level must be one of {ACCURACY_LEVELS}, got {accuracy_level!r}")
        self.accuracy_level = accuracy_level
        self.kernel = kernel  # quantized projections that fit its panels run as dmpq's PanelMatMul (--dispatch kernel)
        self.decisions: list[dict[str, Any]] = []  # fusion_choice's, one per layer and width group
        # (id of a node list, fp32 value) -> (that list, its float16 Cast); the list is held so that its
        # id cannot be reused by a later If branch while the entry exists
        self._halves: dict[tuple[int, str], tuple[list, str]] = {}

    def __call__(self, lw: Lowering, x: str, node: Node, role: str) -> str:
        bits = node.ann.get("bits", 16)
        if bits >= 16:
            return lw.linear(x, node.params[role], hint=f"{node.id}.{role}")
        if self.panel_fits(node, (role,)):
            return self.panel_matmul(lw, x, node, (role,))
        spec, (n, k), inputs = _packed_inputs(lw, node, role, flat=False)
        return self._matmul(lw, x, inputs, spec, n, k, f"{node.id}.{role}")

    def panel_fits(self, node: Node, roles: tuple[str, ...]) -> bool:
        """Whether ``node``'s quantized ``roles`` (stacked) run as one ``PanelMatMul``: under ``kernel``, at
        ``accuracy_level`` 0 or 4, group-wise asymmetric codes of the node's bits (``cost.panel_matmul_joins``)."""
        from .cost import panel_matmul_joins  # the rule the cost side states too

        quant, bits = node.ann.get("quant"), node.ann.get("bits", 16)
        if not self.kernel or self.accuracy_level not in (0, 4) or not quant or quant["spec"]["bits"] != bits:
            return False
        spec = QuantSpec.from_dict(quant["spec"])
        shapes = [tuple(int(v) for v in quant["tensors"][r]["shape"]) for r in roles]
        # every role whole panels (each is laid out alone, _panel_part), so the stacked rows are too
        return spec.scheme == ASYM_GROUP and len({k for _, k in shapes}) == 1 and all(
            panel_matmul_joins(n, k, bits, spec.group_size, spec.scale_dtype) for n, k in shapes)

    def panel_matmul(self, lw: Lowering, x: str, node: Node, roles: tuple[str, ...]) -> str:
        """``node``'s quantized ``roles`` (rows stacked) as one ``ai.dmpq.PanelMatMul`` on fp32 ``x``, fp32 out:
        the stored codes in MixedMoE's 16-row panels (:func:`panel_codes`), float16 scales and one zero point a
        group beside them (:func:`panel_blocks`), the same dot products as the experts' (int8 activations per
        group at level 4, fp32 at 0)."""
        quant = node.ann["quant"]
        spec = QuantSpec.from_dict(quant["spec"])
        shapes = [tuple(int(v) for v in quant["tensors"][r]["shape"]) for r in roles]
        n, k = sum(s[0] for s in shapes), shapes[0][1]
        prefix = f"{node.id}.{'_'.join(roles)}"
        inputs = []
        for field, size, dtype in (("codes", n * k * spec.bits // 8, np.uint8), ("scales", n * k // spec.group_size,
                                   np.float16), ("zeros", n * k // spec.group_size, np.uint8)):
            inputs.append(lw.b.add_deferred(f"{prefix}.panel_{field}", (size,), dtype,
                                            _panel_part(lw, node, roles, field, size, dtype)))
        return lw.b.op("PanelMatMul", [x, *inputs], prefix, domain=KERNEL_DOMAIN, K=k, N=n, bits=spec.bits,
                       block_size=spec.group_size, accuracy_level=self.accuracy_level)

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
        gate, up = self.stacked(lw, x, node, ("gate", "up"))
        return gate, up

    def stacked(self, lw: Lowering, x: str, node: Node, roles: tuple[str, ...]) -> tuple[str, ...]:
        """Several quantized projections of ``node`` that read the same input (a SwiGLU's gate and up,
        attention's q, k and v) as one MatMulNBits (``PanelMatMul`` under the kernel dispatch, where the
        rows fit its panels) over their rows stacked, then ``Split`` by their
        widths: MatMulNBits computes each output row on its own, so the results are the separate
        products exactly, for one kernel call (and one thread-pool round) instead of several."""
        hint = f"{node.id}.{'_'.join(roles)}"
        if self.panel_fits(node, roles):
            y = self.panel_matmul(lw, x, node, roles)
        else:
            spec, (n, k), inputs = _packed_inputs(lw, node, roles, flat=False)
            y = self._matmul(lw, x, inputs, spec, n, k, hint)
        widths = [int(node.ann["quant"]["tensors"][r]["shape"][0]) for r in roles]
        return tuple(lw.b.op("Split", [y, lw.b.const(widths, np.int64)], hint, n_out=len(roles), axis=-1))

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


    # -- fused experts: com.microsoft.QMoE (FusedDispatch) ----------------------------------------
    def fusable(self, lw: Lowering, node: Node) -> bool:
        """Whether routed expert ``node`` can run inside a ``QMoE`` node (:meth:`fused_moe`) with the
        result the per-expert MatMulNBits graph gives at this accuracy level.

        QMoE (onnxruntime 1.32, CPU) takes 2/4/8-bit block-wise codes whose widths are whole blocks, and
        ``accuracy_level`` 0 or 4. Measured against the per-expert graph (docs/ort-cpu.md, "Dispatch"):

        * 4 and 8 bits at level 4 (int8 activations, as MatMulNBits): the same next-token distributions
          (KL 5e-11 and 5e-14 at OLMoE and Qwen3 widths), decode 0.81-0.90x and 0.85x the time: fused;
        * 2 bits: its kernel uses a lookup table for blocks of 32 or more (~1e-2 error, KL 6-8e-5 to
          the per-expert graph, prefill 1.06-1.14x slower): per expert, except blocks of 16 at level 0;
        * level 0 (the exact mode): its 4-bit kernel keeps fp32 activations, but its 8-bit kernel uses
          int8 activations at every level: 8-bit experts stay per expert there."""
        bits, quant = node.ann.get("bits", 16), node.ann.get("quant")
        if node.kind != "expert" or bits not in NBITS or not quant or quant["spec"]["bits"] != bits:
            return False
        spec = QuantSpec.from_dict(quant["spec"])
        if spec.scheme != ASYM_GROUP or self.accuracy_level not in (0, 4):
            return False
        shapes = [tuple(int(v) for v in quant["tensors"][r]["shape"]) for r in ("gate", "up", "down")]
        if any(k % spec.group_size for _, k in shapes):
            return False
        if bits == 2:
            return self.accuracy_level == 0 and spec.group_size <= 16
        return bits == 4 or self.accuracy_level == 4

    @staticmethod
    def fusion_key(node: Node) -> tuple[Any, ...]:
        """Experts that share one QMoE node: the same bits and stored format (one width per node)."""
        spec = node.ann["quant"]["spec"]
        return (int(spec["bits"]), int(spec["group_size"]), spec.get("scale_dtype", "float32"))

    def fusion_choice(self, lw: Lowering, nodes: list[Node]) -> list[str]:
        """Which of ``nodes`` (one layer's fusable experts of one width) run in the group's QMoE.

        With the ort-cpu cost table on every node (the ``cost`` pass) and routing frequencies (``profile``),
        :func:`~dmpq_compile.passes.allocate.fusion.fused_subset` decides on the measured decode costs, the
        same rule the allocator's latency term prices; without them every node fuses (what those
        measurements gave on every shape tried, docs/ort-cpu.md). Each decision is kept in
        :attr:`decisions` for the manifest."""
        from ...passes.allocate.fusion import fused_subset
        from .cost import TARGET

        bits = int(nodes[0].ann["bits"])
        rows = [_cost_row(n, TARGET, bits) for n in nodes]
        layer = int(nodes[0].attrs.get("layer", -1))
        if any(r is None or r.fused_decode_ms is None for r in rows) or any("freq" not in n.ann for n in nodes):
            self.decisions.append({"layer": layer, "bits": bits, "experts": len(nodes), "fused": len(nodes),
                                   "basis": "no cost table"})
            return [n.id for n in nodes]
        freq = [float(n.ann["freq"]) for n in nodes]
        choice = {}
        for phase in ("decode", "prefill"):
            field = {name: [getattr(r, f"{name}{phase}_ms") for r in rows] for name in ("", "idle_", "fused_", "group_")}
            choice[phase] = fused_subset(freq, field[""], field["idle_"], field["fused_"], max(field["group_"]))
        mask = choice["decode"][0]
        self.decisions.append({
            "layer": layer, "bits": bits, "experts": len(nodes), "fused": int(mask.sum()), "basis": "cost table (decode)",
            "decode_ms": {"per_expert": choice["decode"][1], "chosen": choice["decode"][2]},
            "prefill_ms_per_token": {"per_expert": choice["prefill"][1], "fused": choice["prefill"][2]},
            "prefill_agrees": bool((choice["prefill"][0] == mask).all())})
        return [n.id for n, m in zip(nodes, mask) if m]

    def fused_moe(self, lw: Lowering, route: Any, nodes: list[Node], hint: str) -> str:
        """One ``com.microsoft.QMoE`` for ``nodes`` (one layer's experts of one bit-width): ``[N, H]`` out.

        Routing: the layer's dense weights ``[N, E]`` (its own TopK and normalization, computed once) at
        the group's columns are both ``router_probs`` (the kernel's top-``k`` choice, ``k = min(top_k,
        group size)``) and ``router_weights`` (the mixing weights), with ``normalize_routing_weights =
        0``. A token has at most ``k`` experts of the group with a positive weight; the kernel fills the
        remaining slots with zero-weight experts and skips every (token, expert) whose weight is at
        most 1e-8, so each chosen expert is computed once with exactly its weight and no other expert
        is. The weights go in scaled by 2^32 and the output comes out scaled by 2^-32 (exact in fp32),
        which moves that 1e-8 cut below any weight a softmax gives a chosen expert.

        Weights: the stored codes, byte for byte (:func:`qmoe_tensors`); the float16 scales are cast to
        fp32 (a constant ONNX Runtime folds at load), since the CPU kernel takes scales in the
        activations' type and runs on fp32 activations.
        """
        b = lw.b
        spec = QuantSpec.from_dict(nodes[0].ann["quant"]["spec"])
        ids = tuple(n.id for n in nodes)
        (inter, hidden), top_k = (int(v) for v in nodes[0].ann["quant"]["tensors"]["gate"]["shape"]), \
            int(route.node.attrs["top_k"])
        prefix = f"{route.node.id}.qmoe{spec.bits}"
        inputs = {}
        for field, shape, dtype in qmoe_layout(len(nodes), hidden, inter, spec):
            name = b.add_deferred(f"{prefix}.{field}", shape, dtype, _qmoe_part(lw, nodes, field))
            b.owners[name] = ids  # one tensor, several experts: each owns an equal share (owned_weights)
            inputs[field] = name
            if field.endswith("scales") and dtype == np.float16:
                inputs[field] = b.op("Cast", [name], f"{prefix}.{field}", to=TensorProto.FLOAT)
        experts = [int(n.attrs["expert"]) for n in nodes]
        dense = route.dense(lw, "weights")
        if experts != list(range(int(route.node.attrs["num_experts"]))):
            dense = b.op("Gather", [dense, b.const(experts, np.int64)], prefix, axis=1)
        weights = b.op("Mul", [dense, b.const(QMOE_WEIGHT_SCALE)], prefix)
        y = b.op("QMoE", [route.flat, dense, inputs["fc1"], inputs["fc1_scales"], "", inputs["fc2"],
                          inputs["fc2_scales"], "", "", "", "", inputs["fc1_zero_points"], inputs["fc2_zero_points"],
                          "", weights], prefix, domain="com.microsoft", k=min(top_k, len(nodes)),
                 **qmoe_attributes(spec.bits, spec.group_size, self.accuracy_level))
        return b.op("Mul", [y, b.const(1.0 / QMOE_WEIGHT_SCALE)], prefix)


    # -- attention over genai's KV cache: ai.dmpq.GroupQueryAttention (kernels.py) -----------------
    def attention(self, lw: Lowering, inputs: list[str], outputs: list[str], hint: str, heads: int,
                  kv_heads: int) -> bool:
        """With the kernel dispatch, dmpq's ``ai.dmpq.GroupQueryAttention`` (``csrc/gqa.h``: each KV head's rows
        read once for its whole group of query heads) for onnx_lowering's ``_attention_gqa``, on ``inputs``
        ``q, k, v, past_key, past_value, total (int64), bias`` into ``outputs`` (``out, present_key,
        present_value``); returns whether it emitted it (else onnxruntime's GroupQueryAttention runs)."""
        if not self.kernel:
            return False
        lw.b.op("GroupQueryAttention", inputs, hint, n_out=3, outputs=outputs, domain=KERNEL_DOMAIN, num_heads=heads,
                kv_num_heads=kv_heads)
        return True

    # -- all of a layer's experts in one node: ai.dmpq.MixedMoE (KernelDispatch, kernels.py) ------
    def kernel_fusable(self, lw: Lowering, node: Node) -> bool:
        """Whether routed expert ``node`` can run in dmpq's ``MixedMoE`` node: 2/4/8-bit group-wise
        asymmetric codes with float16 scales, a group size that is a multiple of 64 dividing both widths,
        at ``accuracy_level`` 0 (fp32 activations: the interpreter's sums) or 4 (int8 activations per
        group, as MatMulNBits). The others run per expert (gather-if)."""
        from .cost import kernel_joins  # the rule on widths, bits and format, which the cost table prices too

        bits, quant = node.ann.get("bits", 16), node.ann.get("quant")
        if node.kind != "expert" or bits not in NBITS or not quant or quant["spec"]["bits"] != bits:
            return False
        spec = QuantSpec.from_dict(quant["spec"])
        if spec.scheme != ASYM_GROUP or self.accuracy_level not in (0, 4):
            return False
        shapes = {r: tuple(int(v) for v in quant["tensors"][r]["shape"]) for r in ("gate", "up", "down")}
        (inter, hidden) = shapes["gate"]
        return shapes["up"] == (inter, hidden) and shapes["down"] == (hidden, inter) \
            and kernel_joins(hidden, inter, bits, spec.group_size, spec.scale_dtype)

    def mixed_moe(self, lw: Lowering, route: Any, nodes: list[Node], hint: str) -> str:
        """One ``ai.dmpq.MixedMoE`` node for ``nodes`` (one layer's kernel-fusable experts, any mix of 2, 4
        and 8 bits): ``[N, H]`` out, the routing-weighted sum of each row's experts among ``nodes``.

        It takes the layer's own top-k indices and weights (``route.top_i``, ``route.top_w``: the family's
        normalization already applied), so each expert is computed for exactly its rows with exactly its
        weight. Weights: every expert's stored codes (gate rows then up rows, then down), float16 scales and one
        zero point a group, in 16-row panels (:func:`panel_codes`: a byte permutation of the stored codes, so
        that one vector lane is one row), concatenated in expert order, with a ``[E, 8]`` table of each
        expert's bits and offsets (bits 0: not in this node)."""
        b = lw.b
        spec = QuantSpec.from_dict(nodes[0].ann["quant"]["spec"])
        gs = spec.group_size
        inter, hidden = (int(v) for v in nodes[0].ann["quant"]["tensors"]["gate"]["shape"])
        order = sorted(nodes, key=lambda n: int(n.attrs["expert"]))
        meta, offsets = mixed_moe_meta({int(n.attrs["expert"]): int(n.ann["bits"]) for n in order},
                                       int(route.node.attrs["num_experts"]), hidden, inter, gs)
        prefix = f"{route.node.id}.mixed_moe"
        ids = tuple(n.id for n in order)
        inputs = []
        for field, size, dtype in (("codes", offsets[0], np.uint8), ("scales", offsets[1], np.float16),
                                   ("zeros", offsets[2], np.uint8)):
            name = b.add_deferred(f"{prefix}.{field}", (size,), dtype, _mixed_part(lw, order, field, size, dtype))
            # one tensor, several experts (owned_weights): the codes in proportion to each expert's bits, the
            # scales and zero points (one per group at any width) in equal shares
            b.owners[name] = {n.id: int(n.ann["bits"]) for n in order} if field == "codes" else ids
            inputs.append(name)
        table = b.add_initializer(f"{prefix}.meta", meta)
        return b.op("MixedMoE", [route.flat, route.top_i, route.top_w, *inputs, table], prefix, domain=KERNEL_DOMAIN,
                    hidden=hidden, inter=inter, block_size=gs, accuracy_level=self.accuracy_level)


def mixed_moe_meta(bits: dict[int, int], experts: int, hidden: int, inter: int, block_size: int
                   ) -> tuple[np.ndarray, list[int]]:
    """``MixedMoE``'s ``[experts, 8]`` table for the experts ``{index: bits}`` in the node (in index order, the
    others 0), and the element counts of its codes, scales and zeros inputs."""
    meta = np.zeros((experts, 8), np.int64)
    offsets = [0, 0, 0]  # codes, scales, zeros
    gu, dn = 2 * inter * hidden, hidden * inter  # weights; every size below divides exactly
    for e in sorted(bits):
        row = [bits[e]]
        for i, (num, den) in enumerate(((bits[e], 8), (1, block_size), (1, block_size))):
            row += [offsets[i], offsets[i] + gu * num // den]
            offsets[i] += (gu + dn) * num // den
        meta[e] = [*row, 0]
    return meta, offsets


QMOE_WEIGHT_SCALE = 2.0 ** 32  # routing weights x this into QMoE, its output x the inverse (see fused_moe)


def qmoe_attributes(bits: int, block_size: int, accuracy_level: int) -> dict[str, Any]:
    """QMoE's attributes (all but ``k``) for plain SwiGLU ``silu(gate) * up`` on the stored block-wise codes,
    weights used as given: alpha, beta and the limit spelled out, since the CUDA defaults are gpt-oss's;
    ``weights_prepacked=1`` would select a CPU path that takes no zero points."""
    return {"activation_type": "swiglu", "swiglu_fusion": 1, "activation_alpha": 1.0, "activation_beta": 0.0,
            "swiglu_limit": float("inf"), "expert_weight_bits": bits, "block_size": block_size,
            "normalize_routing_weights": 0, "accuracy_level": accuracy_level, "weights_prepacked": 0,
            "quant_type": "int"}


def qmoe_layout(experts: int, hidden: int, inter: int, spec: QuantSpec) -> list[tuple[str, tuple[int, ...], Any]]:
    """QMoE's six weight inputs for ``experts`` SwiGLU experts ``H -> I -> H``: name, shape, dtype.
    ``fc1`` holds gate and up rows interleaved (row ``2j`` gate ``j``, ``2j + 1`` up ``j``:
    ``swiglu_fusion=1``), ``fc2`` the down projection; codes ``[E, N, K * bits / 8]`` (each row the
    MatMulNBits blocks of that row, flattened), scales ``[E, N, K / block]``, zero points packed like
    MatMulNBits' ``[E, N, ceil(K / block * bits / 8)]``."""
    bits, bs, scale = spec.bits, spec.group_size, np.dtype(spec.scale_dtype)
    out = []
    for fc, (n, k) in (("fc1", (2 * inter, hidden)), ("fc2", (hidden, inter))):
        blocks = k // bs
        out += [(fc, (experts, n, k * bits // 8), np.uint8), (f"{fc}_scales", (experts, n, blocks), scale),
                (f"{fc}_zero_points", (experts, n, -(-blocks * bits // 8)), np.uint8)]
    return out


def qmoe_tensors(packed: dict[str, NBitsWeight], field: str) -> np.ndarray:
    """One expert's slice of QMoE input ``field`` from its packed MatMulNBits roles (byte copies)."""
    part = {"": "b", "_scales": "scales", "_zero_points": "zero_points"}[field[3:]]
    rows = {role: getattr(w, part).reshape(w.n, -1) for role, w in packed.items()}
    if field.startswith("fc2"):
        return rows["down"]
    gate, up = rows["gate"], rows["up"]
    return np.stack([gate, up], axis=1).reshape(2 * gate.shape[0], gate.shape[1])


def _qmoe_part(lw: Lowering, nodes: list[Node], field: str):
    """Makes QMoE input ``field`` of ``nodes`` when the model is written, one expert at a time (the
    result is the only group-sized array held)."""
    roles = ("down",) if field.startswith("fc2") else ("gate", "up")
    codes = field in ("fc1", "fc2")  # the scales and zero points need no codes

    def make() -> np.ndarray:
        out = None
        for i, node in enumerate(nodes):
            packed = {r: pack_weight(lw.graph.weights, node.ann["quant"], r, node.id, codes) for r in roles}
            part = qmoe_tensors(packed, field)
            if out is None:
                out = np.empty((len(nodes), *part.shape), part.dtype)
            out[i] = part
        return out

    return make


PANEL = 16  # rows per panel of MixedMoE's layout


def panel_codes(codes: np.ndarray, bits: int) -> np.ndarray:
    """uint8 codes ``[N, K]`` (one code a byte) -> MixedMoE's panel layout, flat: rows in panels of 16, each
    panel in 64-byte units along K of ``32 / bits`` columns; byte ``4 i + j`` of a unit at column ``k`` holds row
    ``i``'s codes at columns ``k + 4 m + j`` (``m < 8 / bits``) in bits ``[m bits, (m + 1) bits)``. A byte
    permutation of the stored codes (:func:`unpanel_codes` inverts it)."""
    n, k = codes.shape
    per = 8 // bits
    c = codes.astype(np.uint8, copy=False).reshape(n // PANEL, PANEL, k // (4 * per), per, 4)
    units = c[:, :, :, 0, :].copy()  # combined in uint8 in row order, then moved once into panel order
    for m in range(1, per):
        units |= c[:, :, :, m, :] << np.uint8(m * bits)
    return np.ascontiguousarray(units.transpose(0, 2, 1, 3)).reshape(-1)


def panel_packed(packed: np.ndarray, bits: int, n: int, k: int) -> np.ndarray:
    """:func:`panel_codes` of the codes as stored, packed (:func:`~dmpq_compile.quant.packing.pack_bits`:
    ``[N, K bits / 8]`` bytes, LSB first), without unpacking them: a panel unit's 4 bytes of a row are the same
    ``32 / bits`` codes as 4 consecutive stored bytes, so each 32-bit word of the stored rows only moves its
    code ``4 m + j`` (bit ``bits (4 m + j)``) to byte ``j``'s bits ``m bits``, and the words move into panel
    order. Per matrix a pass per code of a 32-bit word over ``N K bits / 32`` words, where unpacking and
    repacking took a pass per code over ``N K`` bytes: 0.9 against 3.8 ms for a 2-bit 1024 x 2048 matrix."""
    per = 8 // bits
    words = np.ascontiguousarray(packed, dtype=np.uint8).view("<u4").reshape(n, k // (4 * per))
    if per > 1:
        mask, moved = np.uint32((1 << bits) - 1), np.zeros_like(words)
        for t in range(4 * per):
            m, j = divmod(t, 4)
            moved |= ((words >> np.uint32(t * bits)) & mask) << np.uint32(8 * j + m * bits)
        words = moved
    return np.ascontiguousarray(words.reshape(n // PANEL, PANEL, -1).transpose(0, 2, 1)).view(np.uint8).reshape(-1)


def unpanel_codes(flat: np.ndarray, bits: int, n: int, k: int) -> np.ndarray:
    """The inverse of :func:`panel_codes`: ``[N, K]`` codes."""
    per = 8 // bits
    units = flat.reshape(n // PANEL, k // (4 * per), PANEL, 4)
    c = np.empty((n // PANEL, PANEL, k // (4 * per), per, 4), np.uint8)
    for m in range(per):
        c[:, :, :, m, :] = ((units >> (m * bits)) & (2 ** bits - 1)).transpose(0, 2, 1, 3)
    return c.reshape(n, k)


def panel_blocks(values: np.ndarray) -> np.ndarray:
    """Per-row block values ``[N, blocks]`` (scales or zero points) -> ``[N / 16, blocks, 16]``, flat."""
    n, blocks = values.shape
    return np.ascontiguousarray(values.reshape(n // PANEL, PANEL, blocks).transpose(0, 2, 1)).reshape(-1)


def _mixed_part(lw: Lowering, nodes: list[Node], field: str, size: int, dtype: Any):
    """Makes ``MixedMoE`` input ``field`` (``codes``, ``scales`` or ``zeros``) of ``nodes`` when the model is
    written, one expert at a time: each expert's gate rows, up rows, then down rows, in panels
    (:func:`panel_codes`, :func:`panel_blocks`)."""

    def make() -> np.ndarray:
        out, at = np.empty(size, dtype), 0
        for node in nodes:
            for role in ("gate", "up", "down"):
                part = _panel_role(lw, node, role, field)
                out[at:at + part.size] = part
                at += part.size
        if at != size:
            raise BackendError(f"MixedMoE {field}: wrote {at} of {size} elements; the experts' stored tensors do not "
                               "match their annotated shapes (re-run the quantize pass)")
        return out

    return make


def _panel_role(lw: Lowering, node: Node, role: str, field: str) -> np.ndarray:
    """``node``'s stored ``role`` as one panel-layout input, flat: ``codes`` (:func:`panel_codes`), ``scales``
    (float16) or ``zeros`` (one byte a group, as stored) in :func:`panel_blocks` order."""
    quant, bits = node.ann["quant"], int(node.ann["bits"])
    entry = quant["tensors"][role]
    n, k = (int(v) for v in entry["shape"])
    if field == "codes":
        return panel_packed(lw.graph.weights[entry["q"]].cpu().numpy(), bits, n, k)
    if field == "zeros":
        return panel_blocks(lw.graph.weights[entry["zero"]].cpu().numpy().astype(np.uint8, copy=False))
    return panel_blocks(pack_weight(lw.graph.weights, quant, role, node.id, codes=False).scales)


def _panel_part(lw: Lowering, node: Node, roles: tuple[str, ...], field: str, size: int, dtype: Any):
    """Makes ``PanelMatMul`` input ``field`` of ``node``'s ``roles`` (their rows stacked) when the model is written.
    Stacking whole 16-row panels of each role is the panels of the stacked rows, so each role is laid out alone."""

    def make() -> np.ndarray:
        parts = [_panel_role(lw, node, role, field) for role in roles]
        out = parts[0] if len(parts) == 1 else np.concatenate(parts)
        if out.size != size:
            raise BackendError(f"PanelMatMul {field} of {node.id}: {out.size} elements, expected {size}; the stored "
                               "tensors do not match their annotated shapes (re-run the quantize pass)")
        return out.astype(dtype, copy=False)

    return make


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
