"""Tests for dmpq_compile.quant.spec and dmpq_compile.quant.rtn."""

from __future__ import annotations

import itertools

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from dmpq_compile.quant import (
    QuantizedTensor,
    QuantSpec,
    dequantize,
    fake_quantize,
    fake_quantize_spec,
    fake_quantize_ste,
    init_scale_multiplier,
    quantize,
)

QBITS = (2, 3, 4, 8)
TOL = 1e-5  # relative slack for float32 rounding in the S/2 bound


def expand_groups(t: torch.Tensor, group_size: int, k: int) -> torch.Tensor:
    """[..., G] -> [..., K] by repeating each group value over its columns."""
    return t.repeat_interleave(group_size, dim=-1)[..., :k]


def assert_valid_format(qt: QuantizedTensor, shape: tuple[int, ...], bits: int, group_size: int) -> None:
    g = -(-shape[-1] // group_size)
    assert qt.q.dtype == torch.uint8 and tuple(qt.q.shape) == shape
    assert qt.scale.dtype == torch.float32 and tuple(qt.scale.shape) == (*shape[:-1], g)
    assert qt.zero.dtype == torch.uint8 and tuple(qt.zero.shape) == (*shape[:-1], g)
    assert int(qt.q.max()) <= 2**bits - 1 and int(qt.zero.max()) <= 2**bits - 1
    assert bool((qt.scale > 0).all())
    assert qt.shape == shape


def assert_error_within_half_step(w: torch.Tensor, qt: QuantizedTensor) -> None:
    gs, k = qt.spec.group_size, w.shape[-1]
    err = (dequantize(qt) - w.float()).abs()
    bound = expand_groups(qt.scale, gs, k) / 2
    assert bool((err <= bound * (1 + TOL) + 1e-7).all()), float((err - bound).max())


# ----------------------------------------------------------------------------- QuantSpec


def test_spec_defaults_and_roundtrip():
    spec = QuantSpec(bits=4)
    assert (spec.group_size, spec.scheme, spec.method) == (128, "affine-asym-v1", "rtn")
    for s in [spec, QuantSpec(3, 32, method="gptq"), QuantSpec(16, 64, method="hqq")]:
        d = s.to_dict()
        assert d["version"] == 1
        assert QuantSpec.from_dict(d) == s
    assert QuantSpec(2, 32).qmax == 3 and not QuantSpec(16).is_quantized


@pytest.mark.parametrize(
    "kwargs, msg",
    [
        ({"bits": 5}, r"bits must be one of \(2, 3, 4, 8, 16\), got 5"),
        ({"bits": True}, "bits must be one of"),
        ({"bits": 4.0}, "bits must be one of"),
        ({"bits": 4, "group_size": 0}, "group_size must be a positive int, got 0"),
        ({"bits": 4, "group_size": 32.0}, "group_size must be a positive int"),
        ({"bits": 4, "scheme": "sym"}, "scheme must be one of"),
        ({"bits": 4, "method": "awq"}, "method must be one of"),
    ],
)
def test_spec_validation(kwargs, msg):
    with pytest.raises(ValueError, match=msg):
        QuantSpec(**kwargs)


@pytest.mark.parametrize(
    "data, msg",
    [
        ({"bits": 4}, "unsupported QuantSpec version None"),
        ({"version": 2, "bits": 4}, "unsupported QuantSpec version 2"),
        ({"version": 1, "bits": 4, "foo": 1}, "unknown QuantSpec keys"),
        ({"version": 1}, "missing 'bits'"),
        ({"version": 1, "bits": 7}, "bits must be one of"),
    ],
)
def test_spec_from_dict_errors(data, msg):
    with pytest.raises(ValueError, match=msg):
        QuantSpec.from_dict(data)


def test_spec_from_dict_rejects_non_mapping():
    with pytest.raises(TypeError, match="expects a mapping"):
        QuantSpec.from_dict([1, 2])  # type: ignore[arg-type]


def test_spec_is_frozen():
    with pytest.raises(AttributeError):
        QuantSpec(4).bits = 8  # type: ignore[misc]


# ----------------------------------------------------------------------------- quantize / dequantize


@pytest.mark.parametrize("bits", QBITS)
@pytest.mark.parametrize("group_size", [16, 32, 64, 128])
@pytest.mark.parametrize("shape", [(4, 128), (3, 100), (1, 7), (2, 3, 96), (5, 129)])
def test_quantize_table(bits, group_size, shape):
    torch.manual_seed(bits * 131 + group_size + shape[-1])
    w = torch.randn(shape) * 0.05
    qt = quantize(w, QuantSpec(bits, group_size))
    assert_valid_format(qt, shape, bits, group_size)
    assert_error_within_half_step(w, qt)
    out = dequantize(qt)
    assert out.dtype == torch.float32 and out.shape == w.shape


@pytest.mark.parametrize("bits", QBITS)
@pytest.mark.parametrize("value", [0.0, 0.37, -1.25])
def test_constant_rows_are_exact(bits, value):
    w = torch.full((3, 70), value)
    qt = quantize(w, QuantSpec(bits, 32))
    assert_valid_format(qt, (3, 70), bits, 32)
    torch.testing.assert_close(dequantize(qt), w, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("bits", QBITS)
def test_negative_only_rows(bits):
    torch.manual_seed(bits)
    w = -torch.rand(4, 96) - 0.1
    qt = quantize(w, QuantSpec(bits, 32))
    assert_valid_format(qt, (4, 96), bits, 32)
    assert bool((qt.zero == 2**bits - 1).all())  # 0 is the top of the range
    assert_error_within_half_step(w, qt)


@pytest.mark.parametrize("bits", QBITS)
def test_positive_only_rows(bits):
    w = torch.rand(4, 64) + 0.5
    qt = quantize(w, QuantSpec(bits, 32))
    assert bool((qt.zero == 0).all())
    assert_error_within_half_step(w, qt)


def test_ragged_last_group_uses_only_real_columns():
    torch.manual_seed(0)
    w = torch.randn(6, 100)  # group 32: last group has 4 real columns
    qt = quantize(w, QuantSpec(4, 32))
    tail = quantize(w[:, 96:].contiguous(), QuantSpec(4, 4))
    torch.testing.assert_close(qt.scale[:, -1:], tail.scale)
    assert torch.equal(qt.zero[:, -1:], tail.zero)
    assert torch.equal(qt.q[:, 96:], tail.q)


def test_group_independence():
    torch.manual_seed(1)
    w = torch.randn(2, 64)
    w2 = w.clone()
    w2[:, :32] *= 100  # changing group 0 must not affect group 1
    a, b = quantize(w, QuantSpec(4, 32)), quantize(w2, QuantSpec(4, 32))
    assert torch.equal(a.q[:, 32:], b.q[:, 32:]) and torch.equal(a.scale[:, 1], b.scale[:, 1])


def test_known_values():
    w = torch.tensor([[-1.0, 0.0, 0.4, 2.0]])
    qt = quantize(w, QuantSpec(2, 4))  # S = (2 - -1) / 3 = 1, Z = round(1 / 1) = 1
    assert qt.scale.item() == pytest.approx(1.0) and qt.zero.item() == 1
    assert qt.q.tolist() == [[0, 1, 1, 3]]
    assert dequantize(qt).tolist() == [[-1.0, 0.0, 0.0, 2.0]]


def test_rounding_is_half_to_even():
    w = torch.tensor([[-1.0, 0.5, 1.5, 2.0]])  # S = 1, Z = 1: codes 1.5 -> 2 and 2.5 -> 2
    assert quantize(w, QuantSpec(2, 4)).q.tolist() == [[0, 2, 2, 3]]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_low_precision_inputs(dtype):
    torch.manual_seed(2)
    w = (torch.randn(8, 64) * 0.1).to(dtype)
    qt = quantize(w, QuantSpec(4, 32))
    assert_error_within_half_step(w, qt)
    fq = fake_quantize(w, 4, 32)
    assert fq.dtype == dtype and fq.shape == w.shape


def test_mse_decreases_with_bits():
    torch.manual_seed(3)
    w = torch.randn(256, 512)
    mses = [float(((fake_quantize(w, b, 64) - w) ** 2).mean()) for b in QBITS]
    assert all(a > b for a, b in itertools.pairwise(mses)), mses
    assert mses[-1] < 1e-4


def test_fake_quantize_16_is_identity():
    w = torch.randn(4, 33, dtype=torch.bfloat16)
    assert fake_quantize(w, 16, 32) is w
    assert fake_quantize_ste(w, 16, 32) is w


def test_fake_quantize_matches_quantize():
    torch.manual_seed(4)
    w = torch.randn(5, 80)
    torch.testing.assert_close(fake_quantize(w, 3, 32), dequantize(quantize(w, QuantSpec(3, 32))))


@settings(max_examples=80, deadline=None)
@given(
    bits=st.sampled_from(QBITS),
    group_size=st.sampled_from([1, 3, 8, 32]),
    n=st.integers(1, 5),
    k=st.integers(1, 70),
    scale=st.floats(1e-3, 1e3),
    seed=st.integers(0, 2**31 - 1),
)
def test_error_bound_property(bits, group_size, n, k, scale, seed):
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=gen) * scale
    qt = quantize(w, QuantSpec(bits, group_size))
    assert_valid_format(qt, (n, k), bits, group_size)
    assert_error_within_half_step(w, qt)


# ----------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    "w, exc, msg",
    [
        (torch.randn(8), ValueError, r"shape \[N, K\]"),
        (torch.zeros(3, 8, dtype=torch.int32), TypeError, "float32/float16/bfloat16"),
        (torch.tensor([[1.0, float("nan")]]), ValueError, "NaN or Inf"),
        (torch.zeros(0, 8), ValueError, "must not be empty"),
        ([[1.0]], TypeError, "torch.Tensor"),
    ],
)
def test_quantize_rejects_bad_weights(w, exc, msg):
    with pytest.raises(exc, match=msg):
        quantize(w, QuantSpec(4, 32))


