"""Backend-neutral lowering of the graph IR to an ONNX model (built with ``onnx.helper``).

The lowering walks the IR in execution order and applies one rule per node kind
(:data:`RULES`), so a new IR kind needs one new rule and nothing else. Two things are
pluggable because targets differ exactly there:

* a :class:`Projection` decides how a quantizable node's projection weight (``gate``/``up``/
  ``down`` of an expert, shared expert or dense MLP; ``q``/``k``/``v``/``o`` of attention and
  ``weight`` of lm_head when the ``precision`` policy gave them bits) becomes ONNX: the ORT CPU backend emits
  ``com.microsoft.MatMulNBits``, the trt-a100 backend ``DequantizeLinear`` + ``MatMul`` (``backends/trt/qdq.py``);
  :class:`FloatProjection` (fp32 ``MatMul``) is the base they fall back to for 16-bit nodes;
* a dispatch pattern (:class:`GatherDispatch`, :class:`GatherIfDispatch`, :class:`DenseDispatch`,
  or :class:`FusedDispatch`, one fused MoE op per layer and bit-width where the projection has one)
  decides how tokens reach the experts routed to them.

Graph interface (all float tensors fp32): input ``input_ids [batch, sequence]`` (int64) and per
attention layer ``past_key_values.{l}.key|value [batch, kv_heads, past_sequence, head_dim]``;
outputs ``logits [batch, sequence, vocab]`` and ``present.{l}.key|value`` (past + new). With
``LoweringOptions.logits_to_keep`` (ort-cpu) an optional scalar int64 input ``logits_to_keep``
(default 0: every position) keeps only the last N positions from the last layer's attention residual on
(:func:`keep_point`), so ``logits`` is ``[batch, min(N, sequence), vocab]``: a prefill that only needs
the next token skips T-N of the vocabulary-wide projections (the lm_head was 43 % of a 128-token prefill
at OLMoE widths) and of the last layer's MoE, as llama.cpp does. Token
positions continue from the past length, so prefill followed by one-token steps computes the
same logits as one pass over the whole sequence. Padding inside a batch is not supported: all
rows of a batch have the same length, as in the reference interpreter.

With ``LoweringOptions.genai`` (ort-cpu) the graph follows onnxruntime-genai's decoder contract
instead: an ``attention_mask [batch, total_sequence]`` input (0 marks padding, on either side),
positions counted over each row's real columns, ``com.microsoft.GroupQueryAttention`` over KV
inputs that are either the growing cache or a fixed-capacity buffer shared with ``present``, and
``logits_to_keep`` defaulting to -1 (see :func:`_keep_last`).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper

from ..ir.graph import Graph, Node
from .base import BackendError

log = logging.getLogger(__name__)

OPSET = 21
DISPATCHES = ("gather-if", "gather", "dense", "fused", "kernel")


SPILL_MIN_BYTES = 1 << 20  # initializers from this size on are spilled when the builder has a spill file


def _spilled(fd: int, offset: int, size: int, dtype: Any, dims: tuple[int, ...]) -> Callable[[], Any]:
    def read() -> Any:
        data = os.pread(fd, size, offset)
        return data if dtype is None else np.frombuffer(data, dtype=dtype).reshape(dims)
    return read


class Builder:
    """Accumulates ONNX nodes, initializers and graph I/O with unique value names.

    With ``spill`` (a binary file open for reading and writing), initializers made eagerly from
    data (``add_initializer``, ``add_proto``) of 1 MiB or more are written to it at once and
    become deferred, so a lowering holds no large tensor however many it makes.

    ``owners`` maps every initializer made inside :meth:`owned_by` to that owner (the IR node
    being lowered), shared constants (:meth:`const`) excepted: it is how the manifest knows which
    tensors hold each expert's weights without reading their names.
    """

    def __init__(self, spill: Any = None) -> None:
        self.spill = spill
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: dict[str, onnx.TensorProto] = {}
        self.inputs: list[onnx.ValueInfoProto] = []
        self.outputs: list[onnx.ValueInfoProto] = []
        self.domains: dict[str, int] = {}
        self.deferred: dict[str, Callable[[], np.ndarray]] = {}  # initializer name -> makes its data
        self.owners: dict[str, Any] = {}  # initializer name -> IR node id that made it (see owned_weights)
        self._owner: str | None = None
        self._count = 0
        self._consts: dict[tuple, str] = {}

    def fresh(self, hint: str) -> str:
        self._count += 1
        return f"{hint}_{self._count}"

    def op(self, op_type: str, inputs: list[str], hint: str, *, n_out: int = 1, outputs: list[str] | None = None,
           domain: str = "", **attrs: Any) -> Any:
        """Add one node; returns its output name (or the list of names when ``n_out > 1``)."""
        outs = outputs or [self.fresh(f"{hint}/{op_type}") for _ in range(n_out)]
        self.nodes.append(helper.make_node(op_type, inputs, outs, name=self.fresh(f"{hint}/{op_type}"),
                                           domain=domain or None, **attrs))
        if domain:
            self.domains[domain] = 1
        return outs[0] if n_out == 1 else outs

    def const(self, value: Any, dtype: Any = np.float32) -> str:
        """A (deduplicated) constant initializer holding ``value``."""
        arr = np.asarray(value, dtype=dtype)
        key = (arr.dtype.str, arr.shape, arr.tobytes())
        if key not in self._consts:
            self._consts[key] = self.add_initializer(self.fresh("const"), arr)
            self.owners.pop(self._consts[key], None)  # shared by whichever nodes need the value
        return self._consts[key]

    @contextmanager
    def owned_by(self, owner: str) -> Iterator[None]:
        """Record ``owner`` for every initializer added inside the ``with`` block (see ``owners``)."""
        saved, self._owner = self._owner, owner
        try:
            yield
        finally:
            self._owner = saved

    def _own(self, name: str) -> None:
        if self._owner is not None:
            self.owners.setdefault(name, self._owner)

    @contextmanager
    def branch(self) -> Iterator[list[onnx.NodeProto]]:
        """Collect the nodes added inside the ``with`` block into a separate list (an If branch)."""
        saved, self.nodes = self.nodes, []
        try:
            yield self.nodes
        finally:
            self.nodes = saved

    def add_initializer(self, name: str, array: np.ndarray) -> str:
        if name not in self.initializers:
            arr = np.asarray(array)  # (np.ascontiguousarray would turn a 0-d scalar into shape [1])
            self.add_proto(numpy_helper.from_array(arr if arr.flags.c_contiguous else arr.copy(), name))
        return name

    def add_proto(self, t: onnx.TensorProto) -> str:
        """Add a ready TensorProto (e.g. packed INT4); large ones are spilled (see the class doc)."""
        self.initializers[t.name] = t
        self._own(t.name)
        if self.spill is not None and len(t.raw_data) >= SPILL_MIN_BYTES:
            self.spill.seek(0, os.SEEK_END)
            offset, size = self.spill.tell(), len(t.raw_data)
            self.spill.write(t.raw_data)
            self.spill.flush()
            try:
                dtype = helper.tensor_dtype_to_np_dtype(t.data_type)
            except (KeyError, ValueError):
                dtype = None
            packed = dtype is None or np.dtype(dtype).itemsize * int(np.prod(t.dims)) != size
            t.ClearField("raw_data")
            # a fresh message: clearing a field does not free the bytes from the message's arena
            # (upb protobuf), so keeping ``t`` would keep every spilled tensor in memory after all
            small = TensorProto()
            small.CopyFrom(t)
            self.initializers[t.name] = small
            self.deferred[t.name] = _spilled(self.spill.fileno(), offset, size, None if packed else dtype,
                                             tuple(t.dims))
        return t.name

    def add_deferred(self, name: str, shape: tuple[int, ...], dtype: Any, make: Callable[[], np.ndarray]) -> str:
        """An initializer whose data ``make()`` produces only when the model is written.

        The proto holds just the name, shape and type, so a lowered model of any size takes
        little memory; :func:`backends.onnx_io.save_checked` writes the data one tensor at a time.
        """
        if name not in self.initializers:
            t = TensorProto()
            t.name = name
            t.dims.extend(int(d) for d in shape)
            t.data_type = helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
            self.initializers[name] = t
            self.deferred[name] = make
            self._own(name)
        return name

    def add_input(self, name: str, elem_type: int, shape: list[Any]) -> str:
        self.inputs.append(helper.make_tensor_value_info(name, elem_type, shape))
        return name

    def add_output(self, name: str, elem_type: int, shape: list[Any], first: bool = False) -> None:
        info = helper.make_tensor_value_info(name, elem_type, shape)
        self.outputs.insert(0, info) if first else self.outputs.append(info)

    def model(self, name: str, opset: int, doc: str = "") -> onnx.ModelProto:
        graph = helper.make_graph(self.nodes, name, self.inputs, self.outputs, list(self.initializers.values()))
        opsets = [helper.make_opsetid("", opset)] + [helper.make_opsetid(d, v) for d, v in sorted(self.domains.items())]
        model = helper.make_model(graph, opset_imports=opsets, producer_name="dmpq-compile", doc_string=doc)
        model.ir_version = min(model.ir_version, 10)
        return model


class Projection(Protocol):
    """Strategy turning ``x @ W.T`` for one projection of a quantizable node into ONNX."""

    def __call__(self, lw: Lowering, x: str, node: Node, role: str) -> str: ...


class FloatProjection:
    """fp32 ``MatMul`` with the original weights; refuses nodes that carry fewer than 16 bits."""

    def __call__(self, lw: Lowering, x: str, node: Node, role: str) -> str:
        bits = node.ann.get("bits", 16)
        if bits < 16:
            raise BackendError(f"node {node.id!r} carries {bits}-bit weights but this projection only keeps fp32 "
                               "weights; use a backend projection that handles quantized weights")
        return lw.linear(x, node.params[role], hint=f"{node.id}.{role}")


@dataclass
class RouteValue:
    """A lowered router: flattened input, top-k weights/indices and lazily built helper tensors."""

    x: str  # router input [B, T, H]
    flat: str  # [N, H]
    probs: str  # [N, E]
    top_w: str  # [N, k]
    top_i: str  # [N, k] int64
    node: Node
    cache: dict[str, str] = field(default_factory=dict)
    fused: list[Node] = field(default_factory=list)  # experts FusedDispatch leaves to the combine
    plan: set[str] | None = None  # FusedDispatch: ids of the layer's experts that run fused

    def dense(self, lw: Lowering, what: str) -> str:
        """``[N, E]``: routing weight (``"weights"``) or 1.0 (``"selected"``) at the chosen experts, else 0."""
        if what not in self.cache:
            b, h = lw.b, self.node.id
            zeros = b.op("ConstantOfShape", [b.op("Shape", [self.probs], h)], h,
                         value=helper.make_tensor("z", TensorProto.FLOAT, [1], [0.0]))
            upd = self.top_w if what == "weights" else b.op(
                "ConstantOfShape", [b.op("Shape", [self.top_w], h)], h,
                value=helper.make_tensor("one", TensorProto.FLOAT, [1], [1.0]))
            self.cache[what] = b.op("ScatterElements", [zeros, self.top_i, upd], h, axis=1)
        return self.cache[what]


@dataclass(frozen=True)
class ExpertPart:
    """One routed expert's weighted output: ``rows [n, 1]`` (None when dense) and ``y [n, H]``."""

    rows: str | None
    y: str


