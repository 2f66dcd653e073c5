"""HQQ: half-quadratic optimisation of the zero point (and optionally the scale).

After Badri & Shaji (2023), "Half-Quadratic Quantization of Large Machine Learning Models".
For fixed bits and groups, the zero point ``Z`` (and optionally the scale ``S``) of each
group is chosen to minimise a robust ``l_p`` (``p < 1``) reconstruction error
``||W - (q - Z) S||_p^p`` with ``q = clamp(round(W / S + Z), 0, 2**b - 1)``. Half-quadratic
splitting introduces an auxiliary error variable ``E`` and alternates, starting from RTN::

    q = clamp(round(W / S + Z))                   # codes for the current (S, Z)
    E = shrink_p((W - (q - Z) S) / S, beta)       # proximal l_p step, in units of S
    Z = mean_group(q - W / S + E)                 # closed-form zero for the l2 sub-problem
    [optional] (S, Z) = least-squares fit of W - E S ~ S (q - Z)
    beta = beta * kappa

with ``shrink_p(x, beta) = sign(x) * max(|x| - |x|**(p - 1) / beta, 0)``. Working in units of
the quantization step makes ``beta`` dimensionless (independent of the weights' magnitude).

Integer zero points (this format, and ONNX Runtime ``MatMulNBits``, store ``Z`` as uint8):
after the iterations ``Z`` is rounded and clamped to ``[0, 2**b - 1]`` and ``S`` is re-fit
for that integer ``Z`` by alternating codes and the closed-form ``S = <W, q - Z> / |q - Z|^2``.
Finally each group keeps, among the RTN parameters, every iterate and the re-fit one, the
candidate with the smallest squared weight error, so the result is never worse than RTN in
weight MSE. Groups follow RTN's ragged-K rule (padded entries are masked out of all means).
The symmetric per-channel scheme (``sym-channel-v1``) has no zero point to optimise: refused.
"""

from __future__ import annotations

import dataclasses

import torch

from dmpq_compile.quant.rtn import (
    QuantizedTensor,
    affine_params,
    check_weight,
    num_groups,
    pad_to_groups,
    quantize_codes,
    round_scales,
)
from dmpq_compile.quant.spec import QuantSpec


@dataclasses.dataclass(frozen=True)
class HQQConfig:
    """Hyper-parameters of :func:`hqq_quantize`.

    Attributes:
        iters: Half-quadratic iterations (``>= 0``).
        lp_norm: ``p`` of the robust error norm, in ``(0, 1]``.
        beta: Initial half-quadratic penalty (dimensionless, ``> 0``).
        kappa: Multiplicative growth of ``beta`` per iteration (``>= 1``).
        fit_scale: Also update the scale in each iteration (least squares).
        refit_iters: Scale re-fit iterations after rounding the zero point (``>= 0``).
    """

    iters: int = 20
    lp_norm: float = 0.7
    beta: float = 10.0
    kappa: float = 1.01
    fit_scale: bool = False
    refit_iters: int = 3

    def __post_init__(self) -> None:
        if self.iters < 0 or self.refit_iters < 0:
            raise ValueError(f"iters and refit_iters must be >= 0, got {self.iters}, {self.refit_iters}")
        if not 0 < self.lp_norm <= 1:
            raise ValueError(f"lp_norm must be in (0, 1], got {self.lp_norm}")
        if not self.beta > 0 or not self.kappa >= 1:
            raise ValueError(f"need beta > 0 and kappa >= 1, got beta={self.beta}, kappa={self.kappa}")


def shrink_lp(x: torch.Tensor, beta: float, p: float) -> torch.Tensor:
    """Generalised soft-thresholding ``sign(x) * max(|x| - |x|**(p-1) / beta, 0)`` (elementwise)."""
    ax = x.abs()
    thresh = ax.clamp(min=1e-12).pow(p - 1.0) / beta
    return torch.sign(x) * torch.relu(ax - thresh)


def _masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over the last axis counting only ``mask == 1`` entries (``x, mask [..., gs]``)."""
    return (x * mask).sum(dim=-1) / mask.sum(dim=-1)


def _group_sq_error(
    wg: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int, mask: torch.Tensor
) -> torch.Tensor:
    """Squared reconstruction error per group ``[..., G]`` for ``wg [..., G, gs]``."""
    s, z = scale[..., None], zero[..., None]
    q = quantize_codes(wg, s, z, bits)
    return (((q - z) * s - wg) ** 2 * mask).sum(dim=-1)


def _lsq_fit(
    target: torch.Tensor, q: torch.Tensor, mask: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Least-squares ``target ~ S (q - Z)`` per group; keeps old ``(S, Z)`` where degenerate."""
    qm, tm = _masked_mean(q, mask)[..., None], _masked_mean(target, mask)[..., None]
    cov = ((q - qm) * (target - tm) * mask).sum(dim=-1)
    var = ((q - qm) ** 2 * mask).sum(dim=-1)
    new_s = cov / var.clamp(min=1e-12)
    ok = (var > 1e-12) & (new_s > 0) & torch.isfinite(new_s)
    new_s = torch.where(ok, new_s, scale)
    new_z = torch.where(ok, qm[..., 0] - tm[..., 0] / new_s, zero)
    return new_s, new_z