def test_quantize_rejects_16_bit_spec_and_bad_bits():
    with pytest.raises(ValueError, match="bits < 16"):
        quantize(torch.randn(2, 8), QuantSpec(16, 32))
    with pytest.raises(ValueError, match="bits must be one of"):
        fake_quantize(torch.randn(2, 8), 5, 32)


def test_quantized_tensor_validation():
    qt = quantize(torch.randn(2, 64), QuantSpec(3, 32))
    with pytest.raises(ValueError, match="exceed 7"):
        QuantizedTensor(qt.q + 8, qt.scale, qt.zero, qt.spec, qt.shape)
    with pytest.raises(TypeError, match="scale must be a torch.float32"):
        QuantizedTensor(qt.q, qt.scale.double(), qt.zero, qt.spec, qt.shape)
    with pytest.raises(ValueError, match=r"scale/zero must have shape \(2, 2\)"):
        QuantizedTensor(qt.q, qt.scale[:, :1], qt.zero[:, :1], qt.spec, qt.shape)
    with pytest.raises(ValueError, match="strictly positive"):
        QuantizedTensor(qt.q, torch.zeros_like(qt.scale), qt.zero, qt.spec, qt.shape)
    with pytest.raises(ValueError, match="does not match"):
        QuantizedTensor(qt.q, qt.scale, qt.zero, qt.spec, (2, 65))