class GatherDispatch:
    """Each expert gathers only the tokens routed to it and scatter-adds its weighted output back.

    Per expert: ``NonZero`` on its column of the selection matrix -> ``Gather`` rows -> MLP ->
    multiply by the routing weight. The combine adds the experts into a zero buffer one after
    the other, in index order as the interpreter does: ``out = ScatterND(out, rows_e,
    GatherND(out, rows_e) + y_e)``. Each expert's rows are unique (they come from ``NonZero``),
    so no scatter ever writes one row twice. A single ``ScatterND(reduction="add")`` over all
    experts' rows would repeat rows (a token goes to k experts), and onnxruntime 1.32's CPU
    kernel races on repeated indices with more than one thread (measured: wrong logits in up
    to 40 % of runs); TensorRT does not accept ``reduction="add"`` at all.
    """

    name = "gather"

    def expert(self, lw: Lowering, route: RouteValue, node: Node) -> ExpertPart:
        b, h = lw.b, node.id
        e = b.const(node.attrs["expert"], np.int64)
        col = b.op("Gather", [route.dense(lw, "selected"), e], h, axis=1)  # [N]
        rows = b.op("Transpose", [b.op("NonZero", [col], h)], h, perm=[1, 0])  # [n, 1]
        flat_rows = b.op("Reshape", [rows, b.const([-1], np.int64)], h)
        y = lw.swiglu(b.op("Gather", [route.flat, flat_rows], h, axis=0), node)  # [n, H]
        w = b.op("Gather", [b.op("Gather", [route.dense(lw, "weights"), e], h, axis=1), rows], h, axis=0)
        return ExpertPart(rows, b.op("Mul", [y, w], h))

    def combine(self, lw: Lowering, route: RouteValue, parts: list[ExpertPart], hint: str) -> str:
        b = lw.b
        out = b.op("ConstantOfShape", [b.op("Shape", [route.flat], hint)], hint,
                   value=helper.make_tensor("z", TensorProto.FLOAT, [1], [0.0]))  # [N, H]
        for p in parts:
            acc = b.op("Add", [b.op("GatherND", [out, p.rows], hint), p.y], hint)  # [n, H]
            out = b.op("ScatterND", [out, p.rows, acc], hint)
        return out


