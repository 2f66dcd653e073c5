"""The backend contract: supported bits, a cost table, lowering into an artifact folder."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

if TYPE_CHECKING:  # annotations only: `check` and `bench` import backends without torch (ir/ imports it)
    from ..ir.graph import Graph


class BackendError(RuntimeError):
    """The backend cannot handle this graph or artifact; the message says what to change."""


@dataclass(frozen=True)
class ExpertCostRow:
    """Cost of one expert at one bit-width on one target (what a cost table holds)."""

    decode_ms: float  # one token (M=1) through the expert's three projections
    prefill_ms: float  # per token, amortised over a 128-token prefill
    bytes: int  # weight bytes including scales/zero points
    energy_mj: float  # estimated energy per decoded token


class Backend:
    """Base class of a compilation target.

    Subclasses set ``name``, ``supported_bits`` and ``description`` and implement
    :meth:`cost_table` and :meth:`emit`. ``emit`` writes model files into a folder that the
    artifact writer created (a temporary folder renamed into place only when complete) and
    returns manifest fields of its own (format, files, runtime requirements).
    """

    name: ClassVar[str] = ""
    supported_bits: ClassVar[tuple[int, ...]] = (16,)
    description: ClassVar[str] = ""

    def cost_table(self, graph: Graph, **options: Any) -> dict[str, dict[int, ExpertCostRow]]:
        """``{expert node id: {bits: ExpertCostRow}}`` for every expert and supported bit-width.

        The group size is ``graph.meta["group_size"]`` (set by the compile driver); ``options``
        may carry ``progress`` (show progress) and backend-specific settings.
        """
        raise NotImplementedError(f"backend {self.name!r} has no cost table")

    def emit(self, graph: Graph, out_dir: Path, **options: Any) -> dict[str, Any]:
        raise NotImplementedError(f"backend {self.name!r} cannot emit")

    def check_bits(self, graph: Graph) -> None:
        """Refuse a graph whose experts carry bits this backend cannot run."""
        bad = {n.id: n.ann["bits"] for n in graph.experts() if n.ann.get("bits", 16) not in self.supported_bits}
        if bad:
            some = dict(list(bad.items())[:4])
            raise BackendError(f"backend {self.name!r} supports bits {self.supported_bits}, but {len(bad)} experts "
                               f"carry others, e.g. {some}; allocate for this target (--target {self.name})")