def _hq_step(
    wg: torch.Tensor,
    scale: torch.Tensor,
    zero: torch.Tensor,
    beta: float,
    bits: int,
    mask: torch.Tensor,
    cfg: HQQConfig,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One half-quadratic iteration; returns the new ``(scale, zero)`` ``[..., G]``."""
    qmax = float((1 << bits) - 1)
    s, z = scale[..., None], zero[..., None]
    u = wg / s  # [..., G, gs] weights in units of the step
    q = quantize_codes(wg, s, z, bits)
    e = shrink_lp(u - (q - z), beta, cfg.lp_norm)
    zero = _masked_mean(q - u + e, mask).clamp(0.0, qmax)
    if cfg.fit_scale:
        scale, zero = _lsq_fit(wg - e * s, q, mask, scale, zero)
        zero = zero.clamp(0.0, qmax)
    return scale, zero


def _refit_scale(
    wg: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int, mask: torch.Tensor, iters: int
) -> torch.Tensor:
    """Re-fit ``S`` for a fixed integer ``Z`` by alternating codes and ``S = <W, q-Z> / |q-Z|^2``."""
    for _ in range(iters):
        d = (quantize_codes(wg, scale[..., None], zero[..., None], bits) - zero[..., None]) * mask
        num, den = (wg * d).sum(dim=-1), (d * d).sum(dim=-1)
        new_s = num / den.clamp(min=1e-12)
        scale = torch.where((den > 0) & (new_s > 0) & torch.isfinite(new_s), new_s, scale)
    return scale


def _keep_better(
    best: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    scale: torch.Tensor,
    zero: torch.Tensor,
    err: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per group, keep ``(scale, zero, err)`` where ``err`` is strictly below the best so far."""
    b_s, b_z, b_e = best
    better = err < b_e
    return torch.where(better, scale, b_s), torch.where(better, zero, b_z), torch.where(better, err, b_e)


def _valid_mask(k: int, group_size: int, device: torch.device) -> torch.Tensor:
    """float32 ``[G, gs]`` mask: 1 for real columns, 0 for ragged-K padding."""
    g = num_groups(k, group_size)
    cols = torch.arange(g * group_size, device=device).reshape(g, group_size)
    return (cols < k).to(torch.float32)


def hqq_quantize(w: torch.Tensor, spec: QuantSpec, config: HQQConfig | None = None) -> QuantizedTensor:
    """HQQ quantization of a weight (see module docstring); no calibration data needed.

    Args:
        w: Weight ``[N, K]`` or ``[*B, N, K]`` (float32/float16/bfloat16, finite).
        spec: ``bits < 16`` and ``group_size``; the result records ``method="hqq"``.
        config: Hyper-parameters (defaults: :class:`HQQConfig`).

    Returns:
        :class:`QuantizedTensor` in the RTN format whose per-group squared weight error is
        at most RTN's.
    """
    check_weight(w)
    if not isinstance(spec, QuantSpec) or not spec.is_quantized:
        raise ValueError(f"hqq_quantize needs a QuantSpec with bits < 16, got {spec!r}")
    if spec.symmetric:
        raise ValueError(f"HQQ optimises zero points; scheme {spec.scheme!r} has none (use rtn or gptq)")
    cfg = config or HQQConfig()
    bits, gs, k = spec.bits, spec.group_size, w.shape[-1]
    wg = pad_to_groups(w.detach().to(torch.float32), gs)  # [*B, N, G, gs]
    mask = _valid_mask(k, gs, w.device)  # [G, gs]
    scale, zero = affine_params(wg, bits, spec.scale_dtype)  # RTN start, [*B, N, G]
    rtn = (scale, zero, _group_sq_error(wg, scale, zero, bits, mask))
    best = rtn
    beta = cfg.beta
    for _ in range(cfg.iters):
        scale, zero = _hq_step(wg, scale, zero, beta, bits, mask, cfg)
        beta *= cfg.kappa
        z_int = torch.round(zero)
        best = _keep_better(best, scale, z_int, _group_sq_error(wg, scale, z_int, bits, mask))
    z_int = torch.round(best[1])
    s_fit = _refit_scale(wg, best[0], z_int, bits, mask, cfg.refit_iters)
    # the candidates with their scales as stored (float16: rounded up), each kept only if it beats
    # the (stored-exact) RTN start
    final = rtn
    for s in (best[0], s_fit):
        s = round_scales(s, spec.scale_dtype)
        final = _keep_better(final, s, z_int, _group_sq_error(wg, s, z_int, bits, mask))
    scale, zero, _ = final
    q = quantize_codes(wg, scale[..., None], zero[..., None], bits).reshape(*w.shape[:-1], -1)[..., :k]
    return QuantizedTensor(
        q=q.to(torch.uint8),
        scale=scale,
        zero=zero.to(torch.uint8),
        spec=dataclasses.replace(spec, method="hqq"),
        shape=tuple(w.shape),
    )
