"""Error-feedback rounding (GPTQ, Frantar et al. 2023) of the integer codes: the pure algorithm.

Plain rounding picks each weight's code independently. Error feedback quantizes the input columns of a layer one
at a time and spreads each column's rounding error over the columns not yet quantized, weighted by the inverse of
the layer-input second moment ``H = E[x x^T]`` (im2col patches), which minimises ``||(W_q - W) x||^2`` far better
than independent rounding at 2-3 bits. It is closed form: one Cholesky factor per layer, no training.

Speed:

* **One factor per layer.** The update needs ``U``, the upper Cholesky factor of ``H^-1``. With ``J`` the order
  reversal, ``L = chol(J H J)`` gives ``U = J L^-1 J`` (``U^T U = J L^-T L^-1 J = H^-1``, upper, positive
  diagonal): one Cholesky and one triangular inverse, reused by every grid step tried.
* **Lazy blocks.** Columns are processed in blocks of ``block`` (128): inside a block the update touches only the
  block; the rest of the matrix receives the block's accumulated error in one matrix product.
* **The column loop at numpy's cost.** Inside a block each column is a handful of operations on (rows,) vectors and
  a (rows x <= 128) rank-1 update, where torch's per-call overhead (and, on a busy machine, waking OpenMP workers)
  dominates; on the CPU the loop runs the same float32 operations through numpy (identical codes, tested). On a
  ResNet-18 layer shape with another job running, numpy took 0.2-0.5 s where torch took 0.4-22 s.
* **float32** on the update path (the published code's precision); the codes match the float64 reference except
  where a value sits within float32 rounding of a decision boundary (tests/passes/test_rounding.py bounds the
  difference in output error).
* **Grid search without repeating the rounding.** The rows of a layer are independent given ``U``, so every
  candidate grid step is rounded in *one* pass over the columns with the candidates stacked as extra rows, on a
  subset of at most ``search_rows`` rows (all rows when the layer has fewer). The step with the least direction
  error wins and the full layer is rounded once with it. With all rows in the subset (every CIFAR layer) the choice
  is exactly the exhaustive one; above, the subset estimates the sum over rows (tests measure the regret).

The quantizer grid is the layer's own: TWN levels {-alpha, 0, alpha} (Eqs. 3-4), or its k-bit grid (``int`` or the
paper's DoReFa, core.quantizers.round_to_grid), with the same scales as plain rounding (times the searched grid
multiplier); only the choice of code per weight changes.
"""
from __future__ import annotations

from typing import cast

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..core.quantizers import round_to_grid

__all__ = ["nearest_codes", "inverse_factor", "gptq_codes", "direction_error", "best_grid_codes",
           "input_second_moment", "GRID_MULTIPLIERS", "supported", "grouped_codes"]

#: run the column loop of a float32 CPU block through numpy (same results; tests switch it off to compare)
_NUMPY_LOOP = True

#: grid steps tried for a low-bit layer, as multiples of its TWN / k-bit grid scale
GRID_MULTIPLIERS = (0.7, 0.85, 1.0, 1.2, 1.4)


def nearest_codes(v: torch.Tensor, scale: torch.Tensor, bits: int, grid: str = "dorefa") -> torch.Tensor:
    """Nearest grid code of each value ``v`` (rows scaled by ``scale``, broadcast as given): core.quantizers'
    :func:`~dfmpc_deploy.core.quantizers.round_to_grid`."""
    return round_to_grid(v, scale, bits, grid)


def inverse_factor(h: torch.Tensor, damp: float = 0.01) -> tuple[torch.Tensor, torch.Tensor]:
    """``(U, dead)``: the upper Cholesky factor of ``(H + damp * mean(diag H) I)^-1`` and the dead columns.

    Dead columns (``H_ii = 0``: inputs that are zero on every calibration input) get the mean of the live diagonal
    (1 where every column is dead) and no cross terms, so the factor exists and a dead column is rounded to nearest
    with no error fed to the others: the calibration inputs say nothing about it. (Zeroing its weight, as before,
    is right only if the input is zero on real data too; on MobileNetV2 at 224 px synthetic inputs leave some
    channels dark that real images light, and the zeroed filter then collapsed its BN's variance estimate.)

    Args:
        h: (K, K) symmetric positive semi-definite second moment, or a batch (G, K, K) of them (one per group of a
            grouped convolution; the dead columns are then (G, K)).
        damp: relative diagonal loading for conditioning (GPTQ's 1 %).
    """
    h = h.clone()
    diag = h.diagonal(dim1=-2, dim2=-1)  # a view: writes land in h
    dead = diag == 0
    live = (~dead).sum(-1, keepdim=True)
    mean = (diag * ~dead).sum(-1, keepdim=True) / live.clamp_min(1)
    mean = torch.where(live > 0, mean, torch.ones_like(mean))
    diag.copy_(torch.where(dead, mean.expand_as(diag), diag))
    diag.add_(damp * mean)
    lower = torch.linalg.cholesky(torch.flip(h, (-2, -1)))  # J H J: both orders reversed
    eye = torch.eye(h.shape[-1], dtype=h.dtype, device=h.device).expand_as(h)
    inv_lower = torch.linalg.solve_triangular(lower, eye, upper=False)
    return torch.flip(inv_lower, (-2, -1)), dead


