"""Analytical trt-a100 cost table: roofline math on hand-computed cases."""

import math

import pytest
import torch
from dmpq_compile.backends.cost import CostError
from dmpq_compile.backends.trt.cost import (
    KernelAssumptions,
    projection_time_ms,
    trt_a100_cost_table,
    trt_expert_bytes,
    trt_expert_cost,
    trt_weight_bytes,
)

from dmpq_compile.ir.graph import Graph


def test_weight_bytes_match_the_emitted_layouts():
    # FP16 [K, N]; INT8 [K, N] + fp16 per-channel scales; INT4 [K, N] packed two per byte + fp16 block
    # scales [G, N] + fp16 zero-point correction [G, N] (backends/trt/qdq.py, precision="fp16").
    assert trt_weight_bytes(14336, 4096, 16) == 2 * 14336 * 4096
    assert trt_weight_bytes(14336, 4096, 8) == 14336 * 4096 + 2 * 14336
    assert trt_weight_bytes(14336, 4096, 4, 128) == 14336 * 2048 + 2 * 2 * 14336 * 32 == 31195136
    assert trt_weight_bytes(14336, 4096, 4, 128, zp_correction=False) == 14336 * 2048 + 2 * 14336 * 32
    assert trt_weight_bytes(8, 100, 4, 64) == 8 * 128 // 2 + 2 * 2 * 8 * 2  # K padded to 2 whole groups
    with pytest.raises(CostError, match="not supported"):
        trt_weight_bytes(8, 8, 2)
    with pytest.raises(CostError, match="even"):
        trt_weight_bytes(8, 8, 4, 33)


def test_decode_is_memory_bound_by_hand():
    # Mixtral expert, INT4, sxm4-80gb. Gate: 31195136 weight bytes + 2*(4096+14336) fp16 activation
    # bytes at 2039 GB/s x 0.60; flops 2*N*K + 2*G*N (zero-point correction) at 312 TFLOPS x 0.45;
    # 3 kernels x 3 us. Down (N=4096, K=14336, G=112) moves the same bytes and flops.
    moved = 31195136 + 2 * (4096 + 14336)
    mem_s = moved / (2039e9 * 0.60)
    compute_s = (2 * 14336 * 4096 + 2 * 32 * 14336) / (312e12 * 0.45)
    per_proj_ms = (max(mem_s, compute_s) + 3 * 3e-6) * 1e3
    t, bound = projection_time_ms(14336, 4096, 1, 4, 128, "sxm4-80gb")
    assert bound == "memory" and math.isclose(t, per_proj_ms, rel_tol=1e-12)
    cost = trt_expert_cost(4096, 14336, 4, 128, "sxm4-80gb")
    assert math.isclose(cost.decode_ms, 3 * per_proj_ms, rel_tol=1e-12)
    assert math.isclose(cost.decode_ms, 0.10359, rel_tol=1e-3)


def test_prefill_is_compute_bound_by_hand():
    # FP16, M=128: flops 2*128*14336*4096 at 312 TFLOPS x 0.60 beat bytes at 2039 GB/s x 0.80.
    compute_s = 2 * 128 * 14336 * 4096 / (312e12 * 0.60)
    mem_s = (2 * 14336 * 4096 + 2 * 128 * (4096 + 14336)) / (2039e9 * 0.80)
    assert compute_s > mem_s
    t, bound = projection_time_ms(14336, 4096, 128, 16, variant="sxm4-80gb")
    assert bound == "compute" and math.isclose(t, (compute_s + 3e-6) * 1e3, rel_tol=1e-12)


def test_assumptions_and_variants_change_the_roofline():
    slow = trt_expert_cost(2048, 1024, 16, variant="sxm4-40gb")
    fast = trt_expert_cost(2048, 1024, 16, variant="sxm4-80gb")
    assert slow.decode_ms > fast.decode_ms
    ideal = KernelAssumptions(mem_efficiency={4: 1.0, 8: 1.0, 16: 1.0},
                              compute_efficiency={4: 1.0, 8: 1.0, 16: 1.0}, launch_us=0.0)
    assert ideal.kernels == {16: 1, 8: 1, 4: 3}
    c = trt_expert_cost(2048, 1024, 16, assumptions=ideal)
    assert math.isclose(c.bandwidth_gbs, 2039 * c.bytes / (c.bytes + 2 * 3 * (2048 + 1024)), rel_tol=1e-9)
    with pytest.raises(CostError, match="unknown A100 variant"):
        trt_expert_cost(8, 8, 16, variant="h100")


def test_table_has_every_expert_and_supported_bits():
    g = Graph()
    g.add("x", "input")
    g.weights.add("rw", torch.zeros(2, 16))
    g.add("r", "router", ["x"], params={"weight": "rw"})
    for e in range(2):
        for role, shape in (("gate", (32, 16)), ("up", (32, 16)), ("down", (16, 32))):
            g.weights.add(f"{e}.{role}", torch.zeros(*shape))
        g.add(f"e{e}", "expert", ["x", "r"], params={r: f"{e}.{r}" for r in ("gate", "up", "down")})
    table = trt_a100_cost_table(g, group_size=16)  # K=16: a 128 group would pad 8x
    assert set(table) == {"e0", "e1"} and all(set(rows) == {4, 8, 16} for rows in table.values())
    row = table["e0"]
    assert row[4].bytes == trt_expert_bytes(16, 32, 4, 16) < row[8].bytes < row[16].bytes == trt_expert_bytes(16, 32, 16)
    assert row[4].energy_mj < row[8].energy_mj < row[16].energy_mj
