"""Weight formats a target runs, declared per bit-width, and where a graph records them.

A target (backend) declares, for every bit-width it supports, the :class:`WeightFormat` its
kernels execute (``Backend.weight_formats``). The passes that quantize or fake-quantize use it:
``sensitivity`` hands it to its interpreter (``Interpreter(formats=...)``, leaving the graph
unchanged), while ``quantize`` and a measuring ``allocate`` record it in
``graph.meta["weight_formats"]``, where every reference interpreter of the graph reads it. So
the codes the allocator measured, the codes the ``quantize`` pass stores and the codes the
backend emits are one format. A graph without a declaration uses the group-wise asymmetric
format at every bit-width (``ort-cpu``'s).

Rule: a format is group-wise asymmetric (scheme ``affine-asym-v1``; its group size is the
compile's ``group_size``) or per-output-channel symmetric narrow-range (``sym-channel-v1``),
with float32 or float16 scales; :meth:`WeightFormat.spec` turns it into the
:class:`~.spec.QuantSpec` a quantizer takes.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, MutableMapping
from dataclasses import dataclass
from typing import Any

from .spec import ASYM_GROUP, SYM_CHANNEL, VALID_BITS, VALID_SCALE_DTYPES, QuantSpec

META_KEY = "weight_formats"
"""``graph.meta`` key: ``{str(bits): WeightFormat.to_dict()}`` (string keys survive JSON)."""


@dataclass(frozen=True)
class WeightFormat:
    """The integer format a target runs ``bits``-bit weights in.

    Attributes:
        bits: Bit-width, one of :data:`~.spec.VALID_BITS` (16: not quantized).
        symmetric: Codes centred on 0 with no zero point (narrow range, ``-qmax..qmax``);
            else affine codes ``0..2**bits - 1`` with an integer zero point.
        per_channel: One scale per output channel; else one per group of the compile's
            ``group_size`` consecutive input features.
        scale_dtype: How the target stores the scales (``float32`` or ``float16``; see
            :data:`~.spec.VALID_SCALE_DTYPES`).

    Raises:
        ValueError: Invalid bits or scale dtype, or a combination no quantizer implements
            (asymmetric per-channel, symmetric group-wise).
    """

    bits: int
    symmetric: bool = False
    per_channel: bool = False
    scale_dtype: str = "float32"

    def __post_init__(self) -> None:
        if self.bits not in VALID_BITS or isinstance(self.bits, bool):
            raise ValueError(f"bits must be one of {VALID_BITS}, got {self.bits!r}")
        if self.symmetric != self.per_channel:
            raise ValueError(f"{self.bits}-bit format: symmetric={self.symmetric}, per_channel="
                             f"{self.per_channel} has no quantizer (formats: group-wise asymmetric, "
                             "per-channel symmetric)")
        if self.scale_dtype not in VALID_SCALE_DTYPES:
            raise ValueError(f"scale_dtype must be one of {VALID_SCALE_DTYPES}, got {self.scale_dtype!r}")

    @property
    def scheme(self) -> str:
        """The :class:`~.spec.QuantSpec` scheme of this format."""
        return SYM_CHANNEL if self.symmetric else ASYM_GROUP

    @property
    def code_range(self) -> tuple[int, int]:
        """Smallest and largest integer code: ``(0, 2**b - 1)`` or ``(-(2**(b-1) - 1), 2**(b-1) - 1)``."""
        if self.symmetric:
            half = (1 << (self.bits - 1)) - 1
            return -half, half
        return 0, (1 << self.bits) - 1

    def spec(self, group_size: int, method: str = "rtn") -> QuantSpec:
        """The quantizer spec of this format: ``group_size`` applies to group-wise formats only."""
        if self.bits == 16:
            return QuantSpec(bits=16, group_size=group_size, method=method)
        return QuantSpec(bits=self.bits, group_size=None if self.per_channel else group_size,
                         scheme=self.scheme, method=method, scale_dtype=self.scale_dtype)

    def describe(self) -> str:
        """Short human-readable name, e.g. ``8-bit per-channel symmetric [-127, 127]``
        (``, float16 scales`` appended where the scales are float16)."""
        lo, hi = self.code_range
        layout = "per-channel symmetric" if self.per_channel else "group-wise asymmetric"
        scales = ", float16 scales" if self.scale_dtype == "float16" else ""
        return f"{self.bits}-bit {layout} [{lo}, {hi}]{scales}"

    def to_dict(self) -> dict[str, Any]:
        return {"bits": self.bits, "symmetric": self.symmetric, "per_channel": self.per_channel,
                "scale_dtype": self.scale_dtype}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> WeightFormat:
        """Rebuild a format from :meth:`to_dict` (declarations without ``scale_dtype``: float32)."""
        unknown = set(data) - {"bits", "symmetric", "per_channel", "scale_dtype"}
        if unknown:
            raise ValueError(f"unknown WeightFormat keys: {sorted(unknown)}")
        return cls(bits=data["bits"], symmetric=bool(data.get("symmetric", False)),
                   per_channel=bool(data.get("per_channel", False)),
                   scale_dtype=str(data.get("scale_dtype", "float32")))


def declare_formats(meta: MutableMapping[str, Any], formats: Iterable[WeightFormat]) -> None:
    """Record ``formats`` (one per bit-width) in a graph's ``meta``, replacing any earlier declaration."""
    meta[META_KEY] = {str(f.bits): f.to_dict() for f in sorted(formats, key=lambda f: f.bits)}


def declare_target_formats(meta: MutableMapping[str, Any], backend: Any) -> None:
    """Record ``backend.weight_formats`` in ``meta``; nothing without a backend or a declaration."""
    formats = getattr(backend, "weight_formats", None)
    if formats:
        declare_formats(meta, formats.values())


def declared_format(meta: Mapping[str, Any], bits: int) -> WeightFormat:
    """The format ``meta`` declares for ``bits``; group-wise asymmetric where nothing is declared."""
    entry = (meta.get(META_KEY) or {}).get(str(bits))
    return WeightFormat.from_dict(entry) if entry else WeightFormat(bits)
