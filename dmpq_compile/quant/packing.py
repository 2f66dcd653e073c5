"""Bit packing of integer codes into byte streams (numpy in, numpy out).

Bit order (LSB-first). Along the last axis the codes ``q[0], q[1], ..., q[K-1]`` (each
``bits`` wide) are concatenated into one little-endian bit stream: code ``j`` occupies stream
bits ``[j * bits, (j + 1) * bits)``, its least significant bit first. Stream bit ``i`` is
bit ``i % 8`` (value ``1 << (i % 8)``) of byte ``i // 8``. Codes may straddle byte
boundaries (e.g. 3-bit code 2 uses bits 6..7 of byte 0 and bit 0 of byte 1). The last byte is
zero-filled, giving ``ceil(K * bits / 8)`` bytes per row.

Examples: 4-bit: ``byte[i] = q[2i] | q[2i+1] << 4`` (low nibble first); 2-bit:
``byte[i] = q[4i] | q[4i+1] << 2 | q[4i+2] << 4 | q[4i+3] << 6``; 8-bit: identity.

This is the ONNX Runtime ``MatMulNBits`` layout: with codes of shape
``[N, n_blocks, block_size]`` (K padded to whole blocks), ``pack_bits(q, bits)`` yields the
``B`` initializer ``[N, n_blocks, block_size * bits / 8]``, and ``pack_bits(zero, bits)`` on
``[N, n_blocks]`` yields its packed zero points ``[N, ceil(n_blocks * bits / 8)]``.
"""

from __future__ import annotations

from typing import Any

import numpy as np

_CHUNK = 8  # 8 codes of b bits fill exactly b bytes; at most 64 bits fit a uint64