class GatherIfDispatch(GatherDispatch):
    """:class:`GatherDispatch` with each expert's work, and its add into the output, inside an
    ``If`` on "any token routed here".

    The output buffer is threaded through the experts in order: expert ``e``'s ``If`` takes the
    buffer after expert ``e - 1`` and returns it with its rows added (then-branch) or unchanged
    (else-branch, one ``Identity``). An idle expert therefore costs three small nodes (a
    ``Gather`` of its flag, the ``If``, the ``Identity``) instead of about a dozen, and no
    ``GatherND``/``Add``/``ScatterND`` on empty rows; at decode (one token, ``k`` of ``E`` experts
    busy) that is most of them. The sum is the same, in the same expert order, as
    :meth:`GatherDispatch.combine`. The projection's nodes land inside the branch, so a
    projection must not reuse a value it built for another node (initializers are fine: they
    live in the outer graph).
    """

    name = "gather-if"

    def expert(self, lw: Lowering, route: RouteValue, node: Node) -> ExpertPart:
        b, h = lw.b, node.id
        selected, _ = route.dense(lw, "selected"), route.dense(lw, "weights")  # built outside the branches
        if "active" not in route.cache:
            counts = b.op("ReduceSum", [selected, b.const([0], np.int64)], route.node.id, keepdims=0)  # [E]
            route.cache["active"] = b.op("Greater", [counts, b.const(0.0)], route.node.id)
            route.cache["acc"] = b.op("ConstantOfShape", [b.op("Shape", [route.flat], route.node.id)], route.node.id,
                                      value=helper.make_tensor("z", TensorProto.FLOAT, [1], [0.0]))  # [N, H]
        cond = b.op("Gather", [route.cache["active"], b.const(node.attrs["expert"], np.int64)], h, axis=0)
        acc = route.cache["acc"]
        with b.branch() as then_nodes:
            part = super().expert(lw, route, node)
            added = b.op("ScatterND", [acc, part.rows, b.op("Add", [b.op("GatherND", [acc, part.rows], h), part.y], h)],
                         h)
        with b.branch() as else_nodes:
            kept = b.op("Identity", [acc], h)
        branches = {key: helper.make_graph(nodes, f"{h}.{key}", [], [helper.make_tensor_value_info(
                        out, TensorProto.FLOAT, None)])
                    for key, nodes, out in (("then_branch", then_nodes, added), ("else_branch", else_nodes, kept))}
        route.cache["acc"] = b.op("If", [cond], h, **branches)
        return ExpertPart(None, route.cache["acc"])

    def combine(self, lw: Lowering, route: RouteValue, parts: list[ExpertPart], hint: str) -> str:
        """The buffer after the last expert (each expert's ``If`` already added its rows)."""
        return route.cache["acc"]


class DenseDispatch:
    """Every expert computes every token; outputs are weighted by the dense ``[N, E]`` routing
    matrix (zero where not routed) and summed. No data-dependent shapes, E/k times the FLOPs."""

    name = "dense"

    def expert(self, lw: Lowering, route: RouteValue, node: Node) -> ExpertPart:
        b, h = lw.b, node.id
        w = b.op("Gather", [route.dense(lw, "weights"), b.const([node.attrs["expert"]], np.int64)], h, axis=1)
        return ExpertPart(None, b.op("Mul", [lw.swiglu(route.flat, node), w], h))  # [N, H] * [N, 1]

    def combine(self, lw: Lowering, route: RouteValue, parts: list[ExpertPart], hint: str) -> str:
        return lw.b.op("Sum", [p.y for p in parts], hint) if len(parts) > 1 else parts[0].y


class FusedDispatch(GatherIfDispatch):
    """Each layer's experts of one bit-width run as one fused MoE op of the target (ort-cpu:
    ``com.microsoft.QMoE``), the others (16-bit, shapes or modes the op does not serve exactly) as
    :class:`GatherIfDispatch`.

    The projection decides: ``fusable(lw, node)`` says whether an expert can join a fused op,
    ``fusion_key(node)`` which experts share one (same bits and format), and ``fused_moe(lw, route,
    nodes, hint)`` emits the op for a group, fed the layer's one routing (``RouteValue.dense``): each
    expert gets exactly its routing weight. The combine adds the fused groups' outputs to the
    gather-if buffer (fp32 sums in another order than the interpreter's: ~1e-7 relative).
    """

    name = "fused"

    def expert(self, lw: Lowering, route: RouteValue, node: Node) -> ExpertPart:
        if route.plan is None:
            route.plan = self._plan(lw, route)
        if node.id in route.plan:
            route.fused.append(node)
            return ExpertPart(None, "")
        return super().expert(lw, route, node)

    @staticmethod
    def _plan(lw: Lowering, route: RouteValue) -> set[str]:
        """The ids of the layer's experts that run fused: per fusion group, the projection's
        ``fusion_choice`` (measured costs) where it has one, else every fusable expert."""
        fusable = getattr(lw.projection, "fusable", None)
        if fusable is None:
            return set()
        groups: dict[Any, list[Node]] = {}
        for node in lw.graph.consumers(route.node.id, kind="expert"):
            if fusable(lw, node):
                groups.setdefault(lw.projection.fusion_key(node), []).append(node)
        choose = getattr(lw.projection, "fusion_choice", None)
        plan: set[str] = set()
        for key in sorted(groups, key=str):
            nodes = groups[key]
            plan |= set(choose(lw, nodes)) if choose is not None else {n.id for n in nodes}
        return plan

    def combine(self, lw: Lowering, route: RouteValue, parts: list[ExpertPart], hint: str) -> str:
        outs = ([route.cache["acc"]] if "acc" in route.cache else []) + self._fused_outputs(lw, route, hint)
        return outs[0] if len(outs) == 1 else lw.b.op("Sum", outs, hint)

    def _fused_outputs(self, lw: Lowering, route: RouteValue, hint: str) -> list[str]:
        """The fused ops' outputs for ``route.fused``: one per fusion group (width and format)."""
        groups: dict[Any, list[Node]] = {}
        for node in route.fused:
            groups.setdefault(lw.projection.fusion_key(node), []).append(node)
        return [lw.projection.fused_moe(lw, route, groups[key], hint) for key in sorted(groups, key=str)]


class KernelDispatch(FusedDispatch):
    """All of a layer's experts the target's kernel takes (ort-cpu: dmpq's ``ai.dmpq.MixedMoE``, any mix of
    2, 4 and 8 bits) run as one node, fed the layer's one routing (``RouteValue.top_i`` / ``top_w``); the
    others as :class:`GatherIfDispatch`. The projection decides: ``kernel_fusable(lw, node)`` and
    ``mixed_moe(lw, route, nodes, hint)``. The combine (:class:`FusedDispatch`'s) adds the node's output to the
    gather-if buffer."""

    name = "kernel"

    @staticmethod
    def _plan(lw: Lowering, route: RouteValue) -> set[str]:
        fusable = getattr(lw.projection, "kernel_fusable", None)
        if fusable is None:  # a projection without a MoE kernel (fp32 MatMul): every expert per expert
            return set()
        return {n.id for n in lw.graph.consumers(route.node.id, kind="expert") if fusable(lw, n)}

    def _fused_outputs(self, lw: Lowering, route: RouteValue, hint: str) -> list[str]:
        """One node for every fused expert, whatever its width."""
        return [lw.projection.mixed_moe(lw, route, route.fused, hint)] if route.fused else []


