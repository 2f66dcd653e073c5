"""The per-layer tasks ``compile --ray`` runs on workers (``dmpq_compile/distributed.py`` holds the
connection; see docs/scaling.md). Module-level functions, so that Ray can import them by name;
each runs exactly what the serial pass runs for that layer."""

from __future__ import annotations

import logging
from pathlib import Path

import torch

log = logging.getLogger(__name__)
MAX_SENT_BYTES = 64 * 2**20  # in-memory weights sent with the graph (beyond: the pass runs in the driver)


def sendable(graph) -> bool:
    """Whether ``graph`` can go to workers: its weights on disk but at most ``MAX_SENT_BYTES``."""
    store = graph.weights
    held = sum(store.nbytes([k]) for k in store if store.ref(k) is None)
    if held > MAX_SENT_BYTES:
        log.info("ray: %.0f MB of weights live only in memory (not in the checkpoint's files); this pass runs in "
                 "the driver", held / 2**20)
        return False
    return True


def layer_expert_scores(graph, formats, layer: int, x, routing, g, bits, seq_len: int, autocast, probe,
                        threads: int) -> dict:
    """:func:`~dmpq_compile.passes.sensitivity.local.expert_scores` of one layer, in a worker."""
    from ...ir.interpreter import Interpreter
    from ..sensitivity import local

    torch.set_num_threads(threads)
    interp = Interpreter(graph, quantize=False, formats=formats)
    with torch.no_grad():
        return local.expert_scores(graph, interp, layer, x, routing, g, bits, seq_len,
                                   graph.experts_by_layer().get(layer, []), autocast, probe)


def layer_quantize(graph, options, node_ids: list[str], path: str, unit: tuple[str, str] | None,
                   threads: int) -> tuple[list[str], dict[str, dict]]:
    """Quantize the nodes ``node_ids`` (one layer's) with the quantize pass's ``options`` in a worker,
    write their codes into the safetensors file ``path`` and return the keys written (in the order
    the pass adds them) and each node's annotations. ``unit``: ``(state folder name, unit name)`` when
    the driver keeps partial state (:mod:`..quantize_resume`): the file then carries that unit's
    header, so that a rerun after an interruption can load it instead of quantizing the layer again."""
    from ..quantize import QuantizePass
    from ..quantize_resume import unit_metadata

    torch.set_num_threads(threads)
    qp = QuantizePass(options)
    keys: list[str] = []
    for node_id in node_ids:
        keys += qp.quantize_node(graph, graph.node(node_id), {})
    anns = {n: {"group_size": graph.node(n).ann["group_size"], "quant": graph.node(n).ann["quant"]} for n in node_ids}
    if keys:
        meta = None if unit is None else unit_metadata(unit[0], unit[1], anns, keys, graph.weights)
        graph.weights.spill(keys, Path(path), metadata=meta)  # atomically: a killed task leaves no file
    return keys, anns
