"""Round-to-nearest (RTN) quantization of linear weights: group-wise affine asymmetric, or
per-output-channel symmetric.

Format (scheme ``affine-asym-v1``). A weight ``W`` of shape ``[N, K]`` (out_features N,
in_features K, as ``nn.Linear`` stores it; optional leading batch axes ``[*B, N, K]`` are
allowed, e.g. stacked experts) is split along K into ``G = ceil(K / group_size)`` groups of
``group_size`` consecutive columns. Per row and group::

    lo = min(min(w), 0)      hi = max(max(w), 0)         # range always contains 0
    S  = (hi - lo) / (2**b - 1)      (S := 1 when hi == lo, i.e. an all-zero group)
    Z  = clamp(round(-lo / S), 0, 2**b - 1)              # integer zero point
    q  = clamp(round(w / S + Z), 0, 2**b - 1)            # integer code
    w' = (q - Z) * S                                     # dequantized value

Extending the range to contain 0 keeps the integer zero point inside ``[0, 2**b - 1]`` (as
ONNX Runtime ``MatMulNBits`` requires) and guarantees ``|w - w'| <= S / 2`` for every element,
including constant and negative-only groups.

Ragged K: when K is not a multiple of ``group_size`` the last group is *edge-padded*: the
last real column is repeated up to the group size. Repeated values lie inside the group's own
range, so its scale and zero point equal those computed over the real columns alone; the
padded codes are dropped, so ``q`` always has exactly K columns. Rounding is half-to-even
(``torch.round``). All arithmetic is float32 on the input's device.

Scheme ``sym-channel-v1`` (``QuantSpec.group_size`` None): one group per row spanning all of K,
``qs = 2**(b-1) - 1`` (127 at 8 bits)::

    S = max(|w|) / qs        (S := 1 for an all-zero row)
    c = clamp(round(w / S), -qs, qs)                     # signed code, narrow range
    w' = c * S

stored as ``q = c + 2**(b-1)`` with zero point ``2**(b-1)``, so :func:`dequantize`'s
``(q - Z) * S`` serves both schemes (see :mod:`.spec`).

Float16 scales (``QuantSpec.scale_dtype == "float16"``): each scale ``S`` above is rounded *up*
to the next value float16 represents (:func:`round_scales`) before ``Z`` and ``q`` are computed
from it, so the range still fits the codes (``|w - w'| <= S / 2`` holds with the rounded ``S``)
and the backend stores exactly the scale the codes were made with. Scales above float16's
largest value (65504: weights around a million) are refused.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from dmpq_compile.quant.spec import ASYM_GROUP, VALID_SCALE_DTYPES, QuantSpec

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def num_groups(k: int, group_size: int) -> int:
    """Number of groups ``ceil(k / group_size)`` along K (pre: ``k >= 1``, ``group_size >= 1``)."""
    return -(-k // group_size)


def check_weight(w: torch.Tensor, name: str = "w", finite: bool = True) -> None:
    """Validate a weight tensor before quantization.

    ``finite=False`` skips the scan for NaN and Inf values (a full pass over ``w``); callers
    that compute every group's min and max anyway check those instead (:func:`check_finite`).

    Raises:
        TypeError: ``w`` is not a torch tensor or not float32/float16/bfloat16.
        ValueError: ``w`` has fewer than 2 dims, an empty axis, or non-finite values.
    """
    if not isinstance(w, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(w).__name__}")
    if w.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float32/float16/bfloat16, got {w.dtype}")
    if w.dim() < 2:
        raise ValueError(f"{name} must have shape [N, K] (or [*B, N, K]), got {tuple(w.shape)}")
    if w.numel() == 0:
        raise ValueError(f"{name} must not be empty, got shape {tuple(w.shape)}")
    if finite and not bool(torch.isfinite(w).all()):
        raise ValueError(f"{name} contains NaN or Inf values")


def check_finite(*extrema: torch.Tensor, name: str = "w") -> None:
    """Raise when a group's minimum or maximum (``extrema``, small ``[..., G]`` tensors) is NaN or
    Inf: min and max propagate both, so this is :func:`check_weight`'s scan at a group's cost."""
    if not all(bool(torch.isfinite(t).all()) for t in extrema):
        raise ValueError(f"{name} contains NaN or Inf values")


def _check_bits_group(bits: int, group_size: int) -> None:
    """Validate ``bits``/``group_size`` with the same messages as :class:`QuantSpec`."""
    QuantSpec(bits=bits, group_size=group_size)


def pad_to_groups(w: torch.Tensor, group_size: int) -> torch.Tensor:
    """Edge-pad the last axis to a multiple of ``group_size`` and split it into groups.

    Args:
        w: ``[..., K]`` tensor (any dtype; differentiable).
        group_size: Group length along K.

    Returns:
        ``[..., G, group_size]`` view/copy; padded entries repeat the last real column.
    """
    k = w.shape[-1]
    pad = num_groups(k, group_size) * group_size - k
    if pad:
        w = torch.cat([w, w[..., -1:].expand(*w.shape[:-1], pad)], dim=-1)
    return w.reshape(*w.shape[:-1], -1, group_size)


FLOAT16_MAX = 65504.0


def round_scales(scale: torch.Tensor, scale_dtype: str = "float32") -> torch.Tensor:
    """``scale`` as stored in ``scale_dtype``: unchanged for float32; for float16, each value
    rounded up to the nearest value float16 represents (float32 tensor out).

    Raises:
        ValueError: A scale above float16's largest finite value.
    """
    if scale_dtype == "float32":
        return scale
    if scale_dtype not in VALID_SCALE_DTYPES:
        raise ValueError(f"scale_dtype must be one of {VALID_SCALE_DTYPES}, got {scale_dtype!r}")
    big = float(scale.max()) if scale.numel() else 0.0
    if big > FLOAT16_MAX:
        raise ValueError(f"a quantization scale of {big:.4g} exceeds float16's range ({FLOAT16_MAX:g}): the "
                         "weights are too large for float16 scales")
    half = scale.to(torch.float16)
    low = half.to(torch.float32) < scale
    if bool(low.any()):
        half = torch.where(low, torch.nextafter(half, torch.full_like(half, float("inf"))), half)
    return half.to(torch.float32)


def affine_params(wg: torch.Tensor, bits: int, scale_dtype: str = "float32") -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and integer zero point of each group (min/max over the last axis).

    Args:
        wg: ``[..., M]`` float tensor; each slice along the last axis is one group.
        bits: Bit-width in 1..8.
        scale_dtype: ``float16`` rounds each scale up to a float16 value (:func:`round_scales`)
            before the zero point is computed from it.

    Returns:
        ``(scale, zero)``, both float32 ``[...]``; ``scale > 0`` and ``zero`` is an integer
        in ``[0, 2**bits - 1]`` (stored as float).
    """
    qmax = float((1 << bits) - 1)
    wg = wg.detach().to(torch.float32)
    lo = wg.amin(dim=-1).clamp(max=0.0)
    hi = wg.amax(dim=-1).clamp(min=0.0)
    check_finite(lo, hi)
    scale = (hi - lo) / qmax
    scale = round_scales(torch.where(scale > 0, scale, torch.ones_like(scale)), scale_dtype)
    zero = torch.round(-lo / scale).clamp(0.0, qmax)
    return scale, zero