DISPATCH_CLASSES = {"gather-if": GatherIfDispatch, "gather": GatherDispatch, "dense": DenseDispatch,
                    "fused": FusedDispatch, "kernel": KernelDispatch}


@dataclass(frozen=True)
class LoweringOptions:
    """How to lower: the dispatch pattern, the ONNX opset, whether the graph takes ``logits_to_keep``, and
    whether it follows onnxruntime-genai's decoder contract (``genai``: an ``attention_mask`` input,
    ``com.microsoft.GroupQueryAttention`` over a KV buffer that may be shared between past and present,
    and ``logits_to_keep`` defaulting to -1: each row's last real token, spread into the full logits
    shape genai binds; see :func:`_attention_gqa` and :func:`_keep_last`)."""

    dispatch: str = "gather"
    opset: int = OPSET
    logits_to_keep: bool = False
    genai: bool = False

    def __post_init__(self) -> None:
        if self.genai and not self.logits_to_keep:
            object.__setattr__(self, "logits_to_keep", True)  # the genai contract includes it (default -1)
        if self.dispatch not in DISPATCH_CLASSES:
            raise BackendError(f"unknown dispatch {self.dispatch!r}; choose one of {DISPATCHES}")
        if self.opset < 18:
            raise BackendError(f"opset {self.opset} is too old: the lowering needs opset >= 18 "
                               "(ReduceMean with axes as input, ScatterND reduction)")


@dataclass(frozen=True)
class KVSpec:
    """Names and shape of one layer's KV cache tensors."""

    layer: int
    past_key: str
    past_value: str
    present_key: str
    present_value: str
    num_kv_heads: int
    head_dim: int


@dataclass
class Lowered:
    """A lowered model plus its interface description (for manifests and runtimes)."""

    model: onnx.ModelProto
    input_ids: str
    logits: str
    kv_cache: list[KVSpec]
    dispatch: str
    logits_to_keep: str | None = None  # name of the optional input (LoweringOptions.logits_to_keep)
    attention_mask: str | None = None  # name of the [batch, total_sequence] input (LoweringOptions.genai)
    deferred: dict[str, Callable[[], np.ndarray]] = field(default_factory=dict)  # see Builder.add_deferred
    # initializer -> IR node id, or the experts a fused op's stacked tensor holds (Builder.owners, owned_weights)
    owners: dict[str, Any] = field(default_factory=dict)


def lower(graph: Graph, projection: Projection | None = None, options: LoweringOptions | None = None,
          defer: bool = False, spill: Any = None) -> Lowered:
    """Lower ``graph`` to ONNX with ``projection`` for quantizable weights (fp32 MatMul by default).

    With ``defer`` the returned model holds no weight data: ``Lowered.deferred`` makes it when
    the model is written (``backends.onnx_io.save_checked``), one tensor at a time, which is
    what emitters do; without it every initializer carries its data (small models, tests).
    ``spill``: a temporary binary file for initializers a projection makes eagerly (see
    :class:`Builder`); it must stay open until the model is written.
    """
    lowered = Lowering(graph, projection or FloatProjection(), options or LoweringOptions(), spill).run()
    if not defer:
        for t in lowered.model.graph.initializer:
            if t.name in lowered.deferred:
                arr = lowered.deferred.pop(t.name)()
                t.raw_data = arr if isinstance(arr, bytes) else \
                    np.ascontiguousarray(arr, dtype=helper.tensor_dtype_to_np_dtype(t.data_type)).tobytes()
    return lowered


