"""Typed annotations that passes write on IR nodes.

Every annotation key has a schema: which node kinds may carry it and a validator. Unknown keys
are rejected, so a typo in a pass fails where it is made; plugin passes declare their own keys
with :func:`register_annotation`.

Some annotations are keyed by bit-width (``sensitivity[bits]``); JSON turns those keys into
strings, so :func:`decode_annotation` turns them back into ``int`` on load.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from ..quant.spec import VALID_BITS
from .graph import QUANTIZABLE_KINDS


@dataclass(frozen=True)
class AnnotationSpec:
    kinds: tuple[str, ...]
    check: Callable[[Any], str | None]  # returns an error message or None
    bit_keyed_depth: int = 0  # 1: {bits: v}; 2: {name: {bits: v}}
    doc: str = ""


def _float(lo: float = -math.inf, hi: float = math.inf) -> Callable[[Any], str | None]:
    def check(v: Any) -> str | None:
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            return f"expected a finite number, got {v!r}"
        if not lo <= v <= hi:
            return f"expected a number in [{lo}, {hi}], got {v}"
        return None

    return check


def _int(lo: int = 0) -> Callable[[Any], str | None]:
    def check(v: Any) -> str | None:
        if isinstance(v, bool) or not isinstance(v, int) or v < lo:
            return f"expected an int >= {lo}, got {v!r}"
        return None

    return check


def _bits(v: Any) -> str | None:
    return None if v in VALID_BITS and not isinstance(v, bool) else f"expected bits in {VALID_BITS}, got {v!r}"


def _bit_map(v: Any) -> str | None:
    if not isinstance(v, Mapping):
        return f"expected a mapping bits -> number, got {type(v).__name__}"
    for b, x in v.items():
        if _bits(b) or _float()(x):
            return f"bad entry {b!r}: {x!r} (keys are bits in {VALID_BITS}, values finite numbers)"
    return None


def _cost_map(v: Any) -> str | None:
    if not isinstance(v, Mapping):
        return f"expected {{target: {{bits: {{metric: value}}}}}}, got {type(v).__name__}"
    for target, per_bits in v.items():
        if not isinstance(per_bits, Mapping):
            return f"cost for target {target!r} must be a mapping bits -> metrics"
        for b, metrics in per_bits.items():
            if _bits(b) or not isinstance(metrics, Mapping):
                return f"cost[{target!r}][{b!r}] must map bits in {VALID_BITS} to a metrics mapping"
    return None


def _flag(v: Any) -> str | None:
    return None if isinstance(v, bool) else f"expected true or false, got {v!r}"


def _mapping(v: Any) -> str | None:
    return None if isinstance(v, Mapping) else f"expected a mapping, got {type(v).__name__}"


SCHEMA: dict[str, AnnotationSpec] = {
    "freq": AnnotationSpec(("expert",), _float(0.0, 1.0), doc="fraction of tokens routed to the expert"),
    "mass": AnnotationSpec(("expert",), _float(0.0), doc="mean routing weight per token"),
    "tokens": AnnotationSpec(("expert",), _int(), doc="tokens routed to the expert during profiling"),
    "sensitivity": AnnotationSpec(QUANTIZABLE_KINDS, _bit_map, 1, "NLL increase when only this node is quantized"),
    "kl": AnnotationSpec(QUANTIZABLE_KINDS, _bit_map, 1, "KL(FP || quantized) when only this node is quantized"),
    "flip_kl": AnnotationSpec(QUANTIZABLE_KINDS, _bit_map, 1, "the part of kl that routing flips downstream add "
                              "(the sensitivity pass's probe rate x the node's output-change norm)"),
    "contribution": AnnotationSpec(("expert",), _float(0.0), doc="|dL/ds| for a scale s on the expert output"),
    "router_grad_change": AnnotationSpec(("expert",), _float(0.0), doc="relative change of the router-row gradient"),
    "neuron_variance": AnnotationSpec(("expert",), _float(0.0), doc="mean variance of intermediate activations"),
    "sensitivity_tokens": AnnotationSpec(("expert",), _int(), doc="routed tokens the sensitivity pass measured "
                                         "the expert on"),
    "sensitivity_estimated": AnnotationSpec(("expert",), _flag, doc="kl/sensitivity estimated from the weights: "
                                            "too few routed tokens to measure (passes/sensitivity/rare_experts.py)"),
    "bits": AnnotationSpec(QUANTIZABLE_KINDS, _bits, doc="assigned weight bit-width (16 = keep)"),
    "group_size": AnnotationSpec(QUANTIZABLE_KINDS, _int(1), doc="quantization group size"),
    "cost": AnnotationSpec(("expert",), _cost_map, 2, "backend cost table rows: target -> bits -> metrics"),
    "quant": AnnotationSpec(QUANTIZABLE_KINDS, _mapping, doc="packed weight keys + quant spec"),
    "routing": AnnotationSpec(("router",), _mapping, doc="profiling summary of a router"),
}


def register_annotation(key: str, spec: AnnotationSpec) -> None:
    """Declare a new annotation key (for plugin passes)."""
    if key in SCHEMA and SCHEMA[key] != spec:
        raise ValueError(f"annotation {key!r} is already registered with another schema")
    SCHEMA[key] = spec


def check_annotation(node_id: str, kind: str, key: str, value: Any) -> None:
    """Raise ``IRError`` if ``value`` is not a valid ``key`` annotation on a node of ``kind``."""
    from .graph import IRError

    spec = SCHEMA.get(key)
    if spec is None:
        raise IRError(f"node {node_id!r}: unknown annotation {key!r}; known: {sorted(SCHEMA)} "
                      "(plugins declare theirs with register_annotation)")
    if kind not in spec.kinds:
        raise IRError(f"node {node_id!r}: annotation {key!r} is not allowed on kind {kind!r} (only {spec.kinds})")
    err = spec.check(value)
    if err:
        raise IRError(f"node {node_id!r}: annotation {key!r}: {err}")


def decode_annotation(key: str, value: Any) -> Any:
    """Undo JSON's stringification of bit keys for bit-keyed annotations."""
    spec = SCHEMA.get(key)
    depth = spec.bit_keyed_depth if spec else 0
    if depth == 1:
        return {int(b): x for b, x in value.items()}
    if depth == 2:
        return {t: {int(b): x for b, x in per.items()} for t, per in value.items()}
    return value
