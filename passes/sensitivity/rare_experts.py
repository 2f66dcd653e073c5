"""Experts the calibration set routes few or no tokens to: counted, and priced from their weights.

A layer-local sensitivity is measured on the tokens routed to each expert. An expert that the
calibration text reaches rarely or never gets a KL near or exactly zero: not because quantizing
it is harmless, but because the text did not exercise it. Taken at face value, the allocator
would give it the fewest bits, and any prompt that does route to it would meet the coarsest
weights of the model (llama.cpp's importance matrix once silently dropped such experts' data).

**Rare.** An expert is rare when the sensitivity pass measured it on fewer than ``min_tokens``
routed calibration tokens (``--min-routed-tokens``, default 8; annotation
``sensitivity_tokens``). ``compile``'s report and ``inspect`` count, per layer, the experts with
fewer than that many routed tokens over the whole calibration set (the profile's ``tokens``)
and how many of them the set never reached.

**Estimate** (``--rare-sensitivity estimate``, the default). For each layer and bit-width ``b``::

    kl_u(b) = max(measured kl_u(b), c_l(b) * e_u(b)),   c_l(b) = median over e in M_l of kl_e(b) / e_e(b)

where ``e_x(b) = sum ||W_q - W||^2`` over the expert's gate, up and down weights fake-quantized
at ``b`` (what its weights alone say), and ``M_l`` the layer's experts measured on at least
``min_tokens`` tokens (all layers' where a layer has none). The ratio ``kl / e`` of a measured
expert folds in what the weights cannot say (how often tokens reach an expert, the gradient of
the model's output at that layer, the inputs' scale); its median is the layer's typical expert.
A rare expert is thus priced as a typically routed expert of its layer with its own weights'
error, never below what was measured. ``sensitivity`` is set to the same values (the local
method's ``sensitivity`` is its KL) and ``contribution`` to at least the layer's median;
``sensitivity_estimated`` marks the experts priced so.

``--rare-sensitivity measured`` takes the measurement as it is (zero for an expert no token
reached): the rare experts are then the cheapest to quantize, which is what that flag asks for.
"""

from __future__ import annotations

import logging
import statistics

from ...ir.graph import Graph
from ...rare_counts import DEFAULT_MIN_TOKENS  # noqa: F401  (the default N, one definition)

log = logging.getLogger(__name__)
MODES = ("estimate", "measured")


def price_rare(graph: Graph, weight_errors: dict[str, dict[int, float]], min_tokens: int, mode: str) -> dict:
    """Re-price the experts measured on fewer than ``min_tokens`` tokens (``mode == "estimate"``,
    see the module docstring) and return what was done: per layer the rare experts (measured on
    fewer than ``min_tokens``), the unrouted ones (none) and how many were estimated.

    ``weight_errors``: expert id -> ``{bits: sum ||W_q - W||^2}`` (from the sensitivity pass)."""
    if mode not in MODES:
        raise ValueError(f"rare-expert mode must be one of {MODES}, got {mode!r}")
    by_layer = graph.experts_by_layer()
    measured = {layer: [n for n in nodes if n.ann.get("sensitivity_tokens", 0) >= min_tokens and n.id in weight_errors]
                for layer, nodes in by_layer.items()}
    pooled = [n for nodes in measured.values() for n in nodes]
    stats: dict = {"min_tokens": min_tokens, "mode": mode, "per_layer": {}, "estimated": 0}
    for layer, nodes in by_layer.items():
        rare = [n for n in nodes if n.ann.get("sensitivity_tokens", 0) < min_tokens]
        row = {"rare": len(rare), "unrouted": sum(1 for n in rare if n.ann.get("sensitivity_tokens", 0) == 0),
               "estimated": 0}
        stats["per_layer"][str(layer)] = row
        if mode != "estimate" or not rare:
            continue
        ref = measured[layer] or pooled
        if not ref:
            log.warning("sensitivity: layer %d has %d rare experts and no expert anywhere was measured on %d "
                        "tokens or more: their measured sensitivity stands (use more calibration text)",
                        layer, len(rare), min_tokens)
            continue
        ratio = _median_ratios(ref, weight_errors)
        contribution = statistics.median(float(n.ann.get("contribution", 0.0)) for n in ref)
        for n in rare:
            if n.id not in weight_errors:
                continue
            kl = dict(n.ann["kl"])
            for b, c in ratio.items():
                kl[b] = max(float(kl.get(b, 0.0)), c * weight_errors[n.id][b])
            graph.annotate(n.id, "kl", kl)
            graph.annotate(n.id, "sensitivity", dict(kl))
            graph.annotate(n.id, "contribution", max(float(n.ann.get("contribution", 0.0)), contribution))
            graph.annotate(n.id, "sensitivity_estimated", True)
            row["estimated"] += 1
        stats["estimated"] += row["estimated"]
    if stats["estimated"]:
        log.info("sensitivity: %d experts measured on fewer than %d routed tokens were priced from their weights "
                 "and their layer's measured experts (--rare-sensitivity measured keeps the measurement)",
                 stats["estimated"], min_tokens)
    return stats


def _median_ratios(ref: list, weight_errors: dict[str, dict[int, float]]) -> dict[int, float]:
    """Per bits below 16: the median over ``ref`` experts of measured KL / weight error."""
    bits = sorted({int(b) for n in ref for b in n.ann["kl"] if int(b) < 16})
    out = {}
    for b in bits:
        ratios = [float(n.ann["kl"][b]) / weight_errors[n.id][b] for n in ref if weight_errors[n.id].get(b, 0.0) > 0]
        out[b] = statistics.median(ratios) if ratios else 0.0
    return out
