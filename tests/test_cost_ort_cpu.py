"""Measured ort-cpu cost table: exact bytes, cache behaviour, table coverage, sane measurements."""

import math

import numpy as np
import pytest
from dmpq_compile.backends.base import ExpertCostRow
from dmpq_compile.backends.cost import CostError, matmulnbits_bytes
from dmpq_compile.backends.ort_cpu import cost as oc
from onnx import numpy_helper

TINY = {"repeats": 1, "progress": False, "evict_bytes": 1 << 20}


def _initializer_bytes(model, prefix):
    return sum(numpy_helper.to_array(t).nbytes for t in model.graph.initializer if t.name.startswith(prefix))


@pytest.mark.parametrize("bits", [2, 4, 8, 16])
@pytest.mark.parametrize("h,i", [(64, 128), (100, 48), (32, 96)])
def test_bytes_model_matches_the_initializers_ort_accepts(bits, h, i):
    model = oc.build_expert_model(h, i, bits, group_size=64)
    assert "QMoE" not in {n.op_type for n in model.graph.node}  # per-expert layout by default
    if bits != 16:  # gate and up stacked (as emitted), down on its own, against the MatMulNBits layout
        half = oc.SCALE_DTYPE
        assert half == "float16"  # the emitted format (ort-cpu's weight_format)
        assert _initializer_bytes(model, "gate_up.") == matmulnbits_bytes(2 * i, h, bits, 64, half)
        assert matmulnbits_bytes(2 * i, h, bits, 64, half) == 2 * matmulnbits_bytes(i, h, bits, 64, half)
        assert _initializer_bytes(model, "down.") == matmulnbits_bytes(h, i, bits, 64, half)
        assert [t.data_type for t in model.graph.initializer if t.name.endswith(".scales")] == [10, 10]  # FLOAT16
    assert _initializer_bytes(model, "") == oc.ort_cpu_expert_bytes(h, i, bits, 64)
    x = np.ones((3, h), np.float32)
    y = oc.make_session(model, 1).run(None, {"x": x})[0]  # ORT checks the shapes
    assert y.shape == (3, h) and np.isfinite(y).all()
    # per-expert dispatch: the routed rows get the expert's output times their weight, the others 0
    w = np.array([1.0, 0.0, 0.5], np.float32)
    d = oc.make_session(oc.build_dispatch_model(h, i, bits, group_size=64), 1).run(None, {"x": x, "w": w})[0]
    np.testing.assert_allclose(d, y * w[:, None], rtol=1e-5, atol=1e-6)
    assert oc.fuses(h, i, bits, 64) == (bits in oc.FUSED_BITS and (h, i) == (64, 128))
    if oc.fuses(h, i, bits, 64):  # the same expert as one QMoE: same bytes, same product
        q = oc.build_expert_model(h, i, bits, group_size=64, layout="qmoe")
        assert _initializer_bytes(q, "fc1") + _initializer_bytes(q, "fc2") == oc.ort_cpu_expert_bytes(h, i, bits, 64)
        assert [t.data_type for t in q.graph.initializer if t.name.endswith("_scales")] == [10, 10]
        out = oc.make_session(q, 1).run(None, {"x": x, "w": w})[0]
        assert out.shape == (3, h) and np.isfinite(out).all() and not out[1].any()
    else:
        with pytest.raises(CostError, match="QMoE does not run"):
            oc.build_expert_model(h, i, bits, group_size=64, layout="qmoe")


def test_energy_hand_computed():
    # 64x128 at 4 bits, block 64, float16 scales: weights 4480 + 4480 + 4416 bytes (codes 4096, scales
    # 128 x 1 x 2 or 64 x 2 x 2, zero points 128 or 64), activations 3 x (64 + 128) x 4 bytes,
    # 3*64*128 int8 MACs (0.2 + 0.1 pJ), 384 (output, block) pairs x (3.7 + 0.9 pJ); DRAM 162.5 pJ/byte.
    pj = (13376 + 2304) * 162.5 + 24576 * 0.3 + 384 * 4.6
    assert math.isclose(oc.ort_cpu_expert_energy_mj(64, 128, 4, 64), pj * 1e-9, rel_tol=1e-12)
    pj16 = (3 * 64 * 128 * 4 + 2304) * 162.5 + 24576 * 4.6
    assert math.isclose(oc.ort_cpu_expert_energy_mj(64, 128, 16), pj16 * 1e-9, rel_tol=1e-12)


