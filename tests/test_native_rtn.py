"""The C++ group-wise affine RTN (dmpq_compile/quant/native.py) gives the torch path's values bit for bit, and
leaves the errors to it."""

from __future__ import annotations

import pytest
import torch

from dmpq_compile.quant import QuantSpec, fake_quantize_change, fake_quantize_spec, native, quantize

pytestmark = pytest.mark.skipif(not native.available(), reason="dmpq's RTN library cannot be built here "
                                "(needs Linux x86-64 and a C++ compiler)")

SHAPES = [((256, 512), 64),  # whole groups, 16 at a time
          ((37, 100), 32),  # a shorter last group (edge-padded in torch)
          ((5, 64), 128),  # one group longer than the row
          ((3, 4, 70), 64),  # stacked experts
          ((8, 160), 160),  # per channel
          ((40, 597), 16),  # 37 whole groups: the vector path's tail block, then a 5-wide group
          ((6, 48), 24)]  # groups that are no multiple of 16: scalar path


def _both(monkeypatch, fn):
    monkeypatch.setenv("DMPQ_NATIVE_RTN", "1")
    fast = fn()
    monkeypatch.setenv("DMPQ_NATIVE_RTN", "0")
    return fast, fn()


@pytest.mark.parametrize("scale_dtype", ["float16", "float32"])
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize(("shape", "group"), SHAPES)
def test_codes_scales_and_fake_quantized_weights_match_the_torch_path(shape, group, bits, scale_dtype, monkeypatch):
    gen = torch.Generator().manual_seed(bits * 1000 + group)
    spec = QuantSpec(bits=bits, group_size=group, scale_dtype=scale_dtype)
    for magnitude in (0.02, 1.0, 3000.0):
        w = torch.randn(*shape, generator=gen) * magnitude
        rows = w.view(-1, shape[-1])
        rows[0, :5] = 0.0  # a group with zeros
        rows[-1] = 0.5  # a constant row: every group's minimum is clamped to 0
        if rows.shape[0] > 2:
            rows[1] = 0.0  # an all-zero row: scale 1
            rows[2] = -rows[2].abs()  # all negative: the maximum is clamped to 0
        for x in (w, w.to(torch.bfloat16)):  # bf16 weights are widened a row at a time, exactly
            (qa, fa), (qb, fb) = _both(monkeypatch, lambda x=x: (quantize(x, spec), fake_quantize_spec(x, spec)))
            assert torch.equal(fa, fb) and fa.dtype == fb.dtype == x.dtype
            assert qa.q.dtype == qb.q.dtype == torch.uint8
            assert torch.equal(qa.q, qb.q) and torch.equal(qa.scale, qb.scale) and torch.equal(qa.zero, qb.zero)