class Lowering:
    """State of one lowering: the builder, node values and shared tensors (positions, masks)."""

    def __init__(self, graph: Graph, projection: Projection, options: LoweringOptions, spill: Any = None) -> None:
        self.graph, self.projection, self.options = graph, projection, options
        self.dispatch = DISPATCH_CLASSES[options.dispatch]()
        self.b = Builder(spill)
        self.values: dict[str, Any] = {}
        self.kv: list[KVSpec] = []
        self.shared: dict[Any, str] = {}  # positions, masks, rope tables (keyed by what they depend on)
        self.ids = ""
        self.genai = options.genai

    def run(self) -> Lowered:
        keep_at = keep_point(self.graph) if self.options.logits_to_keep else None
        for node in self.graph.nodes():
            rule = RULES.get(node.kind)
            if rule is None:
                raise BackendError(f"node {node.id!r}: no ONNX lowering for IR kind {node.kind!r}; "
                                   f"known kinds: {sorted(RULES)}")
            with self.b.owned_by(node.id):
                value = rule(self, node, *[self.values[i] for i in node.inputs])
                if node.id == keep_at:  # every node from here to the head works row by row: drop the rest now
                    self.shared["rows"] = value
                    value = _keep_last(self, value, node.id)
                self.values[node.id] = value
        heads = [n for n in self.graph.nodes("lm_head")]
        if len(heads) != 1:
            raise BackendError(f"the graph needs exactly one lm_head node, found {len(heads)}")
        meta = self.graph.meta
        doc = f"{meta.get('family', '?')} model lowered by dmpq-compile (dispatch={self.dispatch.name})"
        model = self.b.model(f"dmpq_{meta.get('family', 'model')}", self.options.opset, doc)
        onnx.helper.set_model_props(model, {"family": str(meta.get("family")), "dispatch": self.dispatch.name})
        return Lowered(model, self.ids, "logits", self.kv, self.dispatch.name, self.shared.get("logits_to_keep"),
                       self.shared.get("attention_mask"), self.b.deferred, self.b.owners)

    # -- weights and linear layers -------------------------------------------------------------
    def weight(self, key: str, transpose: bool = False) -> str:
        """The fp32 initializer of store weight ``key`` (``[K, N]`` when ``transpose``), added once."""
        name = f"{key}.T" if transpose else key
        shape = self.graph.weights.shape(key)
        store = self.graph.weights

        def make() -> np.ndarray:
            arr = store[key].detach().to(torch.float32).cpu().numpy()
            return np.ascontiguousarray(arr.T) if transpose else arr

        return self.b.add_deferred(name, tuple(reversed(shape)) if transpose else shape, np.float32, make)

    def project(self, x: str, node: Node, role: str, bias: str | None = None) -> str:
        """A linear weight of a non-expert node (attention, lm_head): the projection when the
        ``precision`` policy gave the node fewer than 16 bits, else the fp32 ``MatMul`` of :meth:`linear`."""
        if node.ann.get("bits", 16) >= 16:
            return self.linear(x, node.params[role], bias, hint=f"{node.id}.{role}")
        y = self.projection(self, x, node, role)
        return self.b.op("Add", [y, self.weight(bias)], f"{node.id}.{role}") if bias else y

    def linear(self, x: str, key: str, bias: str | None = None, hint: str = "linear") -> str:
        """``x @ W.T (+ b)`` with ``W [N, K]`` from the weight store, as an fp32 MatMul."""
        y = self.b.op("MatMul", [x, self.weight(key, transpose=True)], hint)
        return self.b.op("Add", [y, self.weight(bias)], hint) if bias else y

    def swiglu(self, x: str, node: Node) -> str:
        fused = getattr(self.projection, "gate_up", None)  # one product for both, where the target has one
        if fused is not None and node.ann.get("bits", 16) < 16:
            gate, up = fused(self, x, node)
        else:
            gate = self.projection(self, x, node, "gate")
            up = self.projection(self, x, node, "up")
        act = self.b.op("Mul", [self.b.op("Mul", [gate, self.b.op("Sigmoid", [gate], node.id)], node.id), up],
                        node.id)
        return self.projection(self, act, node, "down")

    def rms_norm(self, x: str, key: str, eps: float, hint: str) -> str:
        b = self.b
        ms = b.op("ReduceMean", [b.op("Pow", [x, b.const(2.0)], hint), b.const([-1], np.int64)], hint, keepdims=1)
        normed = b.op("Div", [x, b.op("Sqrt", [b.op("Add", [ms, b.const(eps)], hint)], hint)], hint)
        return b.op("Mul", [self.weight(key), normed], hint)

    # -- positions, masks, rotary tables (shared by all layers) --------------------------------
    def _lengths(self) -> tuple[str, str]:
        """Scalars ``past`` (cached tokens) and ``total`` (past + new), int64."""
        if "past" not in self.shared:
            b = self.b
            new = b.op("Squeeze", [b.op("Shape", [self.ids], "pos", start=1, end=2)], "pos")
            if self.genai:  # the mask spans past + new; a shared KV buffer's length is its capacity, not the past
                total = b.op("Squeeze", [b.op("Shape", [self.shared["attention_mask"]], "pos", start=1, end=2)], "pos")
                self.shared["past"], self.shared["total"] = b.op("Sub", [total, new], "pos"), total
            else:
                past = b.op("Squeeze", [b.op("Shape", [self.kv[0].past_key], "pos", start=2, end=3)], "pos")
                self.shared["past"], self.shared["total"] = past, b.op("Add", [past, new], "pos")
        return self.shared["past"], self.shared["total"]

    def row_positions(self) -> tuple[str, str]:
        """genai contract: positions of every column of the mask ``[B, total]`` and of the new tokens
        ``[B, T]`` (int64), counted over the columns the mask marks real (``cumsum(mask) - 1``, 0 before a
        row's first real token), so left and right padding leave each row's positions as if it were alone."""
        if "row_positions" not in self.shared:
            b = self.b
            past, total = self._lengths()
            mask = self.shared["attention_mask"]
            count = b.op("CumSum", [mask, b.const(1, np.int64)], "pos")
            every = b.op("Max", [b.op("Sub", [count, b.const(1, np.int64)], "pos"), b.const(0, np.int64)], "pos")
            new = b.op("Slice", [every, b.op("Unsqueeze", [past, b.const([0], np.int64)], "pos"),
                                 b.op("Unsqueeze", [total, b.const([0], np.int64)], "pos"), b.const([1], np.int64)],
                       "pos")
            self.shared["row_positions"] = (every, new)
        return self.shared["row_positions"]

    def positions(self) -> str:
        """Absolute positions of the new tokens ``[T]`` (int64): ``past .. past + T - 1``."""
        if "positions" not in self.shared:
            past, total = self._lengths()
            self.shared["positions"] = self.b.op("Range", [past, total, self.b.const(1, np.int64)], "pos")
        return self.shared["positions"]

    def mask(self, window: int | None) -> str:
        """Additive attention bias ``[T, past + T]``: 0 where allowed (causal, in window), -inf elsewhere."""
        key = ("mask", window)
        if key not in self.shared and self.genai:
            self.shared[key] = self._bias(window)
        if key not in self.shared:
            b = self.b
            _, total = self._lengths()
            i = b.op("Unsqueeze", [self.positions(), b.const([1], np.int64)], "mask")  # [T, 1]
            j = b.op("Unsqueeze", [b.op("Range", [b.const(0, np.int64), total, b.const(1, np.int64)], "mask"),
                                   b.const([0], np.int64)], "mask")  # [1, S]
            allowed = b.op("GreaterOrEqual", [i, j], "mask")
            if window:
                near = b.op("Less", [b.op("Sub", [i, j], "mask"), b.const(int(window), np.int64)], "mask")
                allowed = b.op("And", [allowed, near], "mask")
            self.shared[key] = b.op("Where", [allowed, b.const(0.0), b.const(-np.inf)], "mask")
        return self.shared[key]

    def _bias(self, window: int | None) -> str:
        """genai contract: additive bias ``[B, 1, T, total]`` for GroupQueryAttention: 0 where row ``b``'s
        new token ``t`` may attend column ``j`` (the mask marks ``j`` real, ``j`` is not after ``t``'s column,
        and with a sliding window their positions are less than ``window`` apart), else the lowest float32.
        A finite floor, not -inf: a padding row that may attend nothing then averages padding instead of
        producing NaN, which the next layer's values would carry into real rows (0 * NaN)."""
        b = self.b
        past, total = self._lengths()
        every, new = self.row_positions()
        mask = self.shared["attention_mask"]
        cols = b.op("Range", [b.const(0, np.int64), total, b.const(1, np.int64)], "mask")  # [S]
        rows = b.op("Unsqueeze", [b.op("Range", [past, total, b.const(1, np.int64)], "mask"),
                                  b.const([1], np.int64)], "mask")  # [T, 1]
        allowed = b.op("And", [b.op("GreaterOrEqual", [rows, cols], "mask"),  # [T, S]
                               b.op("Unsqueeze", [b.op("Cast", [mask], "mask", to=TensorProto.BOOL),
                                                  b.const([1], np.int64)], "mask")], "mask")  # [B, T, S]
        if window:
            gap = b.op("Sub", [b.op("Unsqueeze", [new, b.const([2], np.int64)], "mask"),
                               b.op("Unsqueeze", [every, b.const([1], np.int64)], "mask")], "mask")
            allowed = b.op("And", [allowed, b.op("Less", [gap, b.const(int(window), np.int64)], "mask")], "mask")
        bias = b.op("Where", [allowed, b.const(0.0), b.const(np.finfo(np.float32).min)], "mask")
        return b.op("Unsqueeze", [bias, b.const([1], np.int64)], "mask")

    def rope(self, head_dim: int, theta: float) -> tuple[str, str]:
        """``cos, sin [T, head_dim]`` in the half-rotation layout of :func:`ops.rope_cos_sin`; under the genai
        contract ``[B, T, 1, head_dim]`` from each row's own positions, for ``[B, T, heads, head_dim]``."""
        key = ("rope", head_dim, theta)
        if key not in self.shared:
            b = self.b
            inv = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
            where = self.row_positions()[1] if self.genai else self.positions()
            pos = b.op("Unsqueeze", [b.op("Cast", [where], "rope", to=TensorProto.FLOAT),
                                     b.const([-1], np.int64)], "rope")
            freqs = b.op("Mul", [pos, b.const(inv.numpy()[None, :])], "rope")  # [T, hd/2]
            emb = b.op("Concat", [freqs, freqs], "rope", axis=-1)
            if self.genai:
                emb = b.op("Unsqueeze", [emb, b.const([2], np.int64)], "rope")
            self.shared[key] = b.op("Cos", [emb], "rope")
            self.shared[("sin",) + key[1:]] = b.op("Sin", [emb], "rope")
        return self.shared[key], self.shared[("sin",) + key[1:]]


