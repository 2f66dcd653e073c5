"""The backend contract: supported bits and their weight formats, a cost table, lowering into an
artifact folder."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

if TYPE_CHECKING:  # annotations only: `check` and `bench` import backends without torch (ir/, quant/ do)
    from ..ir.graph import Graph
    from ..quant.formats import WeightFormat


class BackendError(RuntimeError):
    """The backend cannot handle this graph or artifact; the message says what to change."""


@dataclass(frozen=True)
class ExpertCostRow:
    """Cost of one expert at one bit-width on one target (what a cost table holds).

    ``decode_ms`` / ``prefill_ms`` are the expert's cost when a token is routed to it under
    per-expert dispatch; ``idle_*`` what that dispatch costs per token when it is not (a
    conditional that runs every token). Targets with a fused MoE op also give ``fused_*`` (the
    routed cost inside the op) and ``group_*`` (the op's per-token fixed part, paid once per layer
    and bit-width that runs fused); ``fused_decode_ms`` is None where the width cannot fuse.
    :func:`dmpq_compile.passes.allocate.fusion.fused_subset` turns these into the layer's layout.
    A target with one MoE node per layer for all widths (ort-cpu's ``--dispatch kernel``) gives
    ``kernel_*`` (the expert's routed cost inside that node; None where the expert cannot join it or
    the node was not measured) and ``kernel_fixed_*`` (the node's per-token fixed part, paid once per
    layer whatever widths it holds); :func:`dmpq_compile.passes.allocate.fusion.kernel_tables` prices it.
    """

    decode_ms: float  # one token (M=1) through the expert's three projections
    prefill_ms: float  # per token, amortised over a 128-token prefill
    bytes: int  # weight bytes including scales/zero points
    energy_mj: float  # estimated energy per decoded token
    idle_decode_ms: float = 0.0
    idle_prefill_ms: float = 0.0
    fused_decode_ms: float | None = None
    fused_prefill_ms: float | None = None
    group_decode_ms: float = 0.0
    group_prefill_ms: float = 0.0
    kernel_decode_ms: float | None = None
    kernel_prefill_ms: float | None = None
    kernel_fixed_decode_ms: float = 0.0
    kernel_fixed_prefill_ms: float = 0.0


class Backend:
    """Base class of a compilation target.

    Subclasses set ``name``, ``supported_bits`` and ``description``, implement
    :meth:`cost_table` and :meth:`emit`, and override :meth:`weight_format` where a bit-width
    runs in another format than group-wise asymmetric. ``emit`` writes model files into a folder
    that the artifact writer created (a temporary folder renamed into place only when complete)
    and returns manifest fields of its own (format, files, runtime requirements).
    """

    name: ClassVar[str] = ""
    supported_bits: ClassVar[tuple[int, ...]] = (16,)
    description: ClassVar[str] = ""
    # whole-model stored bits per weight of a compile without budget flags (the compile driver's
    # resolve_defaults); None: such a compile budgets the experts' code bits instead
    default_budget_bits: ClassVar[float | None] = None

    def cost_table(self, graph: Graph, **options: Any) -> dict[str, dict[int, ExpertCostRow]]:
        """``{expert node id: {bits: ExpertCostRow}}`` for every expert and supported bit-width.

        The group size is ``graph.meta["group_size"]`` (set by the compile driver); ``options``
        may carry ``progress`` (show progress) and backend-specific settings.
        """
        raise NotImplementedError(f"backend {self.name!r} has no cost table")

    def emit(self, graph: Graph, out_dir: Path, **options: Any) -> dict[str, Any]:
        """Write the model files into ``out_dir`` and return the manifest's ``target`` fields.

        The fields may include ``expert_weights``, ``{expert node id: {"tensors": [names in the
        model file], "bytes": their bytes on disk}}`` (for ONNX, from
        :func:`~dmpq_compile.backends.onnx_io.owned_weights`); the artifact writer moves it into
        the manifest's per-expert entries, where the bench and the hardware measurement read it.
        """
        raise NotImplementedError(f"backend {self.name!r} cannot emit")

    def weight_format(self, bits: int) -> WeightFormat:
        """The integer format this target runs ``bits``-bit expert weights in.

        The ``quantize`` and ``sensitivity`` passes and the reference interpreter use it (through
        ``graph.meta``, see :mod:`dmpq_compile.quant.formats`), and :meth:`emit` must write the
        stored codes of that format unchanged. Default: group-wise asymmetric, the group size
        being the compile's ``group_size``.
        """
        from ..quant.formats import WeightFormat

        return WeightFormat(bits)

    @property
    def weight_formats(self) -> dict[int, WeightFormat]:
        """``{bits: format}`` for every supported bit-width below 16 (what passes use and record)."""
        return {b: self.weight_format(b) for b in self.supported_bits if b < 16}

    def check_formats(self, graph: Graph) -> None:
        """Refuse quantized nodes (experts and non-expert kinds) whose stored codes are not in this
        target's declared format."""
        from ..ir.graph import QUANTIZABLE_KINDS

        bad = {}
        for n in (n for n in graph.nodes() if n.kind in QUANTIZABLE_KINDS):
            spec, bits = (n.ann.get("quant") or {}).get("spec"), n.ann.get("bits", 16)
            if not spec or bits == 16 or spec["bits"] != bits:  # nothing stored for these bits
                continue
            if spec["scheme"] != self.weight_format(bits).scheme:
                bad[n.id] = f"{bits}-bit {spec['scheme']}"
        if bad:
            some = dict(list(bad.items())[:4])
            wants = {b: f.describe() for b, f in self.weight_formats.items()}
            raise BackendError(f"backend {self.name!r} runs {wants}, but {len(bad)} nodes carry codes of "
                               f"another format, e.g. {some}; re-run the quantize pass for this target "
                               f"(--target {self.name})")

    def weight_bytes(self, n: int, k: int, bits: int, group_size: int, kind: str | None = None) -> int:
        """Bytes :meth:`emit` stores for one linear weight ``K -> N`` (an expert projection, or a
        non-expert one the ``precision`` pass gave bits) at ``bits``: codes, scales and zero points,
        or the float weight at 16 bits. ``kind``: the IR node kind it belongs to (``expert``,
        ``attention``, ``embed``, ...), for a target that stores some kinds another way.
        :func:`~dmpq_compile.passes.infra.storage.stored_weight_bytes`
        adds these up for the stored-bits budget; ``tests/test_stored_budget.py`` checks them
        against emitted files."""
        raise NotImplementedError(f"backend {self.name!r} does not say how it stores weights")

    def float_bytes(self, kind: str, role: str) -> int:
        """Bytes per parameter of a weight :meth:`emit` keeps in float (not a linear weight of
        ``ir.graph.QUANT_ROLES``): norms, routers, biases, the embedding table. Default: fp32."""
        return 4

    def supported_bits_for(self, kind: str) -> tuple[int, ...]:
        """The bit-widths this target runs for the weight matrices of IR nodes of ``kind`` (an
        expert, or a non-expert kind of ``ir.graph.QUANT_ROLES``). Default: ``supported_bits``,
        except for the embedding table, which a target keeps float unless it says otherwise."""
        return (16,) if kind == "embed" else self.supported_bits

    def check_bits(self, graph: Graph) -> None:
        """Refuse a graph whose experts, or non-expert nodes given bits by the ``precision`` pass,
        carry bits this backend cannot run for their kind."""
        bad = {n.id: n.ann["bits"] for n in graph.experts() if n.ann.get("bits", 16) not in self.supported_bits}
        if bad:
            some = dict(list(bad.items())[:4])
            raise BackendError(f"backend {self.name!r} supports bits {self.supported_bits}, but {len(bad)} experts "
                               f"carry others, e.g. {some}; allocate for this target (--target {self.name})")
        from ..ir.graph import NONEXPERT_QUANTIZABLE_KINDS

        for kind in NONEXPERT_QUANTIZABLE_KINDS:
            bad = {n.id: n.ann["bits"] for n in graph.nodes(kind)
                   if n.ann.get("bits", 16) not in self.supported_bits_for(kind)}
            if bad:
                some = dict(list(bad.items())[:4])
                raise BackendError(f"backend {self.name!r} cannot run {sorted(set(bad.values()))}-bit {kind} weights "
                                   f"({some}); it runs {self.supported_bits_for(kind)} for {kind} nodes: choose "
                                   "another --nonexpert-bits")