# ----------------------------------------------------------------------------- STE / LSQ


@pytest.mark.parametrize("bits", QBITS)
def test_ste_forward_and_identity_gradient(bits):
    torch.manual_seed(5)
    w = torch.randn(6, 48, requires_grad=True)
    out = fake_quantize_ste(w, bits, 16)
    torch.testing.assert_close(out.detach(), fake_quantize(w.detach(), bits, 16))
    g = torch.randn(6, 48)
    out.backward(g)
    torch.testing.assert_close(w.grad, g)


def test_ste_preserves_dtype_bf16():
    w = torch.randn(4, 32, dtype=torch.bfloat16, requires_grad=True)
    out = fake_quantize_ste(w, 4, 32)
    out.sum().backward()
    assert out.dtype == torch.bfloat16 and bool((w.grad == 1).all())


def test_lsq_forward_matches_rtn_at_unit_multiplier():
    torch.manual_seed(6)
    w = torch.randn(4, 70, requires_grad=True)
    mult = init_scale_multiplier(w, 32)
    assert mult.shape == (4, 3) and mult.requires_grad
    out = fake_quantize_ste(w, 4, 32, scale_mult=mult)
    torch.testing.assert_close(out.detach(), fake_quantize(w.detach(), 4, 32))
    (out**2).sum().backward()
    assert mult.grad is not None and bool(torch.isfinite(mult.grad).all())
    assert float(mult.grad.abs().sum()) > 0
    assert w.grad is not None


