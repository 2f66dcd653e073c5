"""Reference interpreter: executes the IR in PyTorch, optionally with fake quantization.

It is the oracle for emitted artifacts and what profiling, sensitivity and QAT run on.
Quantized nodes (routed experts, and the attention, shared-expert, dense-MLP and lm_head nodes
the non-expert precision policy gave bits; their linear roles are ``graph.QUANT_ROLES``) use, in order of
preference: the exact tensors the ``quantize`` pass stored
(annotation ``quant``), else round-to-nearest fake quantization at the annotated ``bits`` in the
weight format the target declares for those bits (the interpreter's ``formats``, else
``graph.meta["weight_formats"]``, see :mod:`dmpq_compile.quant.formats`; group-wise asymmetric
where nothing is declared).

Memory: a node's value is dropped as soon as its last consumer has run, and weights derived
from the store (fp32 conversions, fake-quantized copies) live in a least-recently-used cache
bounded by ``cache_bytes`` (used only when the whole model fits in it). A run over one decoder layer
(``resume`` at the previous layer's
output) therefore holds that layer's activations and at most ``cache_bytes`` of weights, so a
caller that streams layer by layer (:func:`dmpq_compile.ir.stream.run_layers`) is bounded by
the largest layer, not by the model.
"""

from __future__ import annotations

import functools
import logging
import math
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from .. import sysinfo
from ..quant.formats import WeightFormat, declared_format
from ..quant.spec import DEFAULT_GROUP_SIZE, QuantSpec
from . import ops
from .graph import QUANT_ROLES, Graph, IRError

log = logging.getLogger(__name__)

DEFAULT_CACHE_BYTES = 256 * 2**20  # kept between runs when the whole model fits (the samples do)
Observer = Callable[[str, str, Any], None]  # (node_id, kind, value)


@dataclass
class RunOptions:
    """How one interpreter call treats quantization and what it exposes.

    Attributes:
        quantize: apply each quantizable node's annotated bits (False: full precision).
        bits_override: node id -> bits, applied on top of (or instead of) annotations.
        expert_scales: layer -> ``[E]`` tensor multiplying routed expert outputs (for gradients).
        observer: called with every computed node value.
        resume: node id -> precomputed value; those nodes and everything only they need are skipped.
        weight_override: node id -> role -> tensor, used instead of stored weights (QAT).
        checkpoint: under autograd, MLP-like nodes (experts, shared experts, dense MLPs) keep
            neither their weights nor their intermediates for the backward pass; it recomputes
            them (weights are read again), so a backward through a layer holds one expert's
            weights at a time.
        route_rows: router node id -> ``(row, routing)``: the router's decisions for its flattened
            tokens from ``row`` on are replaced by ``routing``'s (the rows before it route as
            computed), so one batch can run some sequences with routers free and others with
            decisions held fixed (the flip probe).
        autocast: run the matrix products in this dtype (``torch.autocast``: weights and inputs
            cast per product, fp32 accumulation; norms, softmax and reductions stay fp32), e.g.
            ``torch.bfloat16`` where it multiplies faster than fp32 (:func:`compute_dtype`).
            None: everything in the interpreter's dtype.
    """

    quantize: bool = True
    bits_override: Mapping[str, int] = field(default_factory=dict)
    expert_scales: Mapping[int, torch.Tensor] = field(default_factory=dict)
    observer: Observer | None = None
    resume: Mapping[str, Any] = field(default_factory=dict)
    weight_override: Mapping[str, Mapping[str, torch.Tensor]] = field(default_factory=dict)
    checkpoint: bool = False
    route_rows: Mapping[str, tuple[int, Any]] = field(default_factory=dict)
    autocast: torch.dtype | None = None


COMPUTE_DTYPES = ("auto", "float32", "bfloat16")


def check_compute_dtype(value: str, name: str = "compute dtype") -> None:
    """Raise ``ValueError`` naming ``name`` unless ``value`` is one of :data:`COMPUTE_DTYPES`."""
    if value not in COMPUTE_DTYPES:
        raise ValueError(f"{name} must be one of {COMPUTE_DTYPES}, got {value!r}")