def test_bfloat16_weights_come_back_in_bfloat16(monkeypatch):
    w = torch.randn(64, 256, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    spec = QuantSpec(bits=4, group_size=64, scale_dtype="float16")
    fast, ref = _both(monkeypatch, lambda: fake_quantize_spec(w, spec))
    assert fast.dtype == torch.bfloat16 and torch.equal(fast, ref)


def test_the_native_path_runs_and_leaves_errors_to_torch(monkeypatch):
    monkeypatch.setenv("DMPQ_NATIVE_RTN", "1")
    w = torch.randn(32, 128, generator=torch.Generator().manual_seed(1))
    assert native.affine(w, 64, 4, True, codes=True, fake=True) is not None  # not the torch fallback
    bad = w.clone()
    bad[3, 70] = float("nan")
    assert native.affine(bad, 64, 4, True) is None
    with pytest.raises(ValueError, match="NaN|finite"):
        quantize(bad, QuantSpec(bits=4, group_size=64))
    bad[3, 70] = float("inf")
    assert native.affine(bad, 64, 4, False) is None
    huge = w * 1e6  # scales above float16's range
    assert native.affine(huge, 64, 4, True) is None
    with pytest.raises(ValueError, match="float16"):
        fake_quantize_spec(huge, QuantSpec(bits=4, group_size=64, scale_dtype="float16"))
    monkeypatch.setenv("DMPQ_NATIVE_RTN", "0")
    assert native.affine(w, 64, 4, True) is None  # asked off


@pytest.mark.parametrize("scale_dtype", ["float16", "float32"])
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize(("shape", "group"), SHAPES)
def test_changes_in_bfloat16_match_the_torch_path(shape, group, bits, scale_dtype, monkeypatch):
    """What the sensitivity pass prices a quantization by: (fake - w) and fake in bf16 bit for bit, the sum of
    the squared changes to float rounding, from float32 and from bfloat16 weights."""
    gen = torch.Generator().manual_seed(bits * 100 + group)
    spec = QuantSpec(bits=bits, group_size=group, scale_dtype=scale_dtype)
    for magnitude in (0.02, 1.0):
        w = torch.randn(*shape, generator=gen) * magnitude
        w.view(-1, shape[-1])[0] = 0.5  # a constant row: no change where the codes are exact
        for weights in (w, w.to(torch.bfloat16)):
            (ca, fa, sa), (cb, fb, sb) = _both(monkeypatch, lambda x=weights: fake_quantize_change(
                x, spec, torch.bfloat16, fake=True))
            assert ca.dtype == cb.dtype == fa.dtype == fb.dtype == torch.bfloat16
            assert torch.equal(ca, cb) and torch.equal(fa, fb)
            assert sa == pytest.approx(sb, rel=1e-4, abs=1e-12)
            # the torch path is what the pass did before: fake-quantize in float32, subtract, round
            w32 = weights.float()
            assert torch.equal(cb, (fake_quantize_spec(w32, spec) - w32).to(torch.bfloat16))


def test_changes_run_natively_and_leave_the_rest_to_torch(monkeypatch):
    monkeypatch.setenv("DMPQ_NATIVE_RTN", "1")
    w = torch.randn(32, 128, generator=torch.Generator().manual_seed(4))
    change, fake, total = native.affine_change(w, 64, 4, True)
    assert fake is None and change.dtype == torch.bfloat16 and total > 0
    bad = w.clone()
    bad[1, 2] = float("inf")
    assert native.affine_change(bad, 64, 4, True) is None
    with pytest.raises(ValueError, match="NaN|finite"):
        fake_quantize_change(bad, QuantSpec(bits=4, group_size=64), torch.bfloat16)
    assert native.affine_change(w.double(), 64, 4, True) is None  # neither float32 nor bfloat16
    calls = []
    monkeypatch.setattr(native, "affine_change", lambda *a, **k: calls.append(a))
    spec = QuantSpec(bits=4, group_size=64)
    for cast in (torch.float16, torch.float32):  # other products' dtypes: torch
        change, _, _ = fake_quantize_change(w, spec, cast)
        assert change.dtype == cast and torch.equal(change, (fake_quantize_spec(w, spec) - w).to(cast))
    assert calls == []


def test_symmetric_formats_keep_the_torch_path(monkeypatch):
    from dmpq_compile.quant.spec import SYM_CHANNEL

    calls = []
    monkeypatch.setattr(native, "affine", lambda *a, **k: calls.append(a))
    out = fake_quantize_spec(torch.randn(8, 64), QuantSpec(bits=8, group_size=None, scheme=SYM_CHANNEL))
    assert calls == [] and out.shape == (8, 64)


def test_a_build_without_avx512_or_f16c_gives_the_same_values_and_refuses_float16_scales(tmp_path):
    """The scalar code every CPU runs (here it also serves groups that are no multiple of 16)."""
    import ctypes
    from pathlib import Path

    from dmpq_compile.native import build_library

    flags = tuple(f for f in native.FLAGS if f != "-march=native") + ("-march=x86-64",)
    lib = ctypes.CDLL(str(build_library(native.LIBRARY, Path(native.__file__).parent / "csrc", native.SOURCES,
                                        flags, "the portable RTN build", cache=tmp_path)))
    w = torch.randn(48, 256, generator=torch.Generator().manual_seed(3))
    for bits in (2, 4, 8):
        spec = QuantSpec(bits=bits, group_size=64, scale_dtype="float32")
        ref = quantize(w, spec)
        scale, zero = torch.empty(48, 4), torch.empty(48, 4)
        q, fake = torch.empty(48, 256, dtype=torch.uint8), torch.empty(48, 256)
        assert lib.dmpq_rtn_affine(ctypes.c_void_p(w.data_ptr()), 0, 48, 256, 64, bits, 0, ctypes.c_void_p(scale.data_ptr()),
                                   ctypes.c_void_p(zero.data_ptr()), ctypes.c_void_p(q.data_ptr()),
                                   ctypes.c_void_p(fake.data_ptr())) == 0
        assert torch.equal(scale, ref.scale) and torch.equal(zero.to(torch.uint8), ref.zero) and torch.equal(q, ref.q)
        assert torch.equal(fake, fake_quantize_spec(w, spec))
    assert lib.dmpq_rtn_affine(ctypes.c_void_p(w.data_ptr()), 0, 48, 256, 64, 4, 1, ctypes.c_void_p(scale.data_ptr()),
                               ctypes.c_void_p(zero.data_ptr()), None, None) == 3  # no F16C: torch rounds those
    spec = QuantSpec(bits=4, group_size=64, scale_dtype="float32")
    ref_change, ref_fake, ref_total = fake_quantize_change(w, spec, torch.bfloat16, fake=True)
    f = lib.dmpq_rtn_affine_change
    f.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64, ctypes.c_int,
                  ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.POINTER(ctypes.c_double)]
    for x in (w, w.to(torch.bfloat16)):
        change, fake = torch.empty(48, 256, dtype=torch.bfloat16), torch.empty(48, 256, dtype=torch.bfloat16)
        total = ctypes.c_double()
        assert f(x.data_ptr(), int(x.dtype == torch.bfloat16), 48, 256, 64, 4, 0, change.data_ptr(), fake.data_ptr(),
                 ctypes.byref(total)) == 0
        r_change, r_fake, r_total = (ref_change, ref_fake, ref_total) if x is w else fake_quantize_change(
            x, spec, torch.bfloat16, fake=True)
        assert torch.equal(change, r_change) and torch.equal(fake, r_fake)
        assert total.value == pytest.approx(r_total, rel=1e-5)
