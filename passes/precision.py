"""``precision``: the fixed bit-width policy for the weights outside the routed experts.

Rule: with ``nonexpert_bits`` below 16, every linear weight of the attention projections
(q, k, v, o), shared experts and dense MLPs (gate, up, down) and an untied ``lm_head`` gets that
bit-width (annotation ``bits`` on its node; the ``quantize`` pass stores the codes, the backends
emit them as they emit experts). The embedding table gets it too where the target runs quantized
row lookups at that width (ort-cpu: 2, 4 and 8 bits; trt-a100: none) and
the table is not tied to the ``lm_head``; otherwise it stays float (logged). Routers, norms and
the shared expert's sigmoid gate stay at full precision. Tied embeddings stay float on both
sides: the head reads the lookup's table, so quantizing either would add a second copy instead
of shrinking the file.

With ``--nonexpert-bits auto`` the allocator places these nodes (:func:`allocatable`); the pass
then writes only the kinds named as ``KIND=N``. Otherwise the allocator assigns bits to routed
experts only; this policy is fixed, and the pass runs
before ``allocate`` so that allocators measuring the model (search, rl) see the quantized
non-expert weights. Sensitivity and cost tables are measured per expert with everything else
at full precision and are not affected. ``nonexpert_bits=16`` (the default) writes nothing: the
graph, hence the artifact, is the one a compile without the pass makes.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from ..ir.graph import NONEXPERT_QUANTIZABLE_KINDS, Graph
from ..quant.spec import VALID_BITS
from .infra.base import Pass, PassContext, PassError, PassResult

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PrecisionOptions:
    """Options of the ``precision`` pass.

    Attributes:
        nonexpert_bits: Bit-width of every linear weight outside the routed experts (16: keep float).
        kinds: Per-kind bit-widths that replace ``nonexpert_bits`` for those kinds (keys from
            ``ir.graph.NONEXPERT_QUANTIZABLE_KINDS``), e.g. ``{"lm_head": 8}``.
    """

    nonexpert_bits: int = 16
    kinds: dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        check_nonexpert_bits(self.nonexpert_bits)
        check_kinds(self.kinds)

    @property
    def active(self) -> bool:
        """Whether the policy quantizes anything (else the pass changes nothing)."""
        return any(b < 16 for b in (self.nonexpert_bits, *self.kinds.values()))


def check_nonexpert_bits(bits: object, supported: tuple[int, ...] | None = None, target: str | None = None) -> None:
    """Raise ``ValueError`` unless ``bits`` is a bit-width (and, given ``supported``, one the target runs)."""
    if isinstance(bits, bool) or not isinstance(bits, int) or bits not in VALID_BITS:
        raise ValueError(f"nonexpert_bits must be one of {VALID_BITS} (16 keeps non-expert weights float), "
                         f"got {bits!r}")
    if supported is not None and bits not in supported:
        raise ValueError(f"--nonexpert-bits {bits}: target {target} cannot run {bits}-bit attention, shared-expert, "
                         f"MLP or lm_head weights; it runs {tuple(supported)}")


def check_kinds(kinds: object, backend: object = None) -> None:
    """Raise ``ValueError`` unless ``kinds`` maps non-expert kinds to bit-widths (that ``backend``,
    when given, runs for that kind: asking for an embedding lookup the target lacks is an error)."""
    if not isinstance(kinds, dict):
        raise ValueError(f"per-kind non-expert bits must be a mapping kind -> bits, got {kinds!r}")  # noqa: TRY004 (a config error, reported as one)
    for kind, bits in kinds.items():
        if kind not in NONEXPERT_QUANTIZABLE_KINDS:
            raise ValueError(f"unknown non-expert kind {kind!r} in the per-kind bits; choose from "
                             f"{NONEXPERT_QUANTIZABLE_KINDS}")
        check_nonexpert_bits(bits)
        if backend is not None and bits < 16 and bits not in backend.supported_bits_for(kind):
            raise ValueError(f"--nonexpert-bits {kind}={bits}: target {backend.name} runs "
                             f"{backend.supported_bits_for(kind)} for {kind} weights")


def split_auto(text: str) -> tuple[bool, str]:
    """``--nonexpert-bits auto[,KIND=N,...]`` -> ``(True, "KIND=N,...")``: the named kinds keep
    their bits and the allocator places the others; any other text -> ``(False, text)``."""
    parts = [p.strip() for p in str(text).split(",") if p.strip()]
    if "auto" not in parts:
        return False, str(text)
    rest = [p for p in parts if p != "auto"]
    bare = [p for p in rest if "=" not in p]
    if bare:
        raise ValueError(f"--nonexpert-bits auto allocates every kind not named as KIND=N; {bare[0]!r} would set them "
                         "all (write e.g. auto,lm_head=8)")
    return True, ",".join(rest)


def parse_policy(text: str) -> tuple[int, dict[str, int]]:
    """``--nonexpert-bits`` text: ``N`` (every kind), ``KIND=N,...`` (the rest float) or both,
    e.g. ``4,lm_head=8,attention=8`` -> ``(4, {"lm_head": 8, "attention": 8})``."""
    default, kinds = 16, {}
    for part in (p.strip() for p in str(text).split(",") if p.strip()):
        key, eq, value = part.partition("=")
        try:
            bits = int(value if eq else key)
        except ValueError:
            raise ValueError(f"--nonexpert-bits: {part!r} is not N or KIND=N (e.g. 4,lm_head=8)") from None
        if eq:
            kinds[key.strip()] = bits
        else:
            default = bits
    check_nonexpert_bits(default)
    check_kinds(kinds)
    return default, kinds


def tied(graph: Graph, node_id: str) -> bool:
    """Whether ``embed`` or ``lm_head`` node ``node_id`` shares its table with a node of the other
    kind (tied word embeddings)."""
    node = graph.node(node_id)
    key, other = node.params["weight"], "embed" if node.kind == "lm_head" else "lm_head"
    return any(n.params.get("weight") == key for n in graph.nodes(other))


def policy_bits(graph: Graph, nonexpert_bits: int, backend: object = None,
                kinds: dict[str, int] | None = None) -> dict[str, int]:
    """``{node id: bits}`` the policy gives: ``kinds[kind]``, else ``nonexpert_bits``, to every node
    of ``NONEXPERT_QUANTIZABLE_KINDS`` with fewer than 16 bits, except an ``lm_head`` tied to the
    embedding, and the embedding table only where ``backend`` runs lookups at those bits and it
    is not tied (logged)."""
    kinds = kinds or {}
    lookups = () if backend is None else backend.supported_bits_for("embed")
    out = {}
    for kind in NONEXPERT_QUANTIZABLE_KINDS:
        bits = kinds.get(kind, nonexpert_bits)
        if bits >= 16:
            continue
        for node in graph.nodes(kind):
            if kind == "lm_head" and tied(graph, node.id):
                log.info("precision: %s is tied to the embedding table, which stays float; kept at 16 bits", node.id)
                continue
            if kind == "embed" and (bits not in lookups or tied(graph, node.id)):
                why = "tied to the lm_head" if bits in lookups else \
                    f"target runs {tuple(b for b in lookups if b < 16) or 'no'} quantized lookups"
                log.info("precision: embedding %s stays float (%s)", node.id, why)
                continue
            out[node.id] = bits
    return out


def allocatable(graph: Graph, backend: object, kinds: tuple[str, ...] | list[str],
                choices: tuple[int, ...]) -> dict[str, dict[int, int]]:
    """The non-expert nodes of ``kinds`` that the allocator places (``--nonexpert-bits auto``), each
    with ``{column: bits}``: the bits the node gets when the allocator picks column ``column`` of
    ``choices``, i.e. the smallest width ``>= column`` that ``backend`` runs for the node's kind (an
    embedding table on ort-cpu has 4, 8 and 16, so column 2 means 4). One table of columns for
    every item keeps the allocators unchanged; the ``allocate`` pass maps the columns back.

    Left out (they keep the policy's, else full, precision): an ``lm_head`` or embedding tied to
    the other (quantizing one would add a copy), and kinds the target runs at no width below 16.
    """
    out = {}
    for kind in kinds:
        if kind not in NONEXPERT_QUANTIZABLE_KINDS:
            raise ValueError(f"unknown non-expert kind {kind!r}; choose from {NONEXPERT_QUANTIZABLE_KINDS}")
        runs = backend.supported_bits_for(kind) if backend is not None else \
            ((16,) if kind == "embed" else tuple(choices))
        runs = tuple(sorted({*runs, 16}))
        if len(runs) == 1:
            continue
        columns = {c: min(b for b in runs if b >= c) for c in choices}
        for node in graph.nodes(kind):
            if kind in ("embed", "lm_head") and tied(graph, node.id):
                log.info("allocate: %s is tied and stays float", node.id)
                continue
            out[node.id] = columns
    return out


def measured_bits(columns: dict[int, int]) -> tuple[int, ...]:
    """The bit-widths below 16 a node placed with ``columns`` (:func:`allocatable`) can get."""
    return tuple(sorted({b for b in columns.values() if b < 16}))


class PrecisionPass(Pass):
    name = "precision"
    Options = PrecisionOptions
    description = "fixed bit-width of the non-expert linear weights (attention, shared experts, MLPs, lm_head)"

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        o = self.options
        bits = o.nonexpert_bits
        stats = {"nonexpert_bits": bits, **({"kinds": dict(o.kinds)} if o.kinds else {})}
        if not o.active:
            return PassResult(graph, modified=False, stats={**stats, "nodes": {}})
        backend = ctx.backend
        if backend is not None:
            try:
                check_kinds(o.kinds, backend)
            except ValueError as e:
                raise PassError(f"precision: {e}") from None
            supported = backend.supported_bits_for(NONEXPERT_QUANTIZABLE_KINDS[0])
            kinds = {k for k in NONEXPERT_QUANTIZABLE_KINDS if k != "embed" and k not in o.kinds
                     and bits < 16 and bits not in backend.supported_bits_for(k)}
            if kinds:
                raise PassError(f"precision: target {backend.name} cannot run {bits}-bit weights for "
                                f"{sorted(kinds)} nodes (it runs {supported}); choose another --nonexpert-bits")
        counts: dict[str, int] = {}
        for node_id, b in policy_bits(graph, bits, backend, o.kinds).items():
            graph.annotate(node_id, "bits", b)
            kind = graph.node(node_id).kind
            counts[kind] = counts.get(kind, 0) + 1
        log.info("precision: non-expert bits %d%s on %s", bits, f", by kind {o.kinds}" if o.kinds else "", counts)
        return PassResult(graph, modified=bool(counts), stats={**stats, "nodes": counts})