def _rule_input(lw: Lowering, node: Node) -> str:
    lw.ids = lw.b.add_input("input_ids", TensorProto.INT64, ["batch", "sequence"])
    if lw.genai:
        lw.shared["attention_mask"] = lw.b.add_input("attention_mask", TensorProto.INT64, ["batch", "total_sequence"])
    return lw.ids


def _rule_embed(lw: Lowering, node: Node, ids: str) -> str:
    if node.ann.get("bits", 16) < 16:  # a quantized table: the target's lookup of its stored codes
        gather = getattr(lw.projection, "gather", None)
        if gather is None:
            raise BackendError(f"{node.id}: this target cannot look up rows of a quantized embedding table; "
                               "keep it float (--nonexpert-bits applies to it only where the target supports it)")
        return gather(lw, node, ids)
    return lw.b.op("Gather", [lw.weight(node.params["weight"]), ids], node.id, axis=0)


def _rule_norm(lw: Lowering, node: Node, x: str) -> str:
    return lw.rms_norm(x, node.params["weight"], float(node.attrs["eps"]), node.id)


def _rule_add(lw: Lowering, node: Node, a: str, b: str) -> str:
    return lw.b.op("Add", [a, b], node.id)


def _rule_router(lw: Lowering, node: Node, x: str) -> RouteValue:
    b, h, a = lw.b, node.id, node.attrs
    flat = b.op("Reshape", [x, b.const([-1, lw.graph.meta["hidden_size"]], np.int64)], h)
    probs = b.op("Softmax", [lw.linear(flat, node.params["weight"], hint=h)], h, axis=-1)
    top_w, top_i = b.op("TopK", [probs, b.const([int(a["top_k"])], np.int64)], h, n_out=2, axis=-1)
    if a["norm_topk_prob"]:
        top_w = b.op("Div", [top_w, b.op("ReduceSum", [top_w, b.const([-1], np.int64)], h, keepdims=1)], h)
    return RouteValue(x, flat, probs, top_w, top_i, node)


def _rule_expert(lw: Lowering, node: Node, x: str, route: RouteValue) -> ExpertPart:
    return lw.dispatch.expert(lw, route, node)


def _rule_shared_expert(lw: Lowering, node: Node, x: str) -> str:
    gate = lw.b.op("Sigmoid", [lw.linear(x, node.params["shared_gate"], hint=node.id)], node.id)
    return lw.b.op("Mul", [gate, lw.swiglu(x, node)], node.id)


def _rule_mlp(lw: Lowering, node: Node, x: str) -> str:
    return lw.swiglu(x, node)


def _rule_combine(lw: Lowering, node: Node, route: RouteValue, *outs: Any) -> str:
    b, h = lw.b, node.id
    parts = [o for o in outs if isinstance(o, ExpertPart)]
    out = lw.dispatch.combine(lw, route, parts, h) if parts else None
    for dense in (o for o in outs if not isinstance(o, ExpertPart)):  # shared expert, [B, T, H]
        flat = b.op("Reshape", [dense, b.const([-1, lw.graph.meta["hidden_size"]], np.int64)], h)
        out = flat if out is None else b.op("Add", [out, flat], h)
    if out is None:
        raise BackendError(f"combine {node.id!r} has no expert inputs")
    return b.op("Reshape", [out, b.op("Shape", [route.x], h)], h)


ROW_WISE = frozenset({"norm", "add", "router", "expert", "shared_expert", "mlp", "combine", "lm_head"})


def keep_point(graph: Graph) -> str | None:
    """The earliest node after which the graph only works position by position up to the head, so the
    positions ``logits_to_keep`` drops can be dropped right after it, as llama.cpp drops them before its last
    layer's feed-forward part: for the decoder families that is the last layer's attention residual, and a
    prefill of T tokens then runs that layer's MoE (or MLP) on the kept positions only (its attention, and the
    KV cache it writes, still see all T). None where the head is not the last node.

    One backward walk, linear in nodes and edges: with ``S`` the nodes after a candidate, the candidate works
    iff every node of ``S`` is row-wise (:data:`ROW_WISE`: norms, adds, routing, experts, MLPs, combine, head)
    and ``S`` reads nothing from before the candidate but the candidate itself."""
    order = list(graph.nodes())
    if not order or order[-1].kind != "lm_head":
        return None
    outside: set[str] = set()  # what the nodes after the candidate read from before it
    best = None
    for i in range(len(order) - 2, -1, -1):
        after = order[i + 1]
        if after.kind not in ROW_WISE:
            break
        outside.discard(after.id)
        outside.update(after.inputs)
        if outside <= {order[i].id} and order[i].kind in ("add", "norm"):
            best = order[i].id
    return best


def _keep_last(lw: Lowering, x: str, hint: str) -> str:
    """``x[:, T - n:]`` with ``n = logits_to_keep`` clipped to ``[1, T]``, or all T positions when it is 0.

    The input is optional: an initializer of the same name holds its default, 0 (every position). Under
    the genai contract ``n = 1`` keeps each row's last real token instead (the last new column the
    attention mask marks 1: what a right-padded row samples from), and the default is -1: the same row,
    which :func:`_spread_last` lays into the full ``[B, T, V]`` that onnxruntime-genai (which never feeds
    the input) binds. ONNX Runtime lets a caller override an initializer that is also a graph input and
    never folds it as a constant.
    """
    b = lw.b
    name = b.add_input("logits_to_keep", TensorProto.INT64, [])
    b.add_initializer(name, np.array(-1 if lw.genai else 0, np.int64))
    b.owners.pop(name, None)  # part of the interface, not the lm_head's weights
    lw.shared["logits_to_keep"] = name
    t = b.op("Shape", [x], hint, start=1, end=2)  # [1]
    keep = b.op("Reshape", [name, b.const([1], np.int64)], hint)
    if lw.genai:  # -1 (the default) keeps what 1 keeps; _spread_last lays it back into every position
        keep = b.op("Where", [b.op("Less", [keep, b.const([0], np.int64)], hint), b.const([1], np.int64), keep],
                    hint)
    n = b.op("Where", [b.op("Equal", [keep, b.const([0], np.int64)], hint), t, b.op("Min", [keep, t], hint)], hint)
    if not lw.genai:
        return b.op("Slice", [x, b.op("Sub", [t, n], hint), b.const([np.iinfo(np.int64).max], np.int64),
                              b.const([1], np.int64)], hint)
    past, total = lw._lengths()
    new_mask = b.op("Slice", [lw.shared["attention_mask"], b.op("Unsqueeze", [past, b.const([0], np.int64)], hint),
                              b.op("Unsqueeze", [total, b.const([0], np.int64)], hint), b.const([1], np.int64)], hint)
    last = b.op("ArgMax", [new_mask], hint, axis=1, keepdims=1, select_last_index=1)  # [B, 1]
    lw.shared["last_real"] = b.op("Unsqueeze", [last, b.const([2], np.int64)], hint)  # [B, 1, 1]
    span = b.op("Add", [b.op("Range", [b.const(0, np.int64), b.op("Squeeze", [n], hint), b.const(1, np.int64)], hint),
                        b.op("Sub", [t, n], hint)], hint)  # [n]: the last n columns
    index = b.op("Where", [b.op("Equal", [keep, b.const([1], np.int64)], hint), last,
                           b.op("Unsqueeze", [span, b.const([0], np.int64)], hint)], hint)  # [B, n]
    width = b.op("Shape", [x], hint, start=2, end=3)
    index = b.op("Expand", [b.op("Unsqueeze", [index, b.const([2], np.int64)], hint),
                            b.op("Concat", [b.op("Shape", [index], hint), width], hint, axis=0)], hint)
    return b.op("GatherElements", [x, index], hint, axis=1)