def packed_size(k: int, bits: int) -> int:
    """Bytes needed for ``k`` codes of ``bits`` bits: ``ceil(k * bits / 8)``."""
    return -(-k * bits // 8)


def _to_numpy(x: Any, name: str) -> np.ndarray:
    """Convert a numpy array or torch tensor (any device) to a numpy array."""
    if isinstance(x, (np.ndarray, np.generic)):
        return np.asarray(x)
    if type(x).__module__.startswith("torch"):
        return x.detach().cpu().numpy()
    raise TypeError(f"{name} must be a numpy array or torch tensor, got {type(x).__name__}")


def _check_bits(bits: int) -> None:
    """Raise ``ValueError`` unless ``bits`` is an int in 1..8."""
    if isinstance(bits, bool) or not isinstance(bits, (int, np.integer)) or not 1 <= bits <= 8:
        raise ValueError(f"bits must be an int in 1..8, got {bits!r}")


def _check_codes(q: np.ndarray, bits: int) -> np.ndarray:
    """Validate integer codes (``ndim >= 1``, values in ``[0, 2**bits)``); return as uint8."""
    if q.ndim < 1:
        raise ValueError("q must have at least one axis [..., K], got a scalar")
    if not np.issubdtype(q.dtype, np.integer):
        raise TypeError(f"q must have an integer dtype (uint8 preferred), got {q.dtype}")
    if q.size and (int(q.min()) < 0 or int(q.max()) >= (1 << bits)):
        raise ValueError(
            f"q values must lie in [0, {(1 << bits) - 1}] for {bits}-bit packing, "
            f"got range [{int(q.min())}, {int(q.max())}]"
        )
    return q.astype(np.uint8, copy=False)


def pack_bits(q: Any, bits: int) -> np.ndarray:
    """Pack integer codes along the last axis, LSB-first (see module docstring).

    Args:
        q: Integer array ``[..., K]`` (numpy or torch), values in ``[0, 2**bits - 1]``.
        bits: Code width, 1..8.

    Returns:
        uint8 numpy array ``[..., ceil(K * bits / 8)]``.

    Raises:
        TypeError: Non-integer dtype or unsupported container.
        ValueError: Bad ``bits``, a scalar input, or values out of range.
    """
    _check_bits(bits)
    q = _check_codes(_to_numpy(q, "q"), bits)
    if 8 % bits == 0:
        return _pack_whole_bytes(q, bits)
    return _pack_general(q, bits)


def _pack_general(q: np.ndarray, bits: int) -> np.ndarray:
    """:func:`pack_bits` for any width 1..8 on validated uint8 codes: 8 codes to a uint64 word."""
    *lead, k = q.shape
    n_chunks = -(-k // _CHUNK)
    padded = np.zeros((*lead, n_chunks * _CHUNK), dtype=np.uint64)  # [..., C*8]
    padded[..., :k] = q
    codes = padded.reshape(*lead, n_chunks, _CHUNK)  # [..., C, 8]
    shifts = np.arange(_CHUNK, dtype=np.uint64) * np.uint64(bits)
    words = np.bitwise_or.reduce(codes << shifts, axis=-1)  # [..., C], 8*bits bits used
    byte_shifts = np.arange(bits, dtype=np.uint64) * np.uint64(8)
    out = ((words[..., None] >> byte_shifts) & np.uint64(0xFF)).astype(np.uint8)  # [..., C, bits]
    return np.ascontiguousarray(out.reshape(*lead, n_chunks * bits)[..., : packed_size(k, bits)])


def _unpack_whole_bytes(packed: np.ndarray, bits: int, k: int) -> np.ndarray:
    """:func:`unpack_bits` for widths that divide 8: each byte's ``8 // bits`` codes, LSB first, in uint8 (the
    general path widens every byte to uint64: at an OLMoE expert's 4-bit matrix several times slower, with the
    same codes)."""
    per = 8 // bits
    if per == 1:
        return np.ascontiguousarray(packed[..., :k])
    *lead, nbytes = packed.shape
    out = np.empty((*lead, nbytes, per), dtype=np.uint8)
    mask = np.uint8((1 << bits) - 1)
    for i in range(per):
        np.bitwise_and(packed >> np.uint8(i * bits), mask, out=out[..., i])
    return np.ascontiguousarray(out.reshape(*lead, nbytes * per)[..., :k])


def _pack_whole_bytes(q: np.ndarray, bits: int) -> np.ndarray:
    """:func:`pack_bits` for widths that divide 8 (1, 2, 4, 8): ``8 // bits`` codes per byte,
    combined in uint8 (the general path widens every code to uint64; at OLMoE widths this is
    several times faster, with the same bytes)."""
    per = 8 // bits
    *lead, k = q.shape
    if per == 1:
        return np.ascontiguousarray(q)
    pad = -k % per
    if pad:
        q = np.concatenate([q, np.zeros((*lead, pad), dtype=np.uint8)], axis=-1)
    codes = q.reshape(*lead, q.shape[-1] // per, per)
    out = codes[..., 0].copy()
    for i in range(1, per):
        out |= codes[..., i] << np.uint8(i * bits)
    return out


def unpack_bits(packed: Any, bits: int, k: int) -> np.ndarray:
    """Inverse of :func:`pack_bits`: recover ``k`` codes per row.

    Args:
        packed: uint8 array ``[..., ceil(k * bits / 8)]`` (numpy or torch).
        bits: Code width, 1..8.
        k: Number of codes per row (``k >= 0``).

    Returns:
        uint8 numpy array ``[..., k]``, values in ``[0, 2**bits - 1]``.

    Postconditions:
        ``unpack_bits(pack_bits(q, b), b, q.shape[-1]) == q`` for valid ``q``.

    Raises:
        TypeError / ValueError: Non-uint8 input, bad ``bits``/``k`` or a wrong last-axis length.
    """
    _check_bits(bits)
    packed = _to_numpy(packed, "packed")
    if packed.dtype != np.uint8 or packed.ndim < 1:
        raise TypeError(f"packed must be a uint8 array [..., B], got {packed.dtype} with ndim {packed.ndim}")
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 0:
        raise ValueError(f"k must be a non-negative int, got {k!r}")
    *lead, nbytes = packed.shape
    if nbytes != packed_size(k, bits):
        raise ValueError(
            f"packed last axis must be ceil({k} * {bits} / 8) = {packed_size(k, bits)}, got {nbytes}"
        )
    if 8 % bits == 0:
        return _unpack_whole_bytes(packed, bits, k)
    n_chunks = -(-k // _CHUNK)
    full = np.zeros((*lead, n_chunks * bits), dtype=np.uint64)  # [..., C*bits]
    full[..., :nbytes] = packed
    byte_shifts = np.arange(bits, dtype=np.uint64) * np.uint64(8)
    words = np.bitwise_or.reduce(full.reshape(*lead, n_chunks, bits) << byte_shifts, axis=-1)  # [..., C]
    shifts = np.arange(_CHUNK, dtype=np.uint64) * np.uint64(bits)
    codes = (words[..., None] >> shifts) & np.uint64((1 << bits) - 1)  # [..., C, 8]
    return np.ascontiguousarray(codes.reshape(*lead, n_chunks * _CHUNK)[..., :k].astype(np.uint8))
