"""Tests for dmpq_compile.quant.packing (LSB-first bit packing)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from dmpq_compile.quant import pack_bits, packed_size, unpack_bits


def reference_pack(q: np.ndarray, bits: int) -> np.ndarray:
    """Bit-by-bit reference: code j -> stream bits [j*bits, (j+1)*bits), LSB first."""
    *lead, k = q.shape
    rows = int(np.prod(lead, dtype=np.int64))
    flat = q.reshape(rows, k)
    out = np.zeros((rows, packed_size(k, bits)), dtype=np.uint8)
    for r in range(flat.shape[0]):
        for j in range(k):
            for t in range(bits):
                if (int(flat[r, j]) >> t) & 1:
                    i = j * bits + t
                    out[r, i // 8] |= np.uint8(1 << (i % 8))
    return out.reshape(*lead, packed_size(k, bits))


@st.composite
def codes_and_bits(draw):
    bits = draw(st.integers(1, 8))
    lead = draw(st.lists(st.integers(0, 3), min_size=0, max_size=2))
    k = draw(st.integers(0, 40))
    q = draw(hnp.arrays(np.uint8, (*lead, k), elements=st.integers(0, (1 << bits) - 1)))
    return q, bits


@settings(max_examples=200, deadline=None)
@given(codes_and_bits())
def test_roundtrip_property(data):
    q, bits = data
    packed = pack_bits(q, bits)
    assert packed.dtype == np.uint8
    assert packed.shape == (*q.shape[:-1], packed_size(q.shape[-1], bits))
    np.testing.assert_array_equal(unpack_bits(packed, bits, q.shape[-1]), q)


@settings(max_examples=60, deadline=None)
@given(codes_and_bits())
def test_matches_bitwise_reference(data):
    q, bits = data
    np.testing.assert_array_equal(pack_bits(q, bits), reference_pack(q, bits))


@pytest.mark.parametrize("bits", range(1, 9))
@pytest.mark.parametrize("k", [1, 7, 8, 9, 31, 64, 100])
def test_table_roundtrip_and_size(bits, k):
    rng = np.random.default_rng(bits * 1000 + k)
    q = rng.integers(0, 1 << bits, size=(3, k), dtype=np.uint8)
    packed = pack_bits(q, bits)
    assert packed.shape == (3, (k * bits + 7) // 8)
    np.testing.assert_array_equal(unpack_bits(packed, bits, k), q)


def test_4bit_low_nibble_first():
    q = np.array([0x1, 0xA, 0xF, 0x3, 0x7], dtype=np.uint8)
    np.testing.assert_array_equal(pack_bits(q, 4), np.array([0xA1, 0x3F, 0x07], dtype=np.uint8))


def test_2bit_layout():
    q = np.array([1, 2, 3, 0, 3], dtype=np.uint8)
    np.testing.assert_array_equal(pack_bits(q, 2), np.array([0b00111001, 0b00000011], dtype=np.uint8))


def test_3bit_crosses_byte_boundary():
    q = np.array([1, 2, 3, 4, 5, 6, 7, 0], dtype=np.uint8)
    packed = pack_bits(q, 3)
    stream = sum(int(v) << (3 * j) for j, v in enumerate(q))
    assert packed.tolist() == [(stream >> (8 * i)) & 0xFF for i in range(3)]
    # code 2 (value 3) straddles bytes 0 and 1: bits 6,7 of byte 0 and bit 0 of byte 1
    assert (packed[0] >> 6) | ((packed[1] & 1) << 2) == 3


def test_8bit_is_identity():
    q = np.arange(256, dtype=np.uint8).reshape(4, 64)
    np.testing.assert_array_equal(pack_bits(q, 8), q)


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_matmulnbits_block_layout(bits):
    """[N, n_blocks, block] -> [N, n_blocks, block*bits/8]; element j of a block at bits [j*b, (j+1)*b)."""
    n, n_blocks, block = 3, 4, 32
    rng = np.random.default_rng(bits)
    q = rng.integers(0, 1 << bits, size=(n, n_blocks, block), dtype=np.uint8)
    packed = pack_bits(q, bits)
    assert packed.shape == (n, n_blocks, block * bits // 8)
    for r, b in [(0, 0), (2, 3)]:
        blob = int.from_bytes(packed[r, b].tobytes(), "little")
        for j in range(block):
            assert (blob >> (j * bits)) & ((1 << bits) - 1) == q[r, b, j]


def test_accepts_torch_and_wider_int_dtypes():
    q = torch.tensor([[3, 1, 2, 0, 1]], dtype=torch.uint8)
    packed = pack_bits(q, 2)
    assert isinstance(packed, np.ndarray)
    np.testing.assert_array_equal(unpack_bits(torch.from_numpy(packed), 2, 5), q.numpy())
    np.testing.assert_array_equal(pack_bits(q.numpy().astype(np.int64), 2), packed)


@pytest.mark.parametrize("bits", [0, 9, -1, 2.0, True])
def test_bad_bits(bits):
    with pytest.raises(ValueError, match="bits must be an int in 1..8"):
        pack_bits(np.zeros(4, np.uint8), bits)


def test_out_of_range_values():
    with pytest.raises(ValueError, match=r"\[0, 7\]"):
        pack_bits(np.array([0, 8], dtype=np.uint8), 3)
    with pytest.raises(ValueError, match="must lie in"):
        pack_bits(np.array([-1, 0], dtype=np.int32), 3)


def test_bad_inputs():
    with pytest.raises(TypeError, match="integer dtype"):
        pack_bits(np.zeros(4, np.float32), 4)
    with pytest.raises(ValueError, match="scalar"):
        pack_bits(np.uint8(3), 4)
    with pytest.raises(TypeError, match="numpy array or torch tensor"):
        pack_bits([1, 2, 3], 4)
    with pytest.raises(ValueError, match=r"ceil\(5 \* 4 / 8\) = 3"):
        unpack_bits(np.zeros(2, np.uint8), 4, 5)
    with pytest.raises(TypeError, match="uint8"):
        unpack_bits(np.zeros(3, np.int32), 4, 5)
    with pytest.raises(ValueError, match="non-negative"):
        unpack_bits(np.zeros(0, np.uint8), 4, -1)
