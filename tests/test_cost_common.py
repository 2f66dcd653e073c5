"""Shared cost pieces: expert shapes, MatMulNBits bytes, energy model, disk cache."""

import math

import pytest
import torch
from dmpq_compile.backends.cost import (
    HOROWITZ_45NM,
    CostCache,
    CostError,
    distinct_shapes,
    energy_mj,
    expert_shapes,
    matmulnbits_bytes,
    matmulnbits_layout,
)

from dmpq_compile.ir.graph import Graph


def _graph(experts):
    """A minimal graph: input -> router -> experts with the given (gate, up, down) shapes."""
    g = Graph()
    g.add("x", "input")
    g.weights.add("rw", torch.zeros(len(experts), 8))
    g.add("r", "router", ["x"], params={"weight": "rw"})
    for e, shapes in enumerate(experts):
        params = {}
        for role, shape in zip(("gate", "up", "down"), shapes):
            g.weights.add(f"e{e}.{role}", torch.zeros(*shape))
            params[role] = f"e{e}.{role}"
        g.add(f"L0.expert{e}", "expert", ["x", "r"], params=params, layer=0, expert=e)
    return g


def test_expert_shapes_from_weights():
    g = _graph([((32, 8), (32, 8), (8, 32)), ((32, 8), (32, 8), (8, 32)), ((16, 8), (16, 8), (8, 16))])
    assert expert_shapes(g) == {"L0.expert0": (8, 32), "L0.expert1": (8, 32), "L0.expert2": (8, 16)}
    assert distinct_shapes(g) == [(8, 16), (8, 32)]


def test_expert_shapes_of_tiny_checkpoints(tiny_dirs):
    from dmpq_compile.frontend import load

    g = load(tiny_dirs("olmoe"))
    shapes = expert_shapes(g)
    assert len(shapes) == 2 * 6 and set(shapes.values()) == {(64, 32)}


def test_inconsistent_or_missing_experts_are_refused():
    with pytest.raises(CostError, match="inconsistent"):
        expert_shapes(_graph([((32, 8), (32, 8), (8, 16))]))
    g = Graph()
    g.add("x", "input")
    with pytest.raises(CostError, match="no expert"):
        expert_shapes(g)


def test_matmulnbits_bytes_hand_computed():
    # Mixtral gate projection: N=14336, K=4096, 4 bits, block 64 -> k_blocks 64, blob 32 bytes.
    codes, scales, zeros = 14336 * 64 * 32, 14336 * 64 * 4, 14336 * 32
    assert matmulnbits_bytes(14336, 4096, 4, 64) == codes + scales + zeros == 33488896
    # K=100 pads to 2 blocks of 64; 2-bit zero points of 2 blocks fit one byte per row.
    layout = matmulnbits_layout(48, 100, 2, 64)
    assert layout == {"B": ((48, 2, 16), "uint8"), "scales": ((48, 2), "float32"),
                      "zero_points": ((48, 1), "uint8")}
    with pytest.raises(CostError):
        matmulnbits_layout(48, 100, 4, 48)


def test_energy_model_hand_computed():
    # 1000 bytes x 162.5 pJ (1.3 nJ / 64-bit DRAM access) + 10 fp32 mul x 3.7 + 100 int8 add x 0.03
    got = energy_mj(1000, {"fp32_mul": 10, "int8_add": 100})
    assert math.isclose(got, (162500 + 37 + 3) * 1e-9, rel_tol=1e-12)
    assert HOROWITZ_45NM.dram_pj_per_byte == 162.5
    with pytest.raises(CostError, match="no figure"):
        energy_mj(1, {"fp8_mul": 1})


def test_cache_roundtrip_and_key_check(tmp_path, monkeypatch):
    monkeypatch.setenv("DMPQ_CACHE_DIR", str(tmp_path))
    cache = CostCache()
    key = {"target": "ort-cpu", "h": 8, "bits": 4}
    assert cache.get(key) is None
    path = cache.put(key, {"decode": [1.0, 2.0]})
    assert path.is_relative_to(tmp_path / "cost" / "ort-cpu")
    assert cache.get(dict(reversed(list(key.items())))) == {"decode": [1.0, 2.0]}
    assert cache.get({**key, "bits": 8}) is None
    path.write_text("{not json")
    assert cache.get(key) is None