def test_unsupported_bits_are_refused():
    with pytest.raises(CostError, match="ort-cpu runs bits"):
        oc.ort_cpu_expert_bytes(64, 64, 3)
    with pytest.raises(CostError, match="power of two"):
        oc.measure_shapes([(64, 64)], bits=(4,), group_size=48, **TINY)


@pytest.fixture
def olmoe_graph(tiny_dirs):
    from dmpq_compile.frontend import load

    return load(tiny_dirs("olmoe"))


def test_table_covers_every_expert_and_bits_and_cache_hits_do_not_measure(olmoe_graph, tmp_path, monkeypatch):
    monkeypatch.setenv("DMPQ_CACHE_DIR", str(tmp_path))
    ticks = iter(range(10**6))
    monkeypatch.setattr(oc, "_clock", lambda: next(ticks) * 1e-3)  # every timed run "takes" 1 ms
    table = oc.ort_cpu_cost_table(olmoe_graph, **TINY)
    experts = [n.id for n in olmoe_graph.experts()]
    assert sorted(table) == sorted(experts) and len(experts) == 12
    for rows in table.values():
        assert set(rows) == {2, 4, 8, 16}
        assert all(isinstance(r, ExpertCostRow) and r.decode_ms == pytest.approx(1.0) for r in rows.values())
        assert rows[2].bytes < rows[4].bytes < rows[8].bytes < rows[16].bytes
    assert len(list((tmp_path / "cost" / "ort-cpu").glob("*.json"))) == 4  # one shape x four bit-widths

    def no_timing():
        raise AssertionError("a cached table must not be measured again")

    monkeypatch.setattr(oc, "_clock", no_timing)
    assert oc.ort_cpu_cost_table(olmoe_graph, **TINY) == table
    with pytest.raises(AssertionError, match="must not be measured"):
        oc.ort_cpu_cost_table(olmoe_graph, cache=False, **TINY)


def test_measurement_is_sane_on_a_larger_shape():
    # 1024x4096: fp32 weights are 7x the 4-bit bytes, so fp32 cold decode must be slower (measured).
    # One thread: on a shared 2-CPU machine a second pool thread waits for a CPU and can inflate the
    # small 4-bit run by milliseconds, which says nothing about the kernels.
    ev = oc.CacheEvictor(oc.default_evict_bytes())
    m4 = oc.measure_expert_cost(1024, 4096, 4, threads=1, repeats=5, evictor=ev)
    m16 = oc.measure_expert_cost(1024, 4096, 16, threads=1, repeats=5, evictor=ev)
    assert m16.bytes > 6 * m4.bytes
    assert m16.decode_ms > m4.decode_ms, (m16.decode_cold, m4.decode_cold)
    assert all(x > 0 for m in (m4, m16) for x in m.decode_warm + m.prefill_cold + m.prefill_warm)
    assert all(x > 0 for m in (m4, m16) for x in m.idle_decode + m.idle_prefill)
    # 4 bits fuses: the QMoE routed run and its fixed part are measured, the row carries their difference
    assert m4.fused_decode and m4.group_decode and not m16.fused_decode
    row = m4.row()
    assert (row.decode_ms, row.prefill_ms, row.bytes) == (m4.decode_ms, m4.prefill_ms, m4.bytes)
    assert row.fused_decode_ms == max(0.0, float(np.median(m4.fused_decode)) - row.group_decode_ms)
    assert row.group_decode_ms == float(np.median(m4.group_decode)) < row.decode_ms
    assert m16.row().fused_decode_ms is None and m16.row().group_decode_ms == 0.0
    assert oc.ExpertMeasurement.from_dict(m4.to_dict()) == m4


