"""GPTQ: Hessian-aware rounding of one linear layer (Frantar et al., 2022).

Goal: choose codes for ``W [N, K]`` minimising the layer-output error on calibration inputs
``X [M, K]``, ``||X W^T - X W'^T||_F^2 = tr((W - W') H (W - W')^T)`` with ``H = X^T X``.
Rows of ``W`` are independent given ``H``, so all N rows are processed together, column by
column (fixed natural order). After column ``j`` is rounded, its error is spread over the not
yet quantized columns ``j+1..K-1`` in the way that is optimal for the quadratic objective
(Optimal Brain Surgeon update). With ``U`` the upper Cholesky factor of ``H^{-1}``
(``H^{-1} = U^T U``) the update for column ``j`` is::

    e       = (w_j - dequant(q_j)) / U[j, j]                      # [N]
    W[:, j+1:] -= e[:, None] * U[j, j+1:][None, :]

Updates are applied lazily in blocks of columns: inside a block immediately, to the columns
after the block once per block (a rank-``block`` matrix product). Blocks are aligned to
groups (``block = group_size * max(1, block_size // group_size)``), so when the first column
of a group is reached the whole group is inside the current, fully updated block; its scale
and integer zero point are then fixed from the *updated* weights, either with the plain RTN
min/max rule (:func:`dmpq_compile.quant.rtn.affine_params`) or, by default, with a search over
shrunk ranges (:func:`dmpq_compile.quant.rtn.clip_search_params`), which matters most at 2-3
bits. The output format is exactly RTN's for the spec's scheme (float16 scales included: the
scales are rounded before the group's codes are chosen).

Per-channel symmetric specs (``sym-channel-v1``): the error feedback works with any quantizer
grid, so only the grid changes. Each row's scale is fixed once, from the original weights
before the first column (as the paper's per-channel quantizer does), and blocks are plain
``block_size`` columns; codes are ``clamp(round(w / s), -qs, qs)``, clamped where the error
feedback pushed a weight beyond the row's range.

Conditioning: ``H += damp * mean(diag(H)) * I`` before factorisation (damping is multiplied by
10 and retried, up to 4 times, if the Cholesky factorisation fails). Dead inputs
(``H[j, j] == 0``: the feature was always zero in the calibration data) are decoupled: row and
column ``j`` of ``H`` are zeroed and ``H[j, j]`` set to the mean live diagonal. Their weights
are *kept* (not zeroed, as the paper's implementation does): in an MoE, an expert that saw few
or no calibration tokens still receives tokens at inference. Such columns get plain rounding
within their group and neither receive nor spread error feedback; with ``H == 0`` (an expert
never routed during calibration) the result is RTN's.
"""

from __future__ import annotations

import dataclasses
import logging

import torch

from dmpq_compile.quant.rtn import (
    QuantizedTensor,
    check_weight,
    clip_search_params,
    grid_codes,
    grid_params,
)
from dmpq_compile.quant.spec import QuantSpec

logger = logging.getLogger(__name__)

_DAMP_RETRIES = 4


def accumulate_hessian(h: torch.Tensor | None, x: torch.Tensor, n: int) -> tuple[torch.Tensor, int]:
    """Fold a batch of activations into the running mean of ``x^T x``.

    Args:
        h: Running mean ``[K, K]`` float32 over ``n`` previous rows, or ``None`` when ``n == 0``.
        x: Activations ``[..., K]`` (float); leading axes are flattened into rows ``[M, K]``.
        n: Number of rows already folded into ``h`` (``>= 0``).

    Returns:
        ``(h_new, n + M)`` with ``h_new = (n * h + x^T x) / (n + M)`` (float32, ``x``'s device).
        ``h`` is not modified.

    Raises:
        TypeError / ValueError: Bad dtypes, shapes, or ``n`` inconsistent with ``h``.
    """
    if not isinstance(x, torch.Tensor) or not x.is_floating_point() or x.dim() < 1:
        raise TypeError("x must be a floating-point torch.Tensor of shape [..., K]")
    k = x.shape[-1]
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise ValueError(f"n must be a non-negative int, got {n!r}")
    if h is None:
        if n != 0:
            raise ValueError(f"h is None but n = {n} rows were already accumulated")
        h = torch.zeros(k, k, dtype=torch.float32, device=x.device)
    elif tuple(h.shape) != (k, k):
        raise ValueError(f"h must have shape [K, K] = ({k}, {k}) to match x, got {tuple(h.shape)}")
    rows = x.reshape(-1, k).to(device=h.device, dtype=torch.float32)  # [M, K]
    total = n + rows.shape[0]
    if total == 0:
        return h.to(torch.float32).clone(), 0
    h_new = torch.addmm(h.to(torch.float32), rows.T, rows, beta=n / total, alpha=1.0 / total)
    return h_new, total