# ``auto`` takes bf16 only where it multiplies at least this much faster than fp32: far from both CPUs
# measured (AMD EPYC Zen 4: 2.3x; an Intel Xeon with AVX-512 BF16 but no AMX: 0.6x), so that
# noise cannot flip the choice between two compiles on one machine
BF16_MIN_SPEEDUP = 1.3
BF16_PROBE_ROUNDS = 25


def compute_dtype(graph: Graph, wanted: str = "auto") -> torch.dtype | None:
    """The dtype of the matrix products of calibration runs (:attr:`RunOptions.autocast`; None: fp32).

    ``auto`` is ``bfloat16`` when every routed expert's weights are stored in bf16 (the checkpoint's
    own precision, so the weights lose nothing; only activations are rounded), the CPU has bf16
    instructions (AVX-512 BF16 or AMX) and a product at the experts' widths, timed here, runs at
    least :data:`BF16_MIN_SPEEDUP` times fp32's speed (:func:`bf16_speedup`; an AVX-512 BF16 AMD
    EPYC: 2.3x, an Intel Xeon with AVX-512 BF16 but no AMX: 0.6x, where fp32 is faster); else fp32.
    ``float32`` / ``bfloat16`` force it.
    """
    check_compute_dtype(wanted)
    if wanted != "auto":
        return torch.bfloat16 if wanted == "bfloat16" else None
    shape = bf16_probe_shape(graph)
    if shape is None:
        return None
    return torch.bfloat16 if bf16_speedup(*shape) >= BF16_MIN_SPEEDUP else None


def bf16_probe_shape(graph: Graph) -> tuple[int, int] | None:
    """The expert weight shape ``auto`` times (:func:`bf16_speedup`), or None where ``auto`` needs no
    timing: every routed expert stored in bf16 and the CPU with bf16 instructions, else fp32 anyway."""
    if not {"avx512_bf16", "amx_bf16"} & set(sysinfo.cpu_flags()):
        return None
    experts = list(graph.experts())
    keys = [key for node in experts for key in node.params.values()]
    if not (keys and all(graph.weights.dtype(key) == torch.bfloat16 for key in keys)):
        return None
    return graph.weights.shape(next(iter(experts[0].params.values())))


def dtype_evidence(graph: Graph, wanted: str = "auto") -> dict[str, float]:
    """What ``auto`` decided by, for a pass's report: ``{"bf16_speedup": x}`` where it timed the products
    (cached: no second timing), else nothing."""
    shape = bf16_probe_shape(graph) if wanted == "auto" else None
    return {} if shape is None else {"bf16_speedup": round(bf16_speedup(*shape), 3)}


@functools.cache
def bf16_speedup(rows: int, cols: int) -> float:
    """fp32's time over bf16's for one expert-sized product as the calibration runs make it (fp32
    activations of 256 routed tokens times a ``[rows, cols]`` weight: fp32-widened, or as stored in
    bf16 under autocast), on this CPU with torch's threads; the best of :data:`BF16_PROBE_ROUNDS` timings
    of each, the two interleaved (noise only ever adds time, so the best is the estimate, and more rounds
    make a brief busy moment less likely to decide; a CPU shared with another busy process throughout can
    still time either way: on a 2-core Intel Xeon with AMX, where bf16 measures about 4x fp32, a compile
    that shared the cores with another compile took fp32 with five rounds, and ran 2.3x slower for it).
    Rows are capped at 1024 (Mixtral's 14336 would take seconds and measure the
    same kernel). Measured once per shape and process, about 0.3 s at OLMoE's widths, so that the
    profile and the sensitivity pass of one compile take the same dtype; the reports record it.
    """
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(256, cols, generator=gen)
    w32 = torch.randn(min(rows, 1024), cols, generator=gen)
    w16 = w32.to(torch.bfloat16)

    def fp32() -> None:
        F.linear(x, w32)

    def bf16() -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            F.linear(x, w16)

    best = [math.inf, math.inf]  # fp32, bf16
    for round_ in range(BF16_PROBE_ROUNDS + 1):  # the first round warms both up and is not counted
        for i, fn in enumerate((fp32, bf16)):
            t0 = time.perf_counter()
            fn()
            fn()
            if round_:
                best[i] = min(best[i], time.perf_counter() - t0)
    speedup = best[0] / best[1]
    log.info("calibration products: bf16 runs at %.2fx fp32's speed on this CPU (%dx%d weight, 256 tokens): %s",
             speedup, w32.shape[0], cols, "bf16" if speedup >= BF16_MIN_SPEEDUP else "fp32")
    return speedup


