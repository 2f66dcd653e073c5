"""Quantization specification shared by every quantizer, the passes and the backends.

A :class:`QuantSpec` says *how* one weight matrix is (or is not) quantized: its bit-width, the
size of the groups along the input dimension K that share one scale and zero point, the numeric
scheme and the method that chose the integer codes. It is immutable and serialisable, so it can
be stored in IR annotations and artifact manifests.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

VALID_BITS = (2, 3, 4, 8, 16)
"""Supported bit-widths; 16 means "keep the weight in floating point (not quantized)"."""

# the quantization group size along K of every target, compile, cost table and pass unless set
DEFAULT_GROUP_SIZE = 64
ASYM_GROUP = "affine-asym-v1"
SYM_CHANNEL = "sym-channel-v1"
VALID_SCHEMES = (ASYM_GROUP, SYM_CHANNEL)
"""Numeric schemes. ``affine-asym-v1``: per-group float32 scale and integer zero point in
``[0, 2**bits - 1]``, ``w ~ (q - zero) * scale``, groups of ``group_size`` along K.
``sym-channel-v1``: one float32 scale per output channel (``group_size`` is None), symmetric
narrow-range signed codes ``c`` in ``[-(2**(bits-1) - 1), 2**(bits-1) - 1]``, ``w ~ c * scale``;
stored like the affine scheme with ``q = c + 2**(bits-1)`` and every zero point ``2**(bits-1)``,
so ``(q - zero) * scale`` dequantizes both."""

VALID_SCALE_DTYPES = ("float32", "float16")
"""How the scales are stored. ``float16``: every scale is a value float16 represents exactly,
chosen by the quantizer (rounded *up* from the float32 scale, so a group's range still fits its
codes) and stored as float16 by the backend; half the scale bytes of ``float32``."""

VALID_METHODS = ("rtn", "gptq", "hqq")
"""Algorithms that choose the integer codes (``hqq`` optimises zero points: affine scheme only)."""

SPEC_VERSION = 1
"""Version written by :meth:`QuantSpec.to_dict`; bumped on incompatible changes."""


FIELDS = ("bits", "group_size", "scheme", "method", "scale_dtype")


def _is_int(value: Any) -> bool:
    """True for a real ``int`` (``bool`` excluded)."""
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass(frozen=True)
class QuantSpec:
    """How one weight tensor is quantized.

    Attributes:
        bits: Bit-width of the integer codes, one of :data:`VALID_BITS`; 16 = not quantized.
        group_size: Number of consecutive input-dimension (K) elements sharing one scale and
            zero point; a positive integer (typically 32, 64 or 128), or None (required) for the
            per-output-channel scheme ``sym-channel-v1``.
        scheme: Numeric scheme, one of :data:`VALID_SCHEMES`.
        method: Algorithm producing the codes, one of :data:`VALID_METHODS`.
        scale_dtype: How the scales are stored, one of :data:`VALID_SCALE_DTYPES`.

    Raises:
        ValueError: On construction, if any field is invalid.
    """

    bits: int
    group_size: int | None = 128
    scheme: str = ASYM_GROUP
    method: str = "rtn"
    scale_dtype: str = "float32"

    def __post_init__(self) -> None:
        if not _is_int(self.bits) or self.bits not in VALID_BITS:
            raise ValueError(f"bits must be one of {VALID_BITS}, got {self.bits!r}")
        if self.scheme not in VALID_SCHEMES:
            raise ValueError(f"scheme must be one of {VALID_SCHEMES}, got {self.scheme!r}")
        if self.scheme == SYM_CHANNEL:
            if self.group_size is not None:
                raise ValueError(f"scheme {SYM_CHANNEL} is per output channel: group_size must be None, "
                                 f"got {self.group_size!r}")
        elif not _is_int(self.group_size) or self.group_size < 1:
            raise ValueError(f"group_size must be a positive int, got {self.group_size!r}")
        if self.method not in VALID_METHODS:
            raise ValueError(f"method must be one of {VALID_METHODS}, got {self.method!r}")
        if self.scale_dtype not in VALID_SCALE_DTYPES:
            raise ValueError(f"scale_dtype must be one of {VALID_SCALE_DTYPES}, got {self.scale_dtype!r}")

    @property
    def is_quantized(self) -> bool:
        """False for the 16-bit "keep in floating point" spec."""
        return self.bits != 16

    @property
    def qmax(self) -> int:
        """Largest stored integer code, ``2**bits - 1`` (only meaningful when quantized)."""
        return (1 << self.bits) - 1

    @property
    def symmetric(self) -> bool:
        """Codes centred on zero (no zero point): scheme ``sym-channel-v1``."""
        return self.scheme == SYM_CHANNEL

    @property
    def per_channel(self) -> bool:
        """One scale per output channel instead of per group along K."""
        return self.group_size is None

    def group_len(self, k: int) -> int:
        """Columns sharing one scale in a weight with ``k`` input features (``k`` when per channel)."""
        return k if self.group_size is None else self.group_size

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict including a ``version`` field (``scale_dtype`` only when not float32,
        so the dicts of float32 specs read as before).

        Postconditions:
            ``QuantSpec.from_dict(spec.to_dict()) == spec``.
        """
        out = {
            "version": SPEC_VERSION,
            "bits": self.bits,
            "group_size": self.group_size,
            "scheme": self.scheme,
            "method": self.method,
        }
        if self.scale_dtype != "float32":
            out["scale_dtype"] = self.scale_dtype
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> QuantSpec:
        """Rebuild a spec written by :meth:`to_dict`.

        Args:
            data: Mapping with ``version`` (must be :data:`SPEC_VERSION`), ``bits`` and
                optionally ``group_size``, ``scheme``, ``method``, ``scale_dtype``.

        Raises:
            TypeError: ``data`` is not a mapping.
            ValueError: Unknown version, unknown keys, missing ``bits`` or invalid values.
        """
        if not isinstance(data, Mapping):
            raise TypeError(f"QuantSpec.from_dict expects a mapping, got {type(data).__name__}")
        version = data.get("version")
        if version != SPEC_VERSION:
            raise ValueError(f"unsupported QuantSpec version {version!r} (expected {SPEC_VERSION})")
        unknown = set(data) - {"version", *FIELDS}
        if unknown:
            raise ValueError(f"unknown QuantSpec keys: {sorted(unknown)}")
        if "bits" not in data:
            raise ValueError("QuantSpec dict is missing 'bits'")
        fields = {k: data[k] for k in FIELDS if k in data}
        return cls(**fields)
