"""``pin-bits``: give every expert of the chosen layers one bit-width, whatever allocate chose.

An example plugin pass for dmpq-compile (docs/extending.md). Run it after allocate::

    dmpq-compile compile MODEL -o OUT --pass pin-bits:layers=[0],bits=8 --after allocate

Pinning experts up costs budget the allocator did not plan for: unless ``bits`` is lower than
what allocate chose, the compile stops with an error naming this pass (raise the budget, or
pass ``--allow-budget-overrun`` to accept the larger model).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from dmpq_compile.passes import Pass, PassError, PassResult

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PinBitsOptions:
    layers: tuple[int, ...] = (0,)  # decoder layers whose experts are pinned
    bits: int = 8  # the bit-width they get; must be one the target supports

    def __post_init__(self) -> None:
        if self.bits <= 0:
            raise ValueError(f"bits must be positive, got {self.bits}")


class PinBits(Pass):
    name = "pin-bits"  # what --pass, `dmpq-compile passes` and the entry point call it
    requires = ("bits",)  # runs after a pass that assigned bits (allocate)
    provides = ("bits",)
    Options = PinBitsOptions  # typed and closed: unknown keys and wrong types are errors
    description = "pin every expert of the chosen layers to one bit-width (example plugin)"

    def run(self, graph, ctx):
        o = self.options
        supported = getattr(ctx.backend, "supported_bits", None)
        if supported and o.bits not in supported:
            raise PassError(f"pin-bits: target {ctx.backend.name!r} supports bits {supported}, not {o.bits}")
        layers = {n.attrs["layer"] for n in graph.experts()}
        missing = sorted(set(o.layers) - layers)
        if missing:
            raise PassError(f"pin-bits: the model has no layers {missing} (it has {min(layers)}..{max(layers)})")
        # collect, then rewrite: never annotate while iterating a graph view
        pinned = [n.id for n in graph.experts() if n.attrs["layer"] in o.layers and n.ann["bits"] != o.bits]
        for node_id in pinned:
            graph.annotate(node_id, "bits", o.bits)
        log.info("pin-bits: %d experts of layers %s set to %d bits", len(pinned), list(o.layers), o.bits)
        return PassResult(graph, modified=bool(pinned), stats={"pinned": len(pinned)})