MLP_KINDS = ("expert", "shared_expert", "mlp")



class WeightCache:
    """Least-recently-used tensors keyed by tuples, holding at most ``max_bytes`` in total.

    A tensor larger than a quarter of the bound is never kept (it would evict everything).
    """

    def __init__(self, max_bytes: int = DEFAULT_CACHE_BYTES) -> None:
        self.max_bytes, self.bytes = max_bytes, 0
        self._d: OrderedDict[tuple, torch.Tensor] = OrderedDict()

    def get(self, key: tuple, make: Callable[[], torch.Tensor]) -> torch.Tensor:
        if key in self._d:
            self._d.move_to_end(key)
            return self._d[key]
        value = make()
        size = value.numel() * value.element_size()
        if size * 4 <= self.max_bytes:
            self._d[key] = value
            self.bytes += size
            while self.bytes > self.max_bytes:
                _, old = self._d.popitem(last=False)
                self.bytes -= old.numel() * old.element_size()
        return value

    def clear(self) -> None:
        self._d.clear()
        self.bytes = 0


class Interpreter:
    """Executes a :class:`Graph`; call it with token ids ``[B, T]`` to get logits ``[B, T, V]``.

    ``formats`` (``{bits: WeightFormat}``, e.g. ``Backend.weight_formats``) sets the target's
    weight formats for fake quantization without writing them into ``graph.meta``; None reads
    the graph's declaration.
    """

    def __init__(self, graph: Graph, quantize: bool = True, dtype: torch.dtype = torch.float32,
                 cache_bytes: int = DEFAULT_CACHE_BYTES, formats: Mapping[int, WeightFormat] | None = None):
        self.graph = graph
        self.quantize = quantize
        self.dtype = dtype
        self.formats = dict(formats) if formats else None
        self._order = graph.topo_order()
        # Cache derived weights only when the whole model fits: a small model then runs repeatedly
        # from memory (allocation measurements, QAT), while a large one streams layer by layer and
        # a cache that cannot hold it would only hold memory.
        item = torch.empty((), dtype=dtype).element_size()
        model_bytes = sum(math.prod(graph.weights.shape(k)) * item for k in graph.weights)
        self._cache = WeightCache(cache_bytes if model_bytes <= cache_bytes else 0)

    def __call__(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.run(input_ids, RunOptions(quantize=self.quantize))["lm_head"]

    def run(self, input_ids: torch.Tensor | None, opts: RunOptions | None = None,
            outputs: tuple[str, ...] = ("lm_head",)) -> dict[str, Any]:
        """Execute the nodes needed for ``outputs`` and return their values."""
        opts = opts or RunOptions(quantize=self.quantize)
        needed = self._needed(outputs, opts.resume)
        values: dict[str, Any] = dict(opts.resume)
        if input_ids is not None:
            values.setdefault("tokens", input_ids)
        todo = [n for n in self._order if n in needed and n not in values]
        last_use = {}  # value -> index in ``todo`` of its last consumer
        for i, node_id in enumerate(todo):
            for src in self.graph.inputs(node_id):
                last_use[src] = i
        with torch.autocast("cpu", dtype=opts.autocast) if opts.autocast is not None else nullcontext():
            for i, node_id in enumerate(todo):
                values[node_id] = self._eval(node_id, values, opts)
                if opts.observer is not None:
                    opts.observer(node_id, self.graph.g.nodes[node_id]["kind"], values[node_id])
                for src in self.graph.inputs(node_id):
                    if last_use.get(src) == i and src not in outputs:
                        del values[src]
        return {o: values[o] for o in outputs}

    def _needed(self, outputs: tuple[str, ...], resume: Mapping[str, Any]) -> set[str]:
        needed, stack = set(), list(outputs)
        while stack:
            n = stack.pop()
            if n in needed:
                continue
            needed.add(n)
            if n not in resume:
                stack.extend(self.graph.g.predecessors(n))
        return needed

    # -- weights -----------------------------------------------------------------------------
    def bits_of(self, node_id: str, opts: RunOptions) -> int:
        if node_id in opts.bits_override:
            return opts.bits_override[node_id]
        if not opts.quantize:
            return 16
        return self.graph.g.nodes[node_id]["ann"].get("bits", 16)

    def weights(self, node_id: str, opts: RunOptions) -> dict[str, torch.Tensor]:
        d = self.graph.g.nodes[node_id]
        override = opts.weight_override.get(node_id, {})
        roles = QUANT_ROLES.get(d["kind"], ())
        bits = self.bits_of(node_id, opts) if roles else 16
        # under autocast a matrix stored in the products' dtype is used as stored (no round trip
        # through fp32); the embedding table stays fp32, as the residual stream it starts does
        native = opts.autocast if d["kind"] != "embed" else None
        out = {}
        for role, key in d["params"].items():
            if role in override:
                out[role] = override[role]
            elif bits < 16 and role in roles:
                out[role] = self._quantized(node_id, role, key, bits, d["ann"])
            else:
                out[role] = self.stored(key, native if role in roles else None)
        return out

    def stored(self, key: str, native: torch.dtype | None = None) -> torch.Tensor:
        """Store weight ``key`` in the interpreter's dtype (cached, bounded); as stored when it is
        stored in ``native`` (the dtype autocast multiplies in)."""
        store = self.graph.weights
        if native is not None and store.dtype(key) == native:
            return self._cache.get(("native", key, store.version(key)), lambda: store[key])
        return self._cache.get(("fp", key, store.version(key), self.dtype), lambda: store[key].to(self.dtype))

    def _quantized(self, node_id: str, role: str, key: str, bits: int, ann: Mapping[str, Any]) -> torch.Tensor:
        from ..quant import fake_quantize_spec
        from ..quant.stored import dequantize_stored

        store = self.graph.weights
        quant = ann.get("quant")
        if quant and quant["spec"]["bits"] == bits:
            entry = quant["tensors"][role]
            version = tuple(store.version(entry[k]) for k in ("q", "scale", "zero"))
            return self._cache.get(("stored", node_id, role, bits, version),
                                   lambda: dequantize_stored(store, quant, role).to(self.dtype))
        spec = self.spec(node_id, bits)
        return self._cache.get(("rtn", key, store.version(key), spec),
                               lambda: fake_quantize_spec(self.stored(key), spec))

    def group_size(self, node_id: str) -> int:
        """The quantization group of ``node_id``: its annotation, else the graph's, else ``DEFAULT_GROUP_SIZE``."""
        ann = self.graph.g.nodes[node_id]["ann"]
        return int(ann.get("group_size", self.graph.meta.get("group_size", DEFAULT_GROUP_SIZE)))

    def spec(self, node_id: str, bits: int) -> QuantSpec:
        """The RTN spec fake quantization of ``node_id`` at ``bits`` uses: the target's declared
        format for ``bits`` (``formats``, else ``graph.meta``) at the node's group size."""
        if self.formats is not None and bits in self.formats:
            return self.formats[bits].spec(self.group_size(node_id))
        return declared_format(self.graph.meta, bits).spec(self.group_size(node_id))

    def fake_quantized(self, node_id: str, fp: Mapping[str, torch.Tensor], bits: int) -> dict[str, torch.Tensor]:
        """The MLP weights ``fp`` (already read at full precision) fake-quantized at ``bits`` exactly as
        :meth:`weights` would without stored codes, without reading the store again."""
        from ..quant import fake_quantize_spec

        spec = self.spec(node_id, bits)
        return {r: fake_quantize_spec(w, spec) if r in ("gate", "up", "down") else w for r, w in fp.items()}

    def fake_changes(self, node_id: str, fp: Mapping[str, torch.Tensor], bits: int, cast: torch.dtype
                     ) -> tuple[dict[str, torch.Tensor], torch.Tensor, float]:
        """What pricing :meth:`fake_quantized`'s weights in products of ``cast`` needs, without the float32
        weights: per MLP role the change ``W_q - W`` in ``cast``, the fake-quantized down weights in ``cast``, and
        the sum of the squared changes over the roles (:func:`~dmpq_compile.quant.fake_quantize_change`)."""
        from ..quant import fake_quantize_change

        spec = self.spec(node_id, bits)
        out = {r: fake_quantize_change(fp[r], spec, cast, fake=r == "down") for r in ("gate", "up", "down")}
        return {r: o[0] for r, o in out.items()}, out["down"][1], sum(o[2] for o in out.values())

    def clear_cache(self) -> None:
        self._cache.clear()

    # -- evaluation --------------------------------------------------------------------------
    def _eval(self, node_id: str, values: dict[str, Any], opts: RunOptions) -> Any:
        d = self.graph.g.nodes[node_id]
        kind, a = d["kind"], d["attrs"]
        ins = [values[i] for i in self.graph.inputs(node_id)]
        if kind == "input":
            raise IRError("the interpreter needs input_ids for node 'tokens'")
        if opts.checkpoint and kind in MLP_KINDS and torch.is_grad_enabled():
            from torch.utils.checkpoint import checkpoint

            return checkpoint(self._mlp, node_id, kind, ins, opts, use_reentrant=False)
        if kind in MLP_KINDS:
            return self._mlp(node_id, kind, ins, opts)
        w = self.weights(node_id, opts)
        if kind == "embed":
            return F.embedding(ins[0], w["weight"])
        if kind == "norm":
            return ops.rms_norm(ins[0], w["weight"], a["eps"])
        if kind == "attention":
            return ops.attention(ins[0], w, a)
        if kind == "add":
            return ins[0] + ins[1]
        if kind == "router":
            routing = ops.route(ins[0], w["weight"], a)
            if node_id in opts.route_rows:
                row, fixed = opts.route_rows[node_id]
                if row + len(fixed.indices) != len(routing.indices):
                    raise IRError(f"route_rows[{node_id!r}]: {len(fixed.indices)} fixed rows from row {row} do not "
                                  f"cover the {len(routing.indices)} routed tokens")
                routing = ops.Routing(*(torch.cat([getattr(routing, f)[:row], getattr(fixed, f).to(getattr(routing, f))])
                                        for f in ("weights", "indices", "logits")), routing.shape)
            return routing
        if kind == "combine":
            return ops.combine(ins[0].shape, ins[0], ins[1:], opts.expert_scales.get(a["layer"]))
        if kind == "lm_head":
            return F.linear(ins[0], w["weight"])
        raise IRError(f"node {node_id!r}: the interpreter has no rule for kind {kind!r}")


    def _mlp(self, node_id: str, kind: str, ins: list[Any], opts: RunOptions) -> Any:
        w = self.weights(node_id, opts)
        if kind == "expert":
            return ops.expert(ins[0], ins[1], self.graph.g.nodes[node_id]["attrs"]["expert"], w)
        if kind == "shared_expert":
            return ops.shared_expert(ins[0], w)
        return ops.swiglu(ins[0], w["gate"], w["up"], w["down"])


def logits_fn(graph: Graph, quantize: bool = True) -> Callable[[torch.Tensor], torch.Tensor]:
    """A ``input_ids -> logits`` callable (no autograd) for evaluation code."""
    interp = Interpreter(graph, quantize=quantize)

    def fn(input_ids: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return interp(input_ids)

    return fn
