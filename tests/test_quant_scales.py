"""Float16 scales (``QuantSpec.scale_dtype``): every quantizer chooses scales float16 represents,
rounded up so the error bound of the plain rule still holds, and refuses what float16 cannot hold."""

from __future__ import annotations

import pytest
import torch

from dmpq_compile.quant import QuantSpec, dequantize, quantize
from dmpq_compile.quant.gptq import gptq_quantize
from dmpq_compile.quant.hqq import hqq_quantize
from dmpq_compile.quant.rtn import QuantizedTensor, round_scales

HALF = "float16"


def _is_half(t: torch.Tensor) -> bool:
    return bool((t.to(torch.float16).to(torch.float32) == t).all())


def test_round_scales_rounds_up_to_float16_values():
    s = torch.tensor([1.0, 1.0001, 3e-6, 1e-9, 0.0123456, 65504.0])
    r = round_scales(s, HALF)
    assert _is_half(r) and bool((r >= s).all())
    # the smallest float16 value at or above each scale: one step down is below it
    below = torch.nextafter(r.to(torch.float16), torch.zeros_like(r, dtype=torch.float16)).to(torch.float32)
    assert bool((below < s).all())
    assert torch.equal(round_scales(s, "float32"), s)
    with pytest.raises(ValueError, match="exceeds float16's range"):
        round_scales(torch.tensor([7e4]), HALF)
    with pytest.raises(ValueError, match="scale_dtype"):
        round_scales(s, "bfloat16")


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_rtn_float16_scales_keep_the_error_bound(bits):
    w = torch.randn(48, 200, generator=torch.Generator().manual_seed(bits)) * 0.02
    qt = quantize(w, QuantSpec(bits=bits, group_size=64, scale_dtype=HALF))
    assert _is_half(qt.scale)
    s = qt.scale.repeat_interleave(64, dim=1)[:, :200]
    assert bool(((dequantize(qt) - w).abs() <= s / 2 + 1e-7).all())
    ref = quantize(w, QuantSpec(bits=bits, group_size=64))  # float32 scales: (almost) the same error
    err, ref_err = float(((dequantize(qt) - w) ** 2).mean()), float(((dequantize(ref) - w) ** 2).mean())
    assert err <= 1.01 * ref_err


def test_gptq_and_hqq_give_float16_scales():
    g = torch.Generator().manual_seed(0)
    w, x = torch.randn(32, 128, generator=g) * 0.05, torch.randn(512, 128, generator=g)
    spec = QuantSpec(bits=2, group_size=32, scale_dtype=HALF)
    for qt in (gptq_quantize(w, x.T @ x / len(x), spec), hqq_quantize(w, spec)):
        assert _is_half(qt.scale) and qt.spec.scale_dtype == HALF
        assert torch.equal(dequantize(qt), dequantize(qt))  # a valid tensor of the spec's format


def test_a_float16_spec_refuses_float32_scales():
    qt = quantize(torch.randn(4, 64), QuantSpec(bits=4, group_size=64))
    with pytest.raises(ValueError, match="float16 cannot represent"):
        QuantizedTensor(q=qt.q, scale=qt.scale + 1e-7, zero=qt.zero, spec=QuantSpec(bits=4, group_size=64,
                        scale_dtype=HALF), shape=qt.shape)


def test_spec_dict_names_float16_scales_only():
    half = QuantSpec(bits=4, group_size=64, scale_dtype=HALF)
    assert half.to_dict()["scale_dtype"] == HALF and QuantSpec.from_dict(half.to_dict()) == half
    plain = QuantSpec(bits=4, group_size=64)
    assert "scale_dtype" not in plain.to_dict() and QuantSpec.from_dict(plain.to_dict()) == plain
    with pytest.raises(ValueError, match="scale_dtype"):
        QuantSpec(bits=4, scale_dtype="float64")