def test_lsq_clamps_gradient_outside_range():
    torch.manual_seed(7)
    w = torch.randn(4, 64, requires_grad=True)
    mult = torch.full((4, 2), 0.5, requires_grad=True)  # halve the scale -> extremes clamp
    fake_quantize_ste(w, 2, 32, scale_mult=mult).sum().backward()
    assert bool((w.grad == 0).any()) and bool((w.grad == 1).any())


def test_lsq_learns_to_reduce_error():
    torch.manual_seed(8)
    w = torch.randn(16, 64)
    mult = init_scale_multiplier(w, 32)
    opt = torch.optim.Adam([mult], lr=0.05)
    losses = []
    for _ in range(30):
        opt.zero_grad()
        loss = ((fake_quantize_ste(w, 2, 32, scale_mult=mult) - w) ** 2).mean()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]


def test_lsq_bad_multiplier_shape():
    w = torch.randn(4, 64)
    with pytest.raises(ValueError, match=r"scale_mult must have shape \(4, 2\)"):
        fake_quantize_ste(w, 4, 32, scale_mult=torch.ones(4, 3))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_device():
    w = torch.randn(8, 64, device="cuda", dtype=torch.float16)
    qt = quantize(w, QuantSpec(4, 32))
    assert qt.q.device.type == "cuda" and dequantize(qt).device.type == "cuda"


@pytest.mark.parametrize("scheme", ["affine", "symmetric"])
@pytest.mark.parametrize("scale_dtype", ["float32", "float16"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fake_quantize_spec_is_bitwise_dequantize_of_quantize(scheme, scale_dtype, dtype):
    """The fast path (no uint8 round trip, no validation) gives exactly the reference's values,
    for every bit-width, ragged last groups, per-channel symmetric formats and constant rows."""
    from dmpq_compile.quant.formats import WeightFormat

    torch.manual_seed(7)
    for bits in QBITS:
        for shape in ((6, 80), (3, 64), (2, 4, 70)):
            w = (torch.randn(*shape) * 0.3).to(dtype)
            w[0] = 0.25  # a constant row
            fmt = WeightFormat(bits, symmetric=scheme == "symmetric", per_channel=scheme == "symmetric",
                               scale_dtype=scale_dtype)
            spec = fmt.spec(32)
            ref = dequantize(quantize(w, spec)).to(dtype)
            assert torch.equal(fake_quantize_spec(w, spec), ref), (bits, shape)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_fake_quantize_and_quantize_reject_non_finite(bad):
    w = torch.randn(4, 64)
    w[2, 17] = bad
    for f in (lambda: quantize(w, QuantSpec(4, 32)), lambda: fake_quantize_spec(w, QuantSpec(4, 32))):
        with pytest.raises(ValueError, match="NaN or Inf"):
            f()
