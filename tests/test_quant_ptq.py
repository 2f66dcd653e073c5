"""Tests for the post-training quantizers dmpq_compile.quant.gptq and dmpq_compile.quant.hqq."""

from __future__ import annotations

import pytest
import torch

from dmpq_compile.quant import QuantizedTensor, QuantSpec, dequantize, quantize
from dmpq_compile.quant.gptq import accumulate_hessian, gptq_quantize, output_error
from dmpq_compile.quant.hqq import HQQConfig, hqq_quantize, shrink_lp
from dmpq_compile.quant.rtn import affine_params, clip_search_params, quantize_codes

QBITS = (2, 3, 4, 8)


def make_layer(n: int = 64, k: int = 256, m: int = 2048, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Random weight [N, K] and correlated calibration inputs X [M, K]."""
    gen = torch.Generator().manual_seed(seed)
    mix = torch.randn(k, k, generator=gen) / k**0.5 + 0.3 * torch.eye(k)  # [K, K]
    scales = torch.rand(k, generator=gen) * 2 + 0.1  # uneven feature magnitudes
    x = (torch.randn(m, k, generator=gen) @ mix) * scales  # [M, K]
    w = torch.randn(n, k, generator=gen) * 0.02  # [N, K]
    return w, x


def out_err(w: torch.Tensor, w_hat: torch.Tensor, x: torch.Tensor) -> float:
    return float(torch.linalg.norm(x @ w.T - x @ w_hat.T))


def assert_valid(qt: QuantizedTensor, w: torch.Tensor, bits: int, group_size: int, method: str) -> None:
    g = -(-w.shape[-1] // group_size)
    assert qt.q.dtype == torch.uint8 and qt.q.shape == w.shape
    assert qt.scale.dtype == torch.float32 and qt.scale.shape == (*w.shape[:-1], g)
    assert qt.zero.dtype == torch.uint8 and qt.zero.shape == (*w.shape[:-1], g)
    assert int(qt.q.max()) <= 2**bits - 1 and int(qt.zero.max()) <= 2**bits - 1
    assert bool((qt.scale > 0).all()) and bool(torch.isfinite(qt.scale).all())
    assert qt.spec == QuantSpec(bits, group_size, method=method)


@pytest.fixture(scope="module")
def layer():
    w, x = make_layer()
    h, _ = accumulate_hessian(None, x, 0)
    return w, x, h


# ----------------------------------------------------------------------------- Hessian helpers


def test_accumulate_hessian_matches_batch_mean():
    x = torch.randn(3, 50, 16)  # [B, T, K]
    h, n = None, 0
    for chunk in x:
        h, n = accumulate_hessian(h, chunk, n)
    flat = x.reshape(-1, 16)
    assert n == 150
    torch.testing.assert_close(h, flat.T @ flat / 150, rtol=1e-5, atol=1e-6)
    h2, n2 = accumulate_hessian(None, x, 0)
    torch.testing.assert_close(h2, h, rtol=1e-5, atol=1e-6)
    assert n2 == 150


def test_accumulate_hessian_does_not_mutate_and_accepts_bf16():
    h0 = torch.eye(4)
    h, n = accumulate_hessian(h0, torch.randn(5, 4, dtype=torch.bfloat16), 5)
    assert torch.equal(h0, torch.eye(4)) and n == 10 and h.dtype == torch.float32


@pytest.mark.parametrize(
    "h, x, n, exc, msg",
    [
        (None, torch.randn(4, 8), 3, ValueError, "h is None but n = 3"),
        (torch.zeros(4, 4), torch.randn(4, 8), 0, ValueError, r"\[K, K\] = \(8, 8\)"),
        (None, torch.zeros(4, 8, dtype=torch.int64), 0, TypeError, "floating-point"),
        (None, torch.randn(4, 8), -1, ValueError, "non-negative"),
    ],
)
def test_accumulate_hessian_errors(h, x, n, exc, msg):
    with pytest.raises(exc, match=msg):
        accumulate_hessian(h, x, n)


def test_output_error_equals_activation_error(layer):
    w, x, h = layer
    w_hat = dequantize(quantize(w, QuantSpec(3, 64)))
    expected = out_err(w, w_hat, x) ** 2 / x.shape[0]
    assert output_error(w, w_hat, h) == pytest.approx(expected, rel=1e-3)


# ----------------------------------------------------------------------------- GPTQ


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("group_size", [32, 128])
def test_gptq_beats_rtn_on_output_error(layer, bits, group_size):
    w, x, h = layer
    spec = QuantSpec(bits, group_size)
    qt = gptq_quantize(w, h, spec)
    assert_valid(qt, w, bits, group_size, "gptq")
    rtn = out_err(w, dequantize(quantize(w, spec)), x)
    gptq = out_err(w, dequantize(qt), x)
    assert gptq < 0.9 * rtn, (gptq, rtn)
    minmax = out_err(w, dequantize(gptq_quantize(w, h, spec, clip_search=False)), x)
    if bits >= 3:  # with the plain min/max grid GPTQ still clearly beats RTN at 3-4 bits
        assert minmax < 0.9 * rtn, (minmax, rtn)


def test_gptq_ragged_k_and_half_precision():
    w, x = make_layer(n=16, k=200, m=1024, seed=1)
    h, _ = accumulate_hessian(None, x, 0)
    qt = gptq_quantize(w.half(), h, QuantSpec(4, 64), block_size=64)
    assert_valid(qt, w, 4, 64, "gptq")
    assert out_err(w, dequantize(qt), x) < out_err(w, dequantize(quantize(w, QuantSpec(4, 64))), x)


@pytest.mark.parametrize("diag", ["random", "zero"])
def test_gptq_with_diagonal_hessian_equals_rtn(diag):
    """No cross-column coupling (or no calibration data at all): nothing to compensate."""
    torch.manual_seed(2)
    w = torch.randn(8, 96)
    h = torch.diag(torch.rand(96) + 0.5) if diag == "random" else torch.zeros(96, 96)
    spec = QuantSpec(3, 32)
    a, b = gptq_quantize(w, h, spec, clip_search=False), quantize(w, spec)
    assert torch.equal(a.q, b.q) and torch.equal(a.zero, b.zero)
    torch.testing.assert_close(a.scale, b.scale)


def test_clip_search_params_never_worse_than_minmax():
    torch.manual_seed(11)
    wg = torch.randn(16, 4, 32)  # [N, G, gs]
    wg[0, 0, 0] = 8.0  # outlier: clipping it pays off
    for bits in QBITS:
        errs = []
        for fn in (affine_params, clip_search_params):
            s, z = fn(wg, bits)
            assert bool((z >= 0).all()) and bool((z <= 2**bits - 1).all()) and bool((s > 0).all())
            q = quantize_codes(wg, s[..., None], z[..., None], bits)
            errs.append((((q - z[..., None]) * s[..., None] - wg) ** 2).sum(-1))
        assert bool((errs[1] <= errs[0] + 1e-9).all())
        if bits <= 4:  # at 8 bits the step is tiny and clipping rarely pays
            assert float(errs[1].sum()) < float(errs[0].sum())
    with pytest.raises(ValueError, match="min_ratio"):
        clip_search_params(wg, 4, min_ratio=0.0)


@pytest.mark.parametrize("symmetric", [False, True])
def test_clip_search_gives_the_same_choice_whatever_ratios_run_together(monkeypatch, symmetric):
    """The search evaluates several ratios per step (memory-capped); with one ratio per step, or
    uneven steps, every group must pick the same (scale, zero), ties to the larger ratio."""
    from dmpq_compile.quant import rtn

    torch.manual_seed(3)
    wg = torch.randn(64, 3, 32) * 0.02
    wg[..., :2] = wg[..., 2:4]  # repeated values make equal errors across ratios likely
    for bits in QBITS:
        together = clip_search_params(wg, bits, symmetric=symmetric, scale_dtype="float16")
        for elements in (1, wg.numel() * 3):  # one ratio per step; steps of 3 (20 = 6 x 3 + 2)
            monkeypatch.setattr(rtn, "_CLIP_SEARCH_ELEMENTS", elements)
            apart = clip_search_params(wg, bits, symmetric=symmetric, scale_dtype="float16")
            assert torch.equal(together[0], apart[0]) and torch.equal(together[1], apart[1])
        monkeypatch.undo()


def test_gptq_dead_inputs(layer):
    w, x, _ = layer
    x = x.clone()
    x[:, [0, 5, 77, 255]] = 0.0
    h, _ = accumulate_hessian(None, x, 0)
    qt = gptq_quantize(w, h, QuantSpec(4, 32))
    assert_valid(qt, w, 4, 32, "gptq")
    w_hat = dequantize(qt)
    assert bool(torch.isfinite(w_hat).all())
    dead = [0, 5, 77, 255]  # weights of dead inputs are kept (plainly rounded), not zeroed
    assert float((w_hat[:, dead] - w[:, dead]).abs().max()) <= float(qt.scale.max())
    assert out_err(w, w_hat, x) < out_err(w, dequantize(quantize(w, QuantSpec(4, 32))), x)


def test_gptq_rank_deficient_hessian():
    w, x = make_layer(n=16, k=128, m=32, seed=3)  # M < K: singular H, damping makes it PD
    h, _ = accumulate_hessian(None, x, 0)
    qt = gptq_quantize(w, h, QuantSpec(3, 32))
    assert bool(torch.isfinite(dequantize(qt)).all())
    assert out_err(w, dequantize(qt), x) < out_err(w, dequantize(quantize(w, QuantSpec(3, 32))), x)


def test_gptq_block_size_does_not_change_result(layer):
    w, x, h = layer
    spec = QuantSpec(4, 32)
    a = gptq_quantize(w, h, spec, block_size=32)
    b = gptq_quantize(w, h, spec, block_size=256)
    assert float((a.q == b.q).float().mean()) > 0.99
    assert out_err(w, dequantize(a), x) == pytest.approx(out_err(w, dequantize(b), x), rel=0.02)


def test_gptq_errors(layer):
    w, _, h = layer
    with pytest.raises(ValueError, match=r"shape \[N, K\]"):
        gptq_quantize(w[None], h, QuantSpec(4, 32))
    with pytest.raises(ValueError, match=r"h must have shape \[K, K\]"):
        gptq_quantize(w, h[:10, :10], QuantSpec(4, 32))
    with pytest.raises(ValueError, match="NaN or Inf"):
        gptq_quantize(w, torch.full_like(h, float("nan")), QuantSpec(4, 32))
    with pytest.raises(ValueError, match="bits < 16"):
        gptq_quantize(w, h, QuantSpec(16, 32))
    with pytest.raises(ValueError, match="damp > 0"):
        gptq_quantize(w, h, QuantSpec(4, 32), damp=0.0)


# ----------------------------------------------------------------------------- HQQ


def group_sq_error(w: torch.Tensor, qt: QuantizedTensor) -> torch.Tensor:
    """Squared weight error per group [..., G] (ragged last group: real columns only)."""
    gs, k = qt.spec.group_size, w.shape[-1]
    d2 = (dequantize(qt) - w.float()) ** 2
    pad = (-k) % gs
    d2 = torch.nn.functional.pad(d2, (0, pad))
    return d2.reshape(*d2.shape[:-1], -1, gs).sum(-1)


@pytest.mark.parametrize("bits", QBITS)
@pytest.mark.parametrize("fit_scale", [False, True])
def test_hqq_not_worse_than_rtn_per_group(bits, fit_scale):
    torch.manual_seed(bits)
    w = torch.randn(32, 200) * 0.02
    w[0, 3] = 0.5  # outlier
    spec = QuantSpec(bits, 64)
    qt = hqq_quantize(w, spec, HQQConfig(fit_scale=fit_scale))
    assert_valid(qt, w, bits, 64, "hqq")
    hqq_err, rtn_err = group_sq_error(w, qt), group_sq_error(w, quantize(w, spec))
    assert bool((hqq_err <= rtn_err * (1 + 1e-5) + 1e-12).all())
    if bits <= 4:
        assert float(hqq_err.sum()) < float(rtn_err.sum())


def test_hqq_output_error_not_worse_than_rtn(layer):
    w, x, _ = layer
    for bits in (2, 3, 4):
        spec = QuantSpec(bits, 64)
        hqq = out_err(w, dequantize(hqq_quantize(w, spec)), x)
        assert hqq <= out_err(w, dequantize(quantize(w, spec)), x)


def test_hqq_zero_iterations_is_rtn():
    torch.manual_seed(9)
    w = torch.randn(4, 96)
    spec = QuantSpec(3, 32)
    a, b = hqq_quantize(w, spec, HQQConfig(iters=0, refit_iters=0)), quantize(w, spec)
    assert torch.equal(a.q, b.q) and torch.equal(a.zero, b.zero) and torch.equal(a.scale, b.scale)


def test_hqq_batched_and_low_precision():
    torch.manual_seed(10)
    w = (torch.randn(3, 8, 70) * 0.05).bfloat16()  # [E, N, K] stacked experts
    qt = hqq_quantize(w, QuantSpec(4, 32))
    assert_valid(qt, w, 4, 32, "hqq")
    rtn = quantize(w, QuantSpec(4, 32))
    assert float(group_sq_error(w, qt).sum()) <= float(group_sq_error(w, rtn).sum())


def test_hqq_constant_and_zero_groups():
    w = torch.zeros(2, 64)
    w[1] = -0.3
    qt = hqq_quantize(w, QuantSpec(2, 32))
    torch.testing.assert_close(dequantize(qt), w, rtol=1e-6, atol=1e-7)


def test_shrink_lp():
    x = torch.tensor([-2.0, -0.05, 0.0, 0.05, 2.0])
    torch.testing.assert_close(shrink_lp(x, beta=10.0, p=1.0), torch.tensor([-1.9, 0.0, 0.0, 0.0, 1.9]))
    y = shrink_lp(x, beta=10.0, p=0.7)
    assert bool((y.abs() <= x.abs()).all()) and y[2] == 0 and y[1] == 0
    assert bool((torch.sign(y) * torch.sign(x) >= 0).all())


@pytest.mark.parametrize(
    "kwargs, msg",
    [
        ({"iters": -1}, "iters and refit_iters must be >= 0"),
        ({"lp_norm": 0.0}, r"lp_norm must be in \(0, 1\]"),
        ({"lp_norm": 1.5}, r"lp_norm must be in \(0, 1\]"),
        ({"beta": 0.0}, "need beta > 0"),
        ({"kappa": 0.5}, "kappa >= 1"),
    ],
)
def test_hqq_config_validation(kwargs, msg):
    with pytest.raises(ValueError, match=msg):
        HQQConfig(**kwargs)


def test_hqq_rejects_16_bits():
    with pytest.raises(ValueError, match="bits < 16"):
        hqq_quantize(torch.randn(2, 8), QuantSpec(16, 8))


@pytest.mark.parametrize("k", [7, 256, 700])  # one direct block; a split; uneven splits
def test_inverse_cholesky_upper_factors_the_damped_inverse(k):
    """U is upper triangular with a positive diagonal and U^T U = (H + d mean(diag H) I)^{-1}."""
    from dmpq_compile.quant.gptq import inverse_cholesky_upper

    torch.manual_seed(k)
    x = torch.randn(k // 2 + 3, k)  # fewer rows than columns: H is singular, the damping makes it PD
    h = x.T @ x / len(x)
    u = inverse_cholesky_upper(h, 0.01)
    assert torch.equal(torch.triu(u), u) and bool((u.diagonal() > 0).all())
    damped = h.double() + 0.01 * float(h.diagonal().mean()) * torch.eye(k, dtype=torch.float64)
    torch.testing.assert_close(u.double().T @ u.double() @ damped, torch.eye(k, dtype=torch.float64),
                               atol=2e-3, rtol=0)