def _rule_lm_head(lw: Lowering, node: Node, x: str) -> str:
    b, key, h = lw.b, node.params["weight"], node.id
    vocab = int(lw.graph.weights.shape(key)[0])
    rows = lw.shared.get("rows", x)  # the full [B, T, H] stream where keep_point dropped positions earlier
    if lw.options.logits_to_keep and "rows" not in lw.shared:
        x = _keep_last(lw, x, h)
    name = [b.fresh(f"{h}/kept")] if lw.genai else ["logits"]  # genai: spread into the full shape below
    embeds = {n.params["weight"] for n in lw.graph.nodes("embed")}
    if node.ann.get("bits", 16) < 16:
        if key in embeds:
            raise BackendError(f"{h}: an lm_head tied to the embedding table cannot be quantized (the table stays "
                               "float for the row lookup); keep it at 16 bits")
        logits = b.op("Identity", [lw.project(x, node, "weight")], h, outputs=name)
    elif key in embeds:  # tied embeddings: reuse the [V, H] table through Gemm(transB=1), no transposed copy
        flat = b.op("Reshape", [x, b.const([-1, lw.graph.weights.shape(key)[1]], np.int64)], h)
        y = b.op("Gemm", [flat, lw.weight(key)], h, transB=1)
        lead = b.op("Shape", [x], h, start=0, end=-1)
        logits = b.op("Reshape", [y, b.op("Concat", [lead, b.const([vocab], np.int64)], h, axis=0)], h,
                      outputs=name)
    else:
        logits = b.op("MatMul", [x, lw.weight(key, transpose=True)], h, outputs=name)
    if lw.genai:
        logits = _spread_last(lw, rows, logits, vocab, h)
    b.add_output(logits, TensorProto.FLOAT, ["batch", "sequence", vocab], first=True)
    return logits


def _spread_last(lw: Lowering, rows: str, kept: str, vocab: int, hint: str) -> str:
    """genai contract, ``logits_to_keep = -1`` (the default): the kept logits ``[B, 1, V]`` of each row's last
    real token written into zeros of the full ``[B, T, V]``, which is the shape onnxruntime-genai binds
    (it preallocates ``[batch, new tokens, vocab]`` and reads each row's last real position). Zeros cost a
    fill of the buffer genai holds anyway; the ``T - 1`` vocabulary-wide products are skipped. Any other
    value returns the kept logits as they are."""
    b = lw.b
    keep = lw.shared["logits_to_keep"]
    with b.branch() as then_nodes:
        shape = b.op("Concat", [b.op("Shape", [rows], hint, start=0, end=2), b.const([vocab], np.int64)], hint,
                     axis=0)
        zeros = b.op("ConstantOfShape", [shape], hint, value=helper.make_tensor("z", TensorProto.FLOAT, [1], [0.0]))
        index = b.op("Expand", [lw.shared["last_real"], b.op("Shape", [kept], hint)], hint)
        spread = b.op("ScatterElements", [zeros, index, kept], hint, axis=1)
    with b.branch() as else_nodes:
        same = b.op("Identity", [kept], hint)
    branches = {key: helper.make_graph(nodes, f"{hint}.{key}", [], [helper.make_tensor_value_info(
                    out, TensorProto.FLOAT, None)])
                for key, nodes, out in (("then_branch", then_nodes, spread), ("else_branch", else_nodes, same))}
    negative = b.op("Less", [keep, b.const(0, np.int64)], hint)
    return b.op("If", [negative], hint, outputs=["logits"], **branches)