@pytest.fixture(scope="module")
def kernel_library():
    from dmpq_compile.backends.base import BackendError
    from dmpq_compile.backends.ort_cpu import kernels

    try:
        return kernels.build()
    except BackendError as e:
        pytest.skip(f"dmpq's kernel library cannot be built here: {e}")


def test_kernel_rows_are_measured_where_the_library_builds(kernel_library, tmp_path):
    """2/4/8-bit experts whose widths are whole groups of 64 get the kernel layout's rows (routed cost inside
    a MixedMoE and the node's fixed part); 16 bits and widths the kernel does not take get None."""
    got = oc.measure_shapes([(128, 64), (64, 32)], (2, 4, 8, 16), 64, threads=1, cache=False, **TINY)
    for b in (2, 4, 8):
        row, m = got[128, 64][b].row(), got[128, 64][b]
        assert row.kernel_decode_ms is not None and row.kernel_prefill_ms is not None
        assert all(x > 0 for name in oc.KERNEL_FIELDS for x in getattr(m, name))
        assert row.kernel_fixed_decode_ms == float(np.median(m.kernel_fixed_decode)) > 0
        assert row.kernel_decode_ms == max(0.0, float(np.median(m.kernel_decode)) - row.kernel_fixed_decode_ms)
        assert got[64, 32][b].row().kernel_decode_ms is None  # 32 is not a whole group of 64
    assert got[128, 64][16].row().kernel_decode_ms is None and got[128, 64][16].row().kernel_fixed_decode_ms == 0.0
    assert not oc.kernel_joins(128, 64, 4, 64, "float32")  # the kernel reads float16 scales only