@torch.no_grad()
def gptq_codes(w: torch.Tensor, u: torch.Tensor, scale: torch.Tensor, bits: int, block: int = 128,
               grid: str = "dorefa") -> torch.Tensor:
    """Codes for ``w`` (rows, K) on the grid ``scale`` (rows,), minimising the H-weighted output error.

    Args:
        w: FP weight rows, K in im2col order (in, kh, kw).
        u: (K, K) upper Cholesky factor of ``H^-1`` (:func:`inverse_factor`).
        scale: per-row grid step (ternary: alpha; k-bit: the quantizer's step, e.g. DoReFa max|W|/(2^k-1)), > 0.
        bits: 2 (ternary) or 3..8.
        block: columns per lazy block.
        grid: the k-bit grid (core.quantizers.GRIDS).

    Returns:
        (rows, K) integer-valued codes in ``w``'s dtype.
    """
    w = w.clone()
    rows, k = w.shape
    codes = torch.empty_like(w)
    s = scale.to(w.dtype).reshape(rows, 1)
    s_round = torch.where(s > 0, s, torch.ones_like(s))  # a zero-scale row (all-zero channel) dequantises to 0
    cpu = w.device.type == "cpu" and w.is_contiguous()
    for i1 in range(0, k, block):
        i2 = min(i1 + block, k)
        wb = w[:, i1:i2]  # a view: updates land in w
        ub = u[i1:i2, i1:i2]
        errs = torch.empty((rows, i2 - i1), dtype=w.dtype, device=w.device)
        if cpu and w.dtype == torch.float32 and _NUMPY_LOOP:
            _columns_numpy(wb.numpy(), ub.numpy(), s.numpy(), s_round.numpy(), bits, codes[:, i1:i2].numpy(),
                           errs.numpy(), grid)
        else:
            for i in range(i2 - i1):
                col = wb[:, i:i + 1]
                q = round_to_grid(col, s_round, bits, grid)
                codes[:, i1 + i:i1 + i + 1] = q
                err = (col - q * s) / ub[i, i]
                wb[:, i:] -= err * ub[i:i + 1, i:]
                errs[:, i:i + 1] = err
        if i2 < k:
            w[:, i2:] -= errs @ u[i1:i2, i2:]
    return codes


def _columns_numpy(wb: np.ndarray, ub: np.ndarray, s: np.ndarray, s_round: np.ndarray, bits: int, codes: np.ndarray,
                   errs: np.ndarray, grid: str = "dorefa") -> None:
    """The column loop of one lazy block on CPU arrays, in place: the same float32 operations in the same order as
    the torch loop (so the same codes, bit for bit: tests/passes/test_rounding.py), at numpy's per-call cost, a
    fraction of torch's for these (rows,) and (rows x <= 128) operations."""
    for i in range(wb.shape[1]):
        col = wb[:, i:i + 1]
        q = round_to_grid(col, s_round, bits, grid)
        codes[:, i:i + 1] = q
        err = (col - q * s) / ub[i, i]
        wb[:, i:] -= err * ub[i:i + 1, i:]
        errs[:, i:i + 1] = err


