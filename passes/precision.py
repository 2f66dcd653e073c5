"""``precision``: the fixed bit-width policy for the weights outside the routed experts.

Rule: with ``nonexpert_bits`` below 16, every linear weight of the attention projections
(q, k, v, o), shared experts and dense MLPs (gate, up, down) and an untied ``lm_head`` gets that
bit-width (annotation ``bits`` on its node; the ``quantize`` pass stores the codes, the backends
emit them as they emit experts). The embedding table gets it too where the target runs quantized
row lookups at that width (ort-cpu: 4 and 8 bits, ``GatherBlockQuantized``; trt-a100: none) and
the table is not tied to the ``lm_head``; otherwise it stays float (logged). Routers, norms and
the shared expert's sigmoid gate stay at full precision. Tied embeddings stay float on both
sides: the head reads the lookup's table, so quantizing either would add a second copy instead
of shrinking the file.

The allocator assigns bits to routed experts only; this policy is fixed, and the pass runs
before ``allocate`` so that allocators measuring the model (search, rl) see the quantized
non-expert weights. Sensitivity and cost tables are measured per expert with everything else
at full precision and are not affected. ``nonexpert_bits=16`` (the default) writes nothing: the
graph, hence the artifact, is the one a compile without the pass makes.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from ..ir.graph import NONEXPERT_QUANTIZABLE_KINDS, Graph
from ..quant.spec import VALID_BITS
from .base import Pass, PassContext, PassError, PassResult

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PrecisionOptions:
    """Options of the ``precision`` pass.

    Attributes:
        nonexpert_bits: Bit-width of every linear weight outside the routed experts (16: keep float).
    """

    nonexpert_bits: int = 16

    def __post_init__(self) -> None:
        check_nonexpert_bits(self.nonexpert_bits)


def check_nonexpert_bits(bits: object, supported: tuple[int, ...] | None = None, target: str | None = None) -> None:
    """Raise ``ValueError`` unless ``bits`` is a bit-width (and, given ``supported``, one the target runs)."""
    if isinstance(bits, bool) or not isinstance(bits, int) or bits not in VALID_BITS:
        raise ValueError(f"nonexpert_bits must be one of {VALID_BITS} (16 keeps non-expert weights float), "
                         f"got {bits!r}")
    if supported is not None and bits not in supported:
        raise ValueError(f"--nonexpert-bits {bits}: target {target} cannot run {bits}-bit attention, shared-expert, "
                         f"MLP or lm_head weights; it runs {tuple(supported)}")


def tied_head(graph: Graph, node_id: str) -> bool:
    """Whether ``lm_head`` node ``node_id`` reads the embedding table (tied word embeddings)."""
    key = graph.node(node_id).params["weight"]
    return any(n.params.get("weight") == key for n in graph.nodes("embed"))


def tied_table(graph: Graph, node_id: str) -> bool:
    """Whether embedding node ``node_id``'s table is also an ``lm_head``'s weight."""
    key = graph.node(node_id).params["weight"]
    return any(n.params.get("weight") == key for n in graph.nodes("lm_head"))


def policy_bits(graph: Graph, nonexpert_bits: int, backend: object = None) -> dict[str, int]:
    """``{node id: bits}`` the policy gives at ``nonexpert_bits``: every node of
    ``NONEXPERT_QUANTIZABLE_KINDS`` except an ``lm_head`` tied to the embedding, and the embedding
    table only where ``backend`` runs ``nonexpert_bits``-bit lookups and it is not tied (logged)."""
    lookups = () if backend is None else backend.supported_bits_for("embed")
    out = {}
    for kind in NONEXPERT_QUANTIZABLE_KINDS:
        for node in graph.nodes(kind):
            if kind == "lm_head" and tied_head(graph, node.id):
                log.info("precision: %s is tied to the embedding table, which stays float; kept at 16 bits", node.id)
                continue
            if kind == "embed" and (nonexpert_bits not in lookups or tied_table(graph, node.id)):
                why = "tied to the lm_head" if nonexpert_bits in lookups else \
                    f"target runs {tuple(b for b in lookups if b < 16) or 'no'} quantized lookups"
                log.info("precision: embedding %s stays float (%s)", node.id, why)
                continue
            out[node.id] = nonexpert_bits
    return out


class PrecisionPass(Pass):
    name = "precision"
    Options = PrecisionOptions
    description = "fixed bit-width of the non-expert linear weights (attention, shared experts, MLPs, lm_head)"

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        bits = self.options.nonexpert_bits
        if bits == 16:
            return PassResult(graph, modified=False, stats={"nonexpert_bits": 16, "nodes": {}})
        backend = ctx.backend
        if backend is not None:
            supported = backend.supported_bits_for(NONEXPERT_QUANTIZABLE_KINDS[0])
            kinds = {k for k in NONEXPERT_QUANTIZABLE_KINDS
                     if k != "embed" and bits not in backend.supported_bits_for(k)}
            if kinds:
                raise PassError(f"precision: target {backend.name} cannot run {bits}-bit weights for "
                                f"{sorted(kinds)} nodes (it runs {supported}); choose another --nonexpert-bits")
        counts: dict[str, int] = {}
        for node_id, b in policy_bits(graph, bits, backend).items():
            graph.annotate(node_id, "bits", b)
            kind = graph.node(node_id).kind
            counts[kind] = counts.get(kind, 0) + 1
        log.info("precision: %d-bit non-expert weights on %s", bits, counts)
        return PassResult(graph, modified=bool(counts), stats={"nonexpert_bits": bits, "nodes": counts})