def symmetric_params(wg: torch.Tensor, bits: int, scale_dtype: str = "float32") -> tuple[torch.Tensor, torch.Tensor]:
    """Scale ``max|w| / (2**(bits-1) - 1)`` and the fixed stored zero point ``2**(bits-1)`` per group.

    Args:
        wg: ``[..., M]`` float tensor; each slice along the last axis is one group (a whole row
            for per-channel formats).
        bits: Bit-width in 2..8.
        scale_dtype: ``float16`` rounds each scale up to a float16 value (:func:`round_scales`).

    Returns:
        ``(scale, zero)``, float32 ``[...]``; ``scale > 0``.
    """
    half = float((1 << (bits - 1)) - 1)
    amax = wg.detach().to(torch.float32).abs().amax(dim=-1)
    check_finite(amax)
    scale = round_scales(torch.where(amax > 0, amax / half, torch.ones_like(amax)), scale_dtype)
    return scale, torch.full_like(scale, float(1 << (bits - 1)))


def symmetric_codes(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int) -> torch.Tensor:
    """Stored codes ``clamp(round(w / scale), -qs, qs) + zero`` (float32; ``zero = 2**(bits-1)``).

    The signed code is rounded before the offset is added, so no precision is lost to it.
    """
    half = float((1 << (bits - 1)) - 1)
    return (w.to(torch.float32) / scale).round_().clamp_(-half, half).add_(zero)