def output_error(w: torch.Tensor, w_hat: torch.Tensor, h: torch.Tensor) -> float:
    """Quadratic output error ``tr((W - W') H (W - W')^T)`` (pre: ``W, W' [N, K]``, ``H [K, K]``).

    Equals ``||X W^T - X W'^T||_F^2`` when ``H = X^T X`` (or its mean when ``H`` is a mean).
    """
    d = (w.to(torch.float32) - w_hat.to(torch.float32)).to(h.device)  # [N, K]
    return float(((d @ h.to(torch.float32)) * d).sum())


def _check_hessian(h: torch.Tensor, k: int) -> None:
    """Validate ``h`` as a finite float ``[K, K]`` matrix."""
    if not isinstance(h, torch.Tensor) or not h.is_floating_point():
        raise TypeError(f"h must be a floating-point torch.Tensor, got {type(h).__name__}")
    if tuple(h.shape) != (k, k):
        raise ValueError(f"h must have shape [K, K] = ({k}, {k}), got {tuple(h.shape)}")
    if not bool(torch.isfinite(h).all()):
        raise ValueError("h contains NaN or Inf values")


def _prepare(w: torch.Tensor, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Float32 working copies of ``w [N, K]`` and ``h [K, K]`` with dead inputs decoupled."""
    w = w.detach().to(torch.float32).clone()
    h = h.detach().to(device=w.device, dtype=torch.float32)
    h = (h + h.T).mul_(0.5)  # a symmetric copy (against accumulation round-off); one [K, K] temporary
    dead = torch.diagonal(h) <= 0  # [K]
    if bool(dead.any()):
        logger.debug("GPTQ: %d dead input columns", int(dead.sum()))
        live_diag = torch.diagonal(h)[~dead]
        fill = float(live_diag.mean()) if live_diag.numel() else 1.0
        h[dead, :] = 0.0
        h[:, dead] = 0.0
        h[dead, dead] = fill
    return w, h


def inverse_cholesky_upper(h: torch.Tensor, damp: float) -> torch.Tensor:
    """Upper Cholesky factor ``U`` of ``(H + d * mean(diag H) * I)^{-1}`` (``H^{-1} = U^T U``).

    With ``J`` the reversal permutation and ``J H J = L L^T`` (lower Cholesky), ``U = J L^{-1} J``:
    ``U`` is upper triangular and ``U^T U = J L^{-T} L^{-1} J = H^{-1}``. So one factorisation and
    one triangular inverse (:func:`_lower_inverse_into`, about ``K^3 / 3`` flops each) replace the
    usual factorise, invert, factorise again (``4 K^3 / 3``): 0.6x the time at K = 8192, and the
    same ``U`` to about 1e-6 relative. At K = 14336 (a Mixtral-width down_proj) this step dominates
    GPTQ's time.

    Args:
        h: Symmetric positive semi-definite float32 ``[K, K]`` with positive diagonal.
        damp: Relative damping ``d > 0``; multiplied by 10 on each failed factorisation.

    Returns:
        Upper-triangular float32 ``[K, K]`` with positive diagonal.

    Raises:
        ValueError: Factorisation still fails after the retries.
    """
    mean_diag = float(torch.diagonal(h).mean())
    for attempt in range(_DAMP_RETRIES + 1):
        # at most two [K, K] matrices besides ``h`` at a time (no identity matrix): at K = 14336
        # each is 0.8 GB
        damped = h.flip(0, 1)  # J H J (a copy)
        damped.diagonal().add_((damp * 10**attempt) * mean_diag)
        lower, info = torch.linalg.cholesky_ex(damped)
        del damped
        if int(info) == 0:
            out = torch.empty_like(lower)
            _lower_inverse_into(lower, out)
            del lower
            return out.flip(0, 1)
        logger.warning("GPTQ: Cholesky failed at damp=%g, retrying", damp * 10**attempt)
    raise ValueError("GPTQ: Hessian is not positive definite even after damping")


def _lower_inverse_into(lower: torch.Tensor, out: torch.Tensor, base: int = 256) -> None:
    """``out = lower^{-1}`` for a lower-triangular ``lower`` with positive diagonal, by halves:
    ``[[A, 0], [C, D]]^{-1} = [[A^{-1}, 0], [-D^{-1} C A^{-1}, D^{-1}]]``, so nearly all the work
    is two matrix products per level; blocks of ``base`` or fewer rows are solved directly."""
    n = lower.shape[0]
    if n <= base:
        eye = torch.eye(n, dtype=lower.dtype, device=lower.device)
        out.copy_(torch.linalg.solve_triangular(lower, eye, upper=False))
        return
    m = n // 2
    _lower_inverse_into(lower[:m, :m], out[:m, :m], base)
    _lower_inverse_into(lower[m:, m:], out[m:, m:], base)
    torch.matmul(out[m:, m:], lower[m:, :m] @ out[:m, :m], out=out[m:, :m])
    out[m:, :m].neg_()
    out[:m, m:].zero_()


@dataclasses.dataclass(frozen=True)
class _Grid:
    """The quantizer grid GPTQ rounds onto: bits, scheme and how group parameters are chosen."""

    bits: int
    symmetric: bool
    clip_search: bool
    scale_dtype: str = "float32"

    def params(self, wg: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.clip_search:
            return clip_search_params(wg, self.bits, symmetric=self.symmetric, scale_dtype=self.scale_dtype)
        return grid_params(wg, self.bits, self.symmetric, self.scale_dtype)

    def codes(self, w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
        return grid_codes(w, scale, zero, self.bits, self.symmetric)


def _quantize_block(
    wt_blk: torch.Tensor, u_blk: torch.Tensor, grid: _Grid, group_size: int | None,
    fixed: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor], list[torch.Tensor]]:
    """Quantize one block column by column with in-block error feedback.

    The block is held transposed, one weight column per contiguous row, so reading a column and
    the rank-1 update of the columns after it run over contiguous memory (column-major work on a
    row-major ``[N, B]`` view touched one cache line per element: 2.6x slower at N = 1024).

    Args:
        wt_blk: Updated weights of the block, transposed: ``[B, N]`` contiguous (modified in place).
        u_blk: ``U[b0:b1, b0:b1]`` ``[B, B]``, upper triangular.
        grid: Bits, scheme and parameter rule.
        group_size: Group length; the block starts at a group boundary. None: per-channel
            parameters ``fixed`` for every column.
        fixed: ``(scale, zero)`` ``[N]`` when ``group_size`` is None.

    Returns:
        ``(codes [B, N], err [B, N], scales, zeros)`` (transposed like ``wt_blk``); ``err`` are the
        scaled errors ``e``; ``scales``/``zeros`` hold one ``[N]`` float32 tensor per group started
        in the block.
    """
    width = wt_blk.shape[0]
    codes = torch.empty_like(wt_blk)
    err = torch.empty_like(wt_blk)
    scales: list[torch.Tensor] = []
    zeros: list[torch.Tensor] = []
    scale, zero = fixed if fixed is not None else (None, None)
    for j in range(width):
        if group_size is not None and j % group_size == 0:
            scale, zero = grid.params(wt_blk[j : j + group_size].T)  # [N]
            scales.append(scale)
            zeros.append(zero)
        col = wt_blk[j]  # [N]
        q = grid.codes(col, scale, zero)
        codes[j] = q
        err[j] = (col - (q - zero) * scale) / u_blk[j, j]
        if j + 1 < width:
            wt_blk[j + 1 :].sub_(u_blk[j, j + 1 :, None] * err[j][None, :])
    return codes, err, scales, zeros


def gptq_quantize(
    w: torch.Tensor,
    h: torch.Tensor,
    spec: QuantSpec,
    *,
    damp: float = 0.01,
    block_size: int = 128,
    clip_search: bool = True,
) -> QuantizedTensor:
    """GPTQ quantization of one linear weight (see module docstring).

    Args:
        w: Weight ``[N, K]`` (float32/float16/bfloat16, finite).
        h: Input second moment ``[K, K]`` (``X^T X`` or its mean, e.g. from
            :func:`accumulate_hessian`); symmetric positive semi-definite.
        spec: ``bits < 16``, ``group_size`` and scheme (group-wise affine or per-channel
            symmetric); the result records ``method="gptq"``.
        damp: Relative dampening added to the diagonal (fraction of its mean), ``> 0``.
        block_size: Columns per lazy-update block (rounded to a multiple of ``group_size``).
        clip_search: Pick each group's (or row's) scale/zero by a shrunk-range error search
            (:func:`clip_search_params`); ``False`` uses the plain RTN rule.

    Returns:
        :class:`QuantizedTensor` in the RTN format of ``spec.scheme``, on ``w``'s device.

    Raises:
        TypeError / ValueError: Bad shapes, dtypes, values or spec.
    """
    check_weight(w)
    if w.dim() != 2:
        raise ValueError(f"gptq_quantize expects w of shape [N, K], got {tuple(w.shape)}")
    if not isinstance(spec, QuantSpec) or not spec.is_quantized:
        raise ValueError(f"gptq_quantize needs a QuantSpec with bits < 16, got {spec!r}")
    if not damp > 0 or isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
        raise ValueError(f"need damp > 0 and block_size >= 1, got damp={damp!r}, block_size={block_size!r}")
    k, gs = w.shape[1], spec.group_size
    _check_hessian(h, k)
    wk, hk = _prepare(w, h)  # [N, K], [K, K]
    upper = inverse_cholesky_upper(hk, damp)  # [K, K]
    del hk
    grid = _Grid(spec.bits, spec.symmetric, clip_search, spec.scale_dtype)
    fixed = grid.params(wk) if gs is None else None  # per channel: [N] from the original rows
    block = block_size if gs is None else gs * max(1, block_size // gs)
    wt = wk.T.contiguous()  # [K, N]: the column loop reads contiguous rows (see _quantize_block)
    del wk
    codes, scales, zeros = torch.empty(wt.shape, dtype=torch.uint8, device=wt.device), [], []
    if fixed is not None:
        scales, zeros = [fixed[0]], [fixed[1]]
    for b0 in range(0, k, block):
        b1 = min(b0 + block, k)
        q, err, s, z = _quantize_block(wt[b0:b1], upper[b0:b1, b0:b1], grid, gs, fixed)
        codes[b0:b1] = q
        scales += s
        zeros += z
        if b1 < k:  # lazy update of later columns: W[:, b1:] -= E U[b0:b1, b1:], transposed
            wt[b1:].addmm_(upper[b0:b1, b1:].T, err, alpha=-1.0)
    return QuantizedTensor(
        q=codes.T.contiguous(),
        scale=torch.stack(scales, dim=1),  # [N, G]
        zero=torch.stack(zeros, dim=1).to(torch.uint8),  # [N, G]
        spec=dataclasses.replace(spec, method="gptq"),
        shape=tuple(w.shape),
    )