def _rule_attention(lw: Lowering, node: Node, x: str) -> str:
    """Causal GQA attention with RoPE and a KV cache (plain ONNX ops, see docs/ort-cpu.md)."""
    b, h, a, p = lw.b, node.id, node.attrs, node.params
    nh, nkv, hd, layer = int(a["num_heads"]), int(a["num_kv_heads"]), int(a["head_dim"]), int(a["layer"])
    kv = KVSpec(layer, f"past_key_values.{layer}.key", f"past_key_values.{layer}.value",
                f"present.{layer}.key", f"present.{layer}.value", nkv, hd)
    for name in (kv.past_key, kv.past_value):
        b.add_input(name, TensorProto.FLOAT, ["batch", nkv, "past_sequence", hd])
    lw.kv.append(kv)
    q, k, v = _qkv(lw, node, x)
    if a["qk_norm"] == "full":
        q, k = lw.rms_norm(q, p["q_norm"], a["eps"], h), lw.rms_norm(k, p["k_norm"], a["eps"], h)
    if a.get("clip_qkv"):  # after the full q/k norm, as OLMoE does
        lo, hi = b.const(-float(a["clip_qkv"])), b.const(float(a["clip_qkv"]))
        q, k, v = (b.op("Clip", [t, lo, hi], h) for t in (q, k, v))
    q, k, v = (b.op("Reshape", [t, b.const([0, 0, n, hd], np.int64)], h) for t, n in ((q, nh), (k, nkv), (v, nkv)))
    if a["qk_norm"] == "head":
        q, k = lw.rms_norm(q, p["q_norm"], a["eps"], h), lw.rms_norm(k, p["k_norm"], a["eps"], h)
    if lw.genai:
        return lw.project(_attention_gqa(lw, node, kv, q, k, v), node, "o", p.get("o_bias"))
    q, k, v = (b.op("Transpose", [t], h, perm=[0, 2, 1, 3]) for t in (q, k, v))  # [B, heads, T, hd]
    cos, sin = lw.rope(hd, float(a["rope_theta"]))
    q, k = _rotate(lw, q, cos, sin, h), _rotate(lw, k, cos, sin, h)
    k_all = b.op("Concat", [kv.past_key, k], h, axis=2, outputs=[kv.present_key])  # [B, nkv, S, hd]
    v_all = b.op("Concat", [kv.past_value, v], h, axis=2, outputs=[kv.present_value])
    for name in (kv.present_key, kv.present_value):
        b.add_output(name, TensorProto.FLOAT, ["batch", nkv, "total_sequence", hd])
    # GQA without copying K/V: query heads grouped [B, nkv, g, T, hd] against K/V [B, nkv, 1, S, hd]
    q5 = b.op("Reshape", [q, b.const([0, nkv, nh // nkv, -1, hd], np.int64)], h)
    k5 = b.op("Unsqueeze", [k_all, b.const([2], np.int64)], h)
    v5 = b.op("Unsqueeze", [v_all, b.const([2], np.int64)], h)
    scores = b.op("Mul", [b.op("MatMul", [q5, b.op("Transpose", [k5], h, perm=[0, 1, 2, 4, 3])], h),
                          b.const(hd ** -0.5)], h)
    probs = b.op("Softmax", [b.op("Add", [scores, lw.mask(a.get("sliding_window"))], h)], h, axis=-1)
    out = b.op("Reshape", [b.op("MatMul", [probs, v5], h), b.const([0, nh, -1, hd], np.int64)], h)
    out = b.op("Reshape", [b.op("Transpose", [out], h, perm=[0, 2, 1, 3]), b.const([0, 0, nh * hd], np.int64)], h)
    return lw.project(out, node, "o", p.get("o_bias"))


def _qkv(lw: Lowering, node: Node, x: str) -> tuple[str, str, str]:
    """The q, k and v projections: one stacked product where the target has one and the node is
    quantized (the projection's ``stacked``), else three."""
    p = node.params
    stacked = getattr(lw.projection, "stacked", None)
    if stacked is None or node.ann.get("bits", 16) >= 16:
        return tuple(lw.project(x, node, r, p.get(f"{r}_bias")) for r in "qkv")
    q, k, v = stacked(lw, x, node, ("q", "k", "v"))
    return tuple(lw.b.op("Add", [t, lw.weight(p[f"{r}_bias"])], f"{node.id}.{r}") if p.get(f"{r}_bias") else t
                 for t, r in ((q, "q"), (k, "k"), (v, "v")))


def _attention_gqa(lw: Lowering, node: Node, kv: KVSpec, q: str, k: str, v: str) -> str:
    """onnxruntime-genai's contract: ``com.microsoft.GroupQueryAttention`` on ``q, k, v [B, T, heads, hd]``
    (normed and clipped as the family does), returning the context ``[B, T, heads * hd]``.

    * RoPE is applied here, from each row's positions (:meth:`Lowering.row_positions`), not by the
      kernel (``do_rotary=0``), whose rotary takes positions from the cache length: under padding a
      row's cache length is not its position.
    * Every row of a call has the same cache length (``seqlens_k = total - 1`` for all rows,
      ``query_seqlens = T``): padding occupies cache slots like tokens and the additive bias
      (:meth:`Lowering._bias`: mask, causality, sliding window) keeps every row from attending it.
    * The KV inputs may be the growing cache (``present`` = past + T positions) or a buffer of a fixed
      capacity shared with ``present`` (genai's ``past_present_share_buffer``): the kernel writes the
      new rows at ``[past, total)`` and reads ``[0, total)``; the graph is the same for both.
    * A projection with an ``attention`` method (ort-cpu's under the kernel dispatch:
      ``ai.dmpq.GroupQueryAttention``, the same contract) may emit its own node instead; it returns
      whether it did.
    """
    b, h, a = lw.b, node.id, node.attrs
    nh, nkv, hd = int(a["num_heads"]), kv.num_kv_heads, kv.head_dim
    cos, sin = lw.rope(hd, float(a["rope_theta"]))
    q, k = _rotate(lw, q, cos, sin, h), _rotate(lw, k, cos, sin, h)
    q, k, v = (b.op("Reshape", [t, b.const([0, 0, n * hd], np.int64)], h) for t, n in ((q, nh), (k, nkv), (v, nkv)))
    bias = lw.mask(a.get("sliding_window"))
    outputs = [b.fresh(f"{h}/gqa"), kv.present_key, kv.present_value]
    own = getattr(lw.projection, "attention", None)  # the target's own op for the same contract, if it has one
    if own is not None and own(lw, [q, k, v, kv.past_key, kv.past_value, lw._lengths()[1], bias], outputs, h, nh, nkv):
        out = outputs[0]
    else:
        if "gqa_lengths" not in lw.shared:  # onnxruntime's op takes its lengths as int32, per row
            past, total = lw._lengths()
            batch = b.op("Shape", [lw.ids], "gqa", start=0, end=1)
            seqlens = b.op("Expand", [b.op("Cast", [b.op("Sub", [total, b.const(1, np.int64)], "gqa")], "gqa",
                                           to=TensorProto.INT32), batch], "gqa")
            new = b.op("Expand", [b.op("Cast", [b.op("Sub", [total, past], "gqa")], "gqa", to=TensorProto.INT32),
                                  batch], "gqa")
            lw.shared["gqa_lengths"] = (seqlens, b.op("Cast", [total], "gqa", to=TensorProto.INT32), new)
        seqlens, total32, new = lw.shared["gqa_lengths"]
        inputs = [q, k, v, kv.past_key, kv.past_value, seqlens, total32, "", "", "", bias, "", "", "", "", "", new]
        out, _, _ = b.op("GroupQueryAttention", inputs, h, n_out=3, outputs=outputs, domain="com.microsoft",
                         num_heads=nh, kv_num_heads=nkv, scale=float(hd ** -0.5))
    for name in (kv.present_key, kv.present_value):
        b.add_output(name, TensorProto.FLOAT, ["batch", nkv, "total_sequence", hd])
    return out


def _rotate(lw: Lowering, x: str, cos: str, sin: str, hint: str) -> str:
    """``x * cos + rotate_half(x) * sin`` with ``rotate_half(x) = [-x2, x1]``."""
    b = lw.b
    x1, x2 = b.op("Split", [x], hint, n_out=2, axis=-1, num_outputs=2)
    rot = b.op("Concat", [b.op("Neg", [x2], hint), x1], hint, axis=-1)
    return b.op("Add", [b.op("Mul", [x, cos], hint), b.op("Mul", [rot, sin], hint)], hint)


RULES: dict[str, Callable[..., Any]] = {
    "input": _rule_input, "embed": _rule_embed, "norm": _rule_norm, "attention": _rule_attention,
    "add": _rule_add, "router": _rule_router, "expert": _rule_expert, "shared_expert": _rule_shared_expert,
    "mlp": _rule_mlp, "combine": _rule_combine, "lm_head": _rule_lm_head,
}