def direction_error(codes: torch.Tensor, scale: torch.Tensor, w: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """Per row, ``1 - cos^2`` between ``(q x)`` and ``(w x)`` in the H metric: the part of the output error that a
    per-channel rescale (the BN that follows) cannot remove. Shape (rows,)."""
    q = codes * scale.to(codes.dtype).reshape(-1, 1)
    qh, wh = q @ h, w @ h
    qq, ww, qw = (qh * q).sum(1), (wh * w).sum(1), (qh * w).sum(1)
    return 1 - qw ** 2 / (qq * ww).clamp_min(1e-30)


@torch.no_grad()
def best_grid_codes(w: torch.Tensor, h: torch.Tensor, scale: torch.Tensor, bits: int,
                    multipliers: tuple[float, ...] = GRID_MULTIPLIERS, search_rows: int = 128,
                    seed: int = 0, damp: float = 0.01, grid: str = "dorefa"
                    ) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Error-feedback codes on the grid step ``m * scale`` with the least direction error over ``multipliers``.

    Args:
        w: (rows, K) FP weight; h: (K, K) input second moment; scale: (rows,) base grid step; bits: width.
        multipliers: candidate grid steps (relative to ``scale``); one candidate skips the search.
        search_rows: rows rounded per candidate during the search (all rows when the layer has no more).
        seed: which rows form the subset (fixed, so builds are reproducible).
        damp: see :func:`inverse_factor`.
        grid: the k-bit grid (core.quantizers.GRIDS).

    Returns:
        (codes (rows, K), scale (rows,) of the chosen grid, the chosen multiplier).
    """
    dtype = torch.float32
    w = w.to(dtype)
    h = h.to(dtype)
    u, _ = inverse_factor(h, damp)
    w = w.clone()
    scale = scale.to(dtype)
    rows = w.shape[0]
    best_m = multipliers[0] if len(multipliers) == 1 else None
    if best_m is None:
        if rows <= search_rows:
            idx = torch.arange(rows, device=w.device)
        else:
            gen = torch.Generator().manual_seed(seed)
            idx = torch.randperm(rows, generator=gen)[:search_rows].sort().values.to(w.device)
        ws, ss = w[idx], scale[idx]
        stacked_w = ws.repeat(len(multipliers), 1)
        stacked_s = torch.cat([ss * m for m in multipliers])
        codes = gptq_codes(stacked_w, u, stacked_s, bits, grid=grid)
        err = direction_error(codes, stacked_s, stacked_w, h).reshape(len(multipliers), -1).sum(1)
        j = int(torch.argmin(err))
        best_m = multipliers[j]
        if len(idx) == rows:  # the search rounded every row already: keep those codes
            return codes[j * rows:(j + 1) * rows], stacked_s[j * rows:(j + 1) * rows], best_m
    chosen = scale * best_m
    return gptq_codes(w, u, chosen, bits, grid=grid), chosen, best_m


@torch.no_grad()
def grouped_codes(w: torch.Tensor, h: torch.Tensor, scale: torch.Tensor, bits: int, groups: int,
                  multipliers: tuple[float, ...] = (1.0,), damp: float = 0.01, grid: str = "dorefa"
                  ) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Error feedback for a grouped (e.g. depthwise) convolution: each group's rows use that group's input second
    moment, every group rounded at once (the column loop is over the few columns of one group: 9 for a 3x3
    depthwise layer). The grid step is searched over ``multipliers`` as in :func:`best_grid_codes` (every row
    takes part: rounding all groups costs little).

    Args:
        w: (rows, K) FP weight, rows = groups x rows per group, K = in-channels per group x kh x kw.
        h: (groups, K, K) per-group input second moments (:func:`input_second_moment`).
        scale, bits, multipliers, damp, grid: as :func:`best_grid_codes`.

    Returns:
        (codes (rows, K), scale (rows,) of the chosen grid, the chosen multiplier).
    """
    rows, k = w.shape
    u, _ = inverse_factor(h.float(), damp)
    wg = w.float().reshape(groups, rows // groups, k).clone()
    best: tuple[float, torch.Tensor, torch.Tensor, float] | None = None
    for m in multipliers:
        s = (scale.float() * m).reshape(groups, rows // groups)
        codes = _grouped_gptq(wg, u, s, bits, grid)
        err = _grouped_direction_error(codes, s, wg, h.float())
        if best is None or err < best[0]:
            best = (err, codes, s, m)
    assert best is not None
    _, codes, s, m = best
    return codes.reshape(rows, k), s.reshape(rows), m


def _grouped_gptq(w: torch.Tensor, u: torch.Tensor, s: torch.Tensor, bits: int, grid: str) -> torch.Tensor:
    """:func:`gptq_codes` batched over groups: ``w`` (G, R, K), ``u`` (G, K, K), ``s`` (G, R)."""
    w = w.clone()
    codes = torch.empty_like(w)
    s = s[..., None]
    s_round = torch.where(s > 0, s, torch.ones_like(s))
    for i in range(w.shape[-1]):
        col = w[:, :, i:i + 1]
        q = round_to_grid(col, s_round, bits, grid)
        codes[:, :, i:i + 1] = q
        err = (col - q * s) / u[:, i, i].reshape(-1, 1, 1)
        w[:, :, i:] -= err * u[:, None, i, i:]
    return codes


def _grouped_direction_error(codes: torch.Tensor, s: torch.Tensor, w: torch.Tensor, h: torch.Tensor) -> float:
    """:func:`direction_error` summed over every row of every group."""
    q = codes * s[..., None]
    qh, wh = q @ h, w @ h
    qq, ww, qw = (qh * q).sum(-1), (wh * w).sum(-1), (qh * w).sum(-1)
    return float((1 - qw ** 2 / (qq * ww).clamp_min(1e-30)).sum())


def input_second_moment(module: nn.Module, x: torch.Tensor, max_rows: int | None = None,
                        shrink: bool = False) -> torch.Tensor:
    """``E[p p^T]`` (float32) over the im2col patches ``p`` that ``module`` (Conv2d or Linear) sees in ``x``; with
    ``max_rows`` a fixed, evenly spaced subset of at most that many patches is used. A grouped convolution gets one
    matrix per group: shape (groups, K, K), K = in-channels per group x kh x kw (computed one sample at a time, so a
    depthwise layer at 112 px needs no full im2col copy).

    ``shrink``: the off-diagonal entries are shrunk towards 0 by the estimated noise of the mean over the samples
    (:func:`shrink_to_diagonal`; ``max_rows`` is then not used): the samples, not the patches, are the independent
    draws, and 8 synthetic samples at 224 px give a late layer fewer patches than it has columns."""
    if shrink:
        return _shrunk_second_moment(module, x)
    if isinstance(module, nn.Conv2d) and module.groups > 1:
        total: torch.Tensor | None = None
        count = 0
        for xi in x.split(1):
            cols = _group_patches(module, xi)
            part = cols @ cols.transpose(1, 2)
            total = part if total is None else total + part
            count += cols.shape[-1]
        assert total is not None
        return total / max(1, count)
    cols = _patches(module, x)
    if max_rows is not None and cols.shape[0] > max_rows:
        cols = cols[torch.linspace(0, cols.shape[0] - 1, max_rows, device=cols.device).long()]
    return cols.T @ cols / max(1, cols.shape[0])


def _group_patches(conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """The float32 im2col columns of one sample ``x`` (1, C, H, W) of a grouped Conv2d, per group: (G, K, L)."""
    cols = F.unfold(x, conv.kernel_size, conv.dilation, cast(tuple[int, ...], conv.padding), conv.stride).float()
    return cols.reshape(conv.groups, -1, cols.shape[-1])


def _patches(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The (patches, K) float32 im2col rows of an ungrouped Conv2d's input, or a Linear's input rows."""
    if isinstance(module, nn.Conv2d):
        cols = F.unfold(x, module.kernel_size, module.dilation, cast(tuple[int, ...], module.padding), module.stride)
        cols = cols.transpose(1, 2).reshape(-1, cols.shape[1])
    else:
        cols = x.reshape(-1, x.shape[-1])
    return cols.float()


def _shrunk_second_moment(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """:func:`input_second_moment` with ``shrink``: per-sample second moments, their mean and elementwise mean
    square, then :func:`shrink_to_diagonal`."""
    total = total_sq = None
    n = 0
    for xi in x.split(1):
        if isinstance(module, nn.Conv2d) and module.groups > 1:
            cols = _group_patches(module, xi)
            h = cols @ cols.transpose(1, 2) / max(1, cols.shape[-1])
        else:
            cols = _patches(module, xi)
            h = cols.T @ cols / max(1, cols.shape[0])
        total = h if total is None else total + h
        total_sq = h * h if total_sq is None else total_sq + h * h
        n += 1
    assert total is not None and total_sq is not None
    return shrink_to_diagonal(total / n, total_sq / n, n)


def shrink_to_diagonal(mean: torch.Tensor, mean_sq: torch.Tensor, n: int) -> torch.Tensor:
    """Schaefer-Strimmer shrinkage of a second moment estimated as the mean of ``n`` independent per-sample
    matrices (``mean``, with elementwise mean square ``mean_sq``; (K, K) or a batch (G, K, K)) towards its diagonal:
    ``(1 - lam) H + lam diag(H)`` with ``lam = sum_{i != j} Var(H_ij) / sum_{i != j} H_ij^2`` in [0, 1], ``Var`` the
    variance of the mean over the samples. With one sample nothing is known of the noise: returned unchanged."""
    if n < 2:
        return mean
    var = (mean_sq - mean * mean).clamp_min(0) / (n - 1)
    off = 1 - torch.eye(mean.shape[-1], dtype=mean.dtype, device=mean.device)
    num = (var * off).sum(dim=(-2, -1), keepdim=True)
    den = (mean * mean * off).sum(dim=(-2, -1), keepdim=True)
    lam = torch.where(den > 0, num / den.clamp_min(1e-30), torch.ones_like(den)).clamp(0, 1)
    return mean * (1 - lam * off)


def supported(m: nn.Module) -> bool:
    """Layers error feedback handles: Linear and zero-padded Conv2d (grouped ones by :func:`grouped_codes`)."""
    return isinstance(m, nn.Linear) or (isinstance(m, nn.Conv2d) and m.padding_mode == "zeros")