def test_kernel_probe_is_the_lowered_layout(kernel_library):
    """The probe's MixedMoE computes what its expert's dequantized weights give (so its tensors are laid out as
    the lowering lays them out), and rows routed to the expert it does not hold give 0."""
    import onnxruntime as ort
    from dmpq_compile.backends.ort_cpu.matmulnbits import unpanel_codes
    from onnx import numpy_helper as nh

    h, i, bits, gs = 128, 64, 4, 64
    model = oc.build_kernel_model(h, i, bits, gs)
    t = {x.name: nh.to_array(x) for x in model.graph.initializer}
    meta = t["meta"]
    assert meta[1].tolist() == [0] * 8 and meta[0][0] == bits

    def weight(role_rows, k, codes_at, blocks_at):
        n = role_rows
        codes = unpanel_codes(t["codes"][codes_at:codes_at + n * k * bits // 8], bits, n, k).astype(np.float32)
        nb = k // gs
        unblock = lambda v: v.reshape(n // 16, nb, 16).transpose(0, 2, 1).reshape(n, nb)
        scales = unblock(t["scales"][blocks_at:blocks_at + n * nb].astype(np.float32))
        zeros = unblock(t["zeros"][blocks_at:blocks_at + n * nb].astype(np.float32))
        return ((codes.reshape(n, nb, gs) - zeros[..., None]) * scales[..., None]).reshape(n, k)

    _, gu_c, dn_c, gu_s, dn_s, gu_z, dn_z, _ = meta[0]
    assert gu_s == gu_z and dn_s == dn_z
    gate_up = weight(2 * i, h, gu_c, gu_s)
    down = weight(h, i, dn_c, dn_s)
    x = np.random.default_rng(0).standard_normal((3, h), dtype=np.float32)
    g, u = x @ gate_up[:i].T, x @ gate_up[i:].T
    ref = ((g / (1 + np.exp(-g))) * u) @ down.T
    so = ort.SessionOptions()
    so.register_custom_ops_library(str(kernel_library))
    sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    feed = {"x": x, "top_i": np.zeros((3, 1), np.int64), "top_w": np.ones((3, 1), np.float32)}
    out = sess.run(None, feed)[0]
    assert np.abs(out - ref).max() <= 0.05 * np.abs(ref).max()  # level 4: int8 activations
    assert not sess.run(None, {**feed, "top_i": np.ones((3, 1), np.int64)})[0].any()


def test_a_table_without_kernel_rows_is_not_served_as_having_them(kernel_library, tmp_path, monkeypatch):
    monkeypatch.setenv("DMPQ_CACHE_DIR", str(tmp_path))
    ticks = iter(range(10**6))
    monkeypatch.setattr(oc, "_clock", lambda: next(ticks) * 1e-3)
    plain = oc.measure_shapes([(128, 64)], (4,), 64, threads=1, kernel=False, **TINY)
    assert not plain[128, 64][4].kernel_decode and plain[128, 64][4].row().kernel_decode_ms is None
    with_kernel = oc.measure_shapes([(128, 64)], (4,), 64, threads=1, **TINY)  # measures the kernel only
    assert with_kernel[128, 64][4].kernel_decode and with_kernel[128, 64][4].decode_cold == plain[128, 64][4].decode_cold

    def no_timing():
        raise AssertionError("measured again")

    monkeypatch.setattr(oc, "_clock", no_timing)
    assert oc.measure_shapes([(128, 64)], (4,), 64, threads=1, **TINY) == with_kernel  # all cached
    build, ident = oc.kernel_library()
    monkeypatch.setattr(oc, "kernel_library", lambda: (build, {**ident, "build": "another build"}))
    with pytest.raises(AssertionError, match="measured again"):  # another library: its own measurement
        oc.measure_shapes([(128, 64)], (4,), 64, threads=1, **TINY)


def test_without_a_compiler_the_table_has_no_kernel_rows_and_says_so(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
    monkeypatch.setenv("DMPQ_KERNEL_CACHE", str(tmp_path / "kernels"))
    with caplog.at_level("WARNING"):
        got = oc.measure_shapes([(128, 64)], (4,), 64, threads=1, cache=False, **TINY)
    assert got[128, 64][4].row().kernel_decode_ms is None and got[128, 64][4].row().fused_decode_ms is not None
    assert "no kernel rows" in caplog.text and "no-such-compiler" in caplog.text


def test_the_backend_measures_the_kernel_for_a_kernel_compile_only(kernel_library, tmp_path, monkeypatch):
    from dmpq_compile.backends.base import BackendError
    from dmpq_compile.backends.ort_cpu import OrtCpuBackend

    from dmpq_compile.frontend import load
    from dmpq_compile.testing import make_tiny_checkpoint

    monkeypatch.setenv("DMPQ_CACHE_DIR", str(tmp_path / "cache"))
    graph = load(make_tiny_checkpoint("olmoe", tmp_path / "ckpt", hidden_size=128, intermediate_size=128))
    opts = {"bits": (4, 16), "threads": 1, **TINY}
    kernel = OrtCpuBackend().cost_table(graph, dispatch="kernel", **opts)
    assert all(rows[4].kernel_decode_ms is not None and rows[16].kernel_decode_ms is None for rows in kernel.values())
    default = OrtCpuBackend().cost_table(graph, **opts)  # the emitter's default, fused: no kernel node to time
    assert all(rows[4].kernel_decode_ms is None and rows[4].fused_decode_ms is not None for rows in default.values())
    # the rows' bytes are the weights as each dispatch stores them, which is what --budget-mb sums: the kernel
    # keeps one zero point a group unpacked (the stored-bits budget's weight_bytes), MatMulNBits packs them
    from dmpq_compile.backends.cost import expert_shapes

    (h, i), = set(expert_shapes(graph).values())
    for backend, table in ((OrtCpuBackend(dispatch="kernel"), kernel), (OrtCpuBackend(), default)):
        for bits in (4, 16):
            stored = sum(backend.weight_bytes(n, k, bits, 64, kind="expert") for n, k in ((i, h), (i, h), (h, i)))
            assert all(rows[bits].bytes == stored for rows in table.values()), (backend.dispatch, bits)
    node = next(iter(kernel))
    assert kernel[node][4].bytes - default[node][4].bytes == 3 * h * i // 64 // 2  # half a byte a group more
    assert kernel[node][4].energy_mj > default[node][4].energy_mj  # the energy estimate reads those bytes
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
    monkeypatch.setenv("DMPQ_KERNEL_CACHE", str(tmp_path / "kernels"))
    with pytest.raises(BackendError, match="--dispatch kernel: .*no-such-compiler"):  # now, not at emit
        OrtCpuBackend().cost_table(graph, dispatch="kernel", **opts)


def test_remeasure_replaces_the_cached_entries_that_later_reads_return(tmp_path, monkeypatch):
    monkeypatch.setenv("DMPQ_CACHE_DIR", str(tmp_path))

    def clock(step):
        ticks = iter(range(10**6))
        return lambda: next(ticks) * step

    monkeypatch.setattr(oc, "_clock", clock(1e-3))
    first = oc.measure_shapes([(128, 64)], (4,), 64, threads=1, kernel=False, **TINY)
    monkeypatch.setattr(oc, "_clock", clock(3e-3))  # a "slower moment": every sample 3x
    assert oc.measure_shapes([(128, 64)], (4,), 64, threads=1, kernel=False, **TINY) == first  # cached: no remeasure
    again = oc.measure_shapes([(128, 64)], (4,), 64, threads=1, kernel=False, refresh=True, **TINY)
    assert again[128, 64][4].decode_ms == pytest.approx(3 * first[128, 64][4].decode_ms)

    def no_timing():
        raise AssertionError("measured again")

    monkeypatch.setattr(oc, "_clock", no_timing)
    assert oc.measure_shapes([(128, 64)], (4,), 64, threads=1, kernel=False, **TINY) == again  # the new entry


def _measured(bits, decode_ms, kernel_ms=None):
    kernel = {} if kernel_ms is None else {"kernel_decode": [kernel_ms], "kernel_prefill": [1.0],
                                            "kernel_fixed_decode": [0.0], "kernel_fixed_prefill": [0.0]}
    return oc.ExpertMeasurement(h=4096, i=14336, bits=bits, group_size=64, threads=2, bytes=bits << 20, energy_mj=1.0,
                                decode_cold=[decode_ms], decode_warm=[decode_ms], prefill_cold=[1.0],
                                prefill_warm=[1.0], **kernel)


@pytest.mark.parametrize("four,eight,kernel4,kernel8,warns", [
    (3.0, 5.0, 3.0, 5.0, None),            # as it should be
    (5.2, 5.0, 3.0, 5.0, None),            # within the margin
    (6.0, 5.0, 3.0, 5.0, "per-expert"),    # the per-expert row inverted
    (3.0, 5.0, 6.19, 5.86 / 1.2, "kernel"),  # the kernel row inverted (the Mixtral row once cached)
])
def test_a_4_bit_row_slower_than_its_8_bit_row_is_flagged_with_the_way_out(four, eight, kernel4, kernel8, warns,
                                                                          caplog):
    with caplog.at_level("WARNING"):
        oc._warn_inverted(4096, 14336, {4: _measured(4, four, kernel4), 8: _measured(8, eight, kernel8)}, 2)
    if warns is None:
        assert not caplog.records
    else:
        assert len(caplog.records) == 1 and f"{warns} decode" in caplog.text
        assert "--shape 4096,14336 --threads 2 --remeasure" in caplog.text


def test_the_cost_command_refuses_no_cache_with_remeasure(capsys):
    from dmpq_compile.cli import main

    with pytest.raises(SystemExit):
        main(["cost", "--target", "ort-cpu", "--shape", "64,32", "--no-cache", "--remeasure"])
    assert "not allowed with argument" in capsys.readouterr().err