def grid_params(wg: torch.Tensor, bits: int, symmetric: bool = False, scale_dtype: str = "float32"
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`symmetric_params` or :func:`affine_params`."""
    return symmetric_params(wg, bits, scale_dtype) if symmetric else affine_params(wg, bits, scale_dtype)


def grid_codes(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int,
               symmetric: bool = False) -> torch.Tensor:
    """:func:`symmetric_codes` or :func:`quantize_codes` (stored codes, float32)."""
    return symmetric_codes(w, scale, zero, bits) if symmetric else quantize_codes(w, scale, zero, bits)


def clip_search_params(
    wg: torch.Tensor, bits: int, n_grid: int = 20, min_ratio: float = 0.5, symmetric: bool = False,
    scale_dtype: str = "float32",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Like :func:`grid_params`, but shrinks each group's range to minimise squared error.

    Tries the ranges ``[r * lo, r * hi]`` for ``n_grid`` ratios ``r`` evenly spaced from 1
    down to ``min_ratio`` (``r = 1`` is the plain RTN range) and keeps, per group, the
    ``(scale, zero)`` whose rounded-and-clamped reconstruction has the smallest squared error.

    Args:
        wg: ``[..., M]`` float tensor; each slice along the last axis is one group.
        bits: Bit-width in 1..8.
        n_grid: Number of ratios (``>= 1``).
        min_ratio: Smallest ratio, in ``(0, 1]``.
        symmetric: Search symmetric ranges ``[-r * max|w|, r * max|w|]`` instead.
        scale_dtype: The scales' storage (``float16``: every candidate's scale is rounded up
            to a float16 value before its error is measured).

    Returns:
        ``(scale, zero)`` float32 ``[...]`` in the same format as :func:`grid_params`; the
        error is never larger than with :func:`grid_params`.
    """
    if n_grid < 1 or not 0 < min_ratio <= 1:
        raise ValueError(f"need n_grid >= 1 and 0 < min_ratio <= 1, got {n_grid}, {min_ratio}")
    wg = wg.detach().to(torch.float32)
    ratios = torch.linspace(1.0, min_ratio, n_grid)
    # several ratios per step ([R, ..., M] at once, up to _CLIP_SEARCH_ELEMENTS): GPTQ calls this
    # once per group of every weight, where one ratio at a time was a third of its time
    step = max(1, _CLIP_SEARCH_ELEMENTS // max(1, wg.numel()))
    best_s, best_z, best_e = None, None, None
    for r0 in range(0, n_grid, step):
        r = ratios[r0:r0 + step].view(-1, *([1] * wg.dim()))  # [R, 1, ..., 1]
        scale, zero = grid_params(wg * r, bits, symmetric, scale_dtype)  # [R, ...]
        q = grid_codes(wg, scale[..., None], zero[..., None], bits, symmetric)
        err = (((q - zero[..., None]) * scale[..., None] - wg) ** 2).sum(dim=-1)  # [R, ...]
        first = err.argmin(dim=0, keepdim=True)  # the first of equal errors, as one ratio at a time
        err, scale, zero = (t.gather(0, first)[0] for t in (err, scale, zero))
        if best_e is None:
            best_s, best_z, best_e = scale, zero, err
            continue
        better = err < best_e
        best_s, best_z = torch.where(better, scale, best_s), torch.where(better, zero, best_z)
        best_e = torch.where(better, err, best_e)
    return best_s, best_z


_CLIP_SEARCH_ELEMENTS = 1 << 22  # weights x ratios per step of clip_search_params (16 MB of float32)


def quantize_codes(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int) -> torch.Tensor:
    """Integer codes ``clamp(round(w / scale + zero), 0, 2**bits - 1)`` (as float32).

    Shapes broadcast: e.g. ``w [..., M]`` with ``scale``/``zero`` ``[..., 1]``.
    """
    qmax = float((1 << bits) - 1)
    return (w.to(torch.float32) / scale).add_(zero).round_().clamp_(0.0, qmax)  # in place: the same values


@dataclass(frozen=True, eq=False)
class QuantizedTensor:
    """Quantized weight in the format of ``spec.scheme`` (see module docstring).

    Attributes:
        q: uint8 codes ``[*B, N, K]``, each in ``[0, 2**bits - 1]`` (unpacked, one per byte;
            symmetric schemes: ``[1, 2**bits - 1]``, the signed code plus ``2**(bits-1)``).
        scale: float32 ``[*B, N, G]``, strictly positive (``G = 1`` per channel).
        zero: uint8 ``[*B, N, G]``, each in ``[0, 2**bits - 1]`` (symmetric: all ``2**(bits-1)``).
        spec: The :class:`QuantSpec` used (``bits < 16``).
        shape: Original weight shape ``(*B, N, K)``.

    Raises:
        TypeError / ValueError: On construction, if dtypes, shapes or ranges are inconsistent.
    """

    q: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor
    spec: QuantSpec
    shape: tuple[int, ...]

    def __post_init__(self) -> None:
        _validate_qt(self)

    @property
    def num_groups(self) -> int:
        """Number of groups G along K (1 per channel)."""
        return num_groups(self.shape[-1], self.spec.group_len(self.shape[-1]))


def _validate_qt(qt: QuantizedTensor) -> None:
    """Check dtypes, shapes and code ranges of a :class:`QuantizedTensor`."""
    if not isinstance(qt.spec, QuantSpec) or not qt.spec.is_quantized:
        raise ValueError(f"QuantizedTensor needs a QuantSpec with bits < 16, got {qt.spec!r}")
    for name, t, dt in (
        ("q", qt.q, torch.uint8),
        ("scale", qt.scale, torch.float32),
        ("zero", qt.zero, torch.uint8),
    ):
        if not isinstance(t, torch.Tensor) or t.dtype != dt:
            raise TypeError(f"QuantizedTensor.{name} must be a {dt} tensor, got {getattr(t, 'dtype', t)}")
    shape = tuple(qt.shape)
    if len(shape) < 2 or 0 in shape or tuple(qt.q.shape) != shape:
        raise ValueError(f"q shape {tuple(qt.q.shape)} does not match shape {shape}")
    gshape = (*shape[:-1], num_groups(shape[-1], qt.spec.group_len(shape[-1])))
    if tuple(qt.scale.shape) != gshape or tuple(qt.zero.shape) != gshape:
        raise ValueError(
            f"scale/zero must have shape {gshape}, got {tuple(qt.scale.shape)} / {tuple(qt.zero.shape)}"
        )
    qmax = qt.spec.qmax
    if int(qt.q.max()) > qmax or int(qt.zero.max()) > qmax:
        raise ValueError(f"codes or zero points exceed {qmax} for {qt.spec.bits}-bit quantization")
    if qt.spec.symmetric and (int(qt.q.min()) < 1 or bool((qt.zero != 1 << (qt.spec.bits - 1)).any())):
        raise ValueError(f"{qt.spec.scheme}: stored codes must lie in [1, {qmax}] and zero points equal "
                         f"{1 << (qt.spec.bits - 1)}")
    if not bool((qt.scale > 0).all()) or not bool(torch.isfinite(qt.scale).all()):
        raise ValueError("QuantizedTensor.scale must be finite and strictly positive")
    if qt.spec.scale_dtype == "float16" and not bool((qt.scale.to(torch.float16).to(torch.float32) == qt.scale).all()):
        raise ValueError("QuantizedTensor.scale holds values float16 cannot represent, but the spec stores "
                         "float16 scales; quantize with this spec (round_scales)")


def quantize(w: torch.Tensor, spec: QuantSpec) -> QuantizedTensor:
    """Round-to-nearest quantization of ``w`` in ``spec``'s scheme (group-wise affine or per-channel
    symmetric).

    Args:
        w: Float weight ``[N, K]`` (or ``[*B, N, K]``), float32/float16/bfloat16, finite.
        spec: Quantization spec with ``bits < 16`` (``spec.method`` is recorded as given).

    Returns:
        :class:`QuantizedTensor` on ``w``'s device with ``shape == tuple(w.shape)``.

    Raises:
        TypeError / ValueError: Bad ``w`` (see :func:`check_weight`) or a 16-bit spec.
    """
    check_weight(w, finite=False)  # NaN/Inf: checked on each group's min and max (grid_params)
    if not isinstance(spec, QuantSpec) or not spec.is_quantized:
        raise ValueError(f"quantize needs a QuantSpec with bits < 16, got {spec!r}")
    k = w.shape[-1]
    fast = _native(w, spec, codes=True)
    if fast is not None:
        scale, zero, q, _ = fast
        return QuantizedTensor(q=q, scale=scale, zero=zero.to(torch.uint8), spec=spec, shape=tuple(w.shape))
    wg = pad_to_groups(w.detach().to(torch.float32), spec.group_len(k))  # [*B, N, G, gs]
    scale, zero = grid_params(wg, spec.bits, spec.symmetric, spec.scale_dtype)  # [*B, N, G]
    q = grid_codes(wg, scale[..., None], zero[..., None], spec.bits, spec.symmetric)  # [*B, N, G, gs]
    q = q.reshape(*w.shape[:-1], -1)[..., :k]  # [*B, N, K]
    return QuantizedTensor(
        q=q.to(torch.uint8), scale=scale, zero=zero.to(torch.uint8), spec=spec, shape=tuple(w.shape)
    )


def _native(w: torch.Tensor, spec: QuantSpec, codes: bool = False, fake: bool = False):
    """The group-wise affine RTN of ``w`` (checked by :func:`check_weight`) in C++ (:mod:`.native`: the same
    values in one pass per group), or None where it does not run: symmetric schemes, or no library (the torch
    path then runs, and raises)."""
    if spec.symmetric:
        return None
    from . import native

    return native.affine(w, spec.group_len(w.shape[-1]), spec.bits, spec.scale_dtype == "float16", codes, fake)


def dequantize(qt: QuantizedTensor) -> torch.Tensor:
    """Reconstruct float32 weights ``(q - zero) * scale`` of shape ``qt.shape``.

    Pre: ``qt`` is a valid :class:`QuantizedTensor`. Post: float32 ``[*B, N, K]`` on
    ``qt.q``'s device.
    """
    if not isinstance(qt, QuantizedTensor):
        raise TypeError(f"dequantize expects a QuantizedTensor, got {type(qt).__name__}")
    k = qt.shape[-1]
    qg = pad_to_groups(qt.q.to(torch.float32), qt.spec.group_len(k))  # [*B, N, G, gs]
    w = (qg - qt.zero.to(torch.float32)[..., None]) * qt.scale[..., None]
    return w.reshape(*qt.shape[:-1], -1)[..., :k].contiguous()  # [*B, N, K]


def fake_quantize(w: torch.Tensor, bits: int, group_size: int) -> torch.Tensor:
    """Quantize then dequantize ``w`` (no gradient through the rounding).

    Args:
        w: Float weight ``[N, K]`` or ``[*B, N, K]``.
        bits: One of 2, 3, 4, 8, or 16 (identity: ``w`` itself is returned).
        group_size: Group length along K.

    Returns:
        Tensor with ``w``'s shape, dtype and device.
    """
    _check_bits_group(bits, group_size)
    return fake_quantize_spec(w, QuantSpec(bits=bits, group_size=group_size))


def fake_quantize_spec(w: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """Quantize then dequantize ``w`` in ``spec``'s format (RTN; ``w`` itself when ``bits == 16``).

    Returns:
        Tensor with ``w``'s shape, dtype and device.
    """
    if not spec.is_quantized:
        return w
    # dequantize(quantize(w, spec)) without the uint8 round trip and its validation: the codes and
    # zero points are small integers in float32 either way, so the values are identical (tested)
    check_weight(w, finite=False)
    k = w.shape[-1]
    fast = _native(w, spec, fake=True)
    if fast is not None:
        return fast[3].to(w.dtype)
    wg = pad_to_groups(w.detach().to(torch.float32), spec.group_len(k))  # [*B, N, G, gs]
    scale, zero = grid_params(wg, spec.bits, spec.symmetric, spec.scale_dtype)  # checks NaN/Inf
    scale, zero = scale[..., None], zero[..., None]
    out = grid_codes(wg, scale, zero, spec.bits, spec.symmetric).sub_(zero).mul_(scale)
    return out.reshape(*w.shape[:-1], -1)[..., :k].contiguous().to(w.dtype)


def fake_quantize_change(w: torch.Tensor, spec: QuantSpec, cast: torch.dtype, fake: bool = False
                         ) -> tuple[torch.Tensor, torch.Tensor | None, float]:
    """``(change, fake, sum of squares)``: ``fake_quantize_spec(w, spec) - w`` with both in float32, rounded to
    ``cast``; the fake-quantized weights in ``cast`` when ``fake`` (else None); the sum of the squared float32
    changes. What pricing a quantization with products in ``cast`` needs of it (the sensitivity pass); in one
    native pass per row for bf16 and the group-wise affine formats (:func:`.native.affine_change`, the same
    values; the sum to float rounding), else in torch."""
    if spec.is_quantized and not spec.symmetric and cast == torch.bfloat16:
        check_weight(w, finite=False)
        from . import native

        out = native.affine_change(w, spec.group_len(w.shape[-1]), spec.bits, spec.scale_dtype == "float16", fake)
        if out is not None:
            return out
    w32 = w.detach().to(torch.float32)
    wq = fake_quantize_spec(w32, spec)
    d = wq - w32
    flat = d.reshape(-1)
    # a BLAS dot: 10x a float64 sum of squares, about 1e-5 relative on a 2M-weight matrix
    return d.to(cast), wq.to(cast) if fake else None, float(torch.dot(flat, flat))


def init_scale_multiplier(w: torch.Tensor, group_size: int) -> torch.nn.Parameter:
    """Learnable per-group scale multiplier (all ones) for :func:`fake_quantize_ste`.

    Returns:
        float32 ``nn.Parameter`` of shape ``[*B, N, G]`` on ``w``'s device.
    """
    check_weight(w)
    _check_bits_group(8, group_size)
    shape = (*w.shape[:-1], num_groups(w.shape[-1], group_size))
    return torch.nn.Parameter(torch.ones(shape, dtype=torch.float32, device=w.device))


def _round_ste(x: torch.Tensor) -> torch.Tensor:
    """``round(x)`` in the forward pass, identity gradient in the backward pass."""
    return x + (torch.round(x) - x).detach()


def _scale_grad(x: torch.Tensor, g: float) -> torch.Tensor:
    """Value of ``x`` in the forward pass, gradient multiplied by ``g`` (LSQ grad scaling)."""
    return (x - x * g).detach() + x * g


def _lsq_fake_quantize(
    w: torch.Tensor, bits: int, group_size: int, scale_mult: torch.Tensor, grad_scale: float | None
) -> torch.Tensor:
    """LSQ-style fake quantization with a learnable scale multiplier (float32 out).

    The RTN scale ``S`` and zero point ``Z`` are computed from ``w.detach()``; the effective
    scale is ``S * scale_mult``. Gradients: straight-through for ``round``, zero for codes
    clamped at ``0``/``2**bits - 1``, and a full gradient into ``scale_mult``.
    """
    expected = (*w.shape[:-1], num_groups(w.shape[-1], group_size))
    if tuple(scale_mult.shape) != expected:
        raise ValueError(f"scale_mult must have shape {expected} ([*B, N, G]), got {tuple(scale_mult.shape)}")
    if not scale_mult.is_floating_point():
        raise TypeError(f"scale_mult must be a float tensor, got {scale_mult.dtype}")
    k, qmax = w.shape[-1], float((1 << bits) - 1)
    wg = pad_to_groups(w.to(torch.float32), group_size)  # [*B, N, G, gs]
    base_scale, zero = affine_params(wg, bits)  # [*B, N, G]
    if grad_scale is None:
        grad_scale = 1.0 / math.sqrt(wg.shape[-1] * qmax)
    mult = _scale_grad(scale_mult.to(torch.float32), grad_scale)
    s = (base_scale * mult)[..., None]  # [*B, N, G, 1]
    z = zero[..., None]
    q = torch.clamp(_round_ste(wg / s + z), 0.0, qmax)
    return ((q - z) * s).reshape(*w.shape[:-1], -1)[..., :k]


def fake_quantize_ste(
    w: torch.Tensor,
    bits: int,
    group_size: int,
    scale_mult: torch.Tensor | None = None,
    grad_scale: float | None = None,
    spec: QuantSpec | None = None,
) -> torch.Tensor:
    """Differentiable fake quantization for quantization-aware training.

    Without ``scale_mult``: ``w + (fake_quantize(w) - w).detach()``, i.e. the forward value
    is the RTN fake-quantized weight and ``d out / d w`` is the identity (straight-through).

    With ``scale_mult`` (LSQ-style, Esser et al. 2020): a float tensor ``[*B, N, G]`` (see
    :func:`init_scale_multiplier`) multiplying each group's RTN scale; it receives gradients
    (scaled by ``grad_scale``, default ``1 / sqrt(group_size * (2**bits - 1))``), and
    gradients to ``w`` are zeroed where codes are clamped.

    Args:
        w: Float weight ``[N, K]`` or ``[*B, N, K]``.
        bits: 2, 3, 4, 8, or 16 (returns ``w`` unchanged).
        group_size: Group length along K.
        scale_mult: Optional learnable scale multiplier ``[*B, N, G]``.
        grad_scale: Optional LSQ gradient scale for ``scale_mult``.
        spec: The target's format for these bits (e.g. per-channel symmetric INT8, see
            :mod:`~dmpq_compile.quant.formats`); None is group-wise asymmetric at ``bits`` and
            ``group_size``. Learnable scales exist for the group-wise asymmetric format only.

    Returns:
        Tensor with ``w``'s shape and dtype, connected to the autograd graph.
    """
    _check_bits_group(bits, group_size)
    if bits == 16:
        return w
    check_weight(w)
    if spec is not None and spec.scheme != ASYM_GROUP and scale_mult is not None:
        raise ValueError(f"learnable scale multipliers need the group-wise asymmetric format, not {spec.scheme!r}")
    if scale_mult is None:
        fq = fake_quantize(w.detach(), bits, group_size) if spec is None else fake_quantize_spec(w.detach(), spec)
        return w + (fq - w).detach()
    return _lsq_fake_quantize(w, bits, group_size, scale_mult, grad_scale).to(w.dtype)
