"""Pure weight quantizers (no module state). Each returns integer codes and a per-output-channel scale with
``dequant = codes * scale[:, None, ...]``.

* :func:`ternarize` - TWN, Eqs. 3-4: threshold ``0.7 * mean|W|``, codes in {-1, 0, +1},
  scale ``alpha = mean |W|`` over entries above the threshold. Every 2-bit layer, whatever the grid.
* :func:`int_grid` (grid ``int``, the default) - symmetric integer grid with a zero level, the form TensorRT and ONNX
  INT8/INT4 execute (zero-point 0): levels ``s * q`` with ``q`` a k-bit two's complement integer in
  ``[-2^(k-1), 2^(k-1)-1]`` (``[-128, 127]`` at 8 bits). The step ``s`` is the candidate with the least weight
  error ``||W - s q||^2`` (per tensor, or per output channel with ``per_channel``) among: the narrow-range step
  ``max|W| / (2^(k-1)-1)`` (codes in ``[-(2^(k-1)-1), 2^(k-1)-1]``, TensorRT's weight range), the full-range step
  ``max|W| / 2^(k-1)`` (where the most negative weight is the lattice's ``-2^(k-1)``), clipped steps ``r max|W| /
  (2^(k-1)-1)`` for the ratios :data:`INT_CLIP_RATIOS`, lattice steps ``min|W != 0| / d`` for d = 1 ..
  :data:`LATTICE_DIVISORS` (a lattice whose largest code is below 127, as quantization-aware training leaves some
  layers), and with ``per_channel`` also the per-tensor steps (a per-tensor lattice is then kept as it is). The chosen
  float32 step is finally moved by at most :data:`SNAP_ULPS` units in the last place where that lowers the error of
  the chosen codes, so **weights that already lie on an int8 lattice (torchvision's quantized models) come back
  bit-exactly at 8 bits**, per tensor and per channel: ``-128`` included.
* :func:`dorefa` (grid ``dorefa``, the paper's) - DoReFa k-bit, Eq. 6 exactly as printed (no tanh): ``kQ(W) =
  2/(2^k-1) * round[(2^k-1)(W/(2 max|W|) + 1/2)] - 1``; the 2^k levels are odd multiples of ``1/(2^k-1)`` (zero is not
  a level), so the codes are the odd integers ``q = 2m - (2^k-1)`` in ``[-(2^k-1), 2^k-1]`` and the scale is
  ``max|W| / (2^k-1)``.

Both grids are layer-wise (one range per tensor, D7) unless ``per_channel=True``. :func:`round_to_grid` is the one
rounding rule every pass uses (quantize, error feedback, grid-step searches, allocation, fine-tuning), so a pass
passes a layer's ``grid`` along and never needs to know which it is.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import torch

__all__ = ["GRIDS", "DEFAULT_GRID", "INT_CLIP_RATIOS", "SNAP_ULPS", "LATTICE_DIVISORS", "check_grid", "grid_label",
           "ternarize", "int_grid", "dorefa", "quantize_weight", "round_to_grid", "dequantize", "code_range"]

#: the k-bit grids (3..8 bits; 2 bits is always TWN ternary): ``int`` (zero level, INT8/INT4-executable) and
#: ``dorefa`` (the paper's Eq. 6)
GRIDS = ("int", "dorefa")
#: the grid a build uses unless ``--grid`` says otherwise (the one place to switch it)
DEFAULT_GRID = "int"
#: clipped steps tried by :func:`int_grid`, as fractions of the narrow-range step ``max|W| / (2^(k-1)-1)``
INT_CLIP_RATIOS = tuple(round(1.0 - 0.025 * i, 3) for i in range(1, 33))  # 0.975 .. 0.2
#: float32 units in the last place the chosen int step may move to fit a lattice exactly
SNAP_ULPS = 2
#: lattice steps tried by :func:`int_grid`: the smallest non-zero ``|W|`` divided by 1 .. this
LATTICE_DIVISORS = 4

_LABELS = {"int": "int", "dorefa": "DoReFa"}


def check_grid(grid: str) -> str:
    """``grid`` if it is one of :data:`GRIDS`, else ValueError naming it and the choices."""
    if grid not in GRIDS:
        raise ValueError(f"unknown grid {grid!r}: choose one of {', '.join(GRIDS)}")
    return grid


def grid_label(grid: str) -> str:
    """How reports name a grid: ``int`` or ``DoReFa``."""
    return _LABELS[check_grid(grid)]


def _flat(w: torch.Tensor) -> torch.Tensor:
    return w.reshape(w.shape[0], -1)


def ternarize(w: torch.Tensor, per_channel: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """TWN ternarization (Eqs. 3-4).

    Args:
        w: weight (out, ...) float.
        per_channel: one threshold and alpha per output channel instead of per tensor.

    Returns:
        codes (same shape, int8 in {-1, 0, 1}), scale (out,) float32.
    """
    w = w.detach().float()
    a = _flat(w).abs()
    delta = 0.7 * (a.mean(dim=1, keepdim=True) if per_channel else a.mean())
    mask = a > delta
    codes = (torch.sign(_flat(w)) * mask).to(torch.int8).reshape(w.shape)
    if per_channel:
        cnt = mask.sum(dim=1)
        alpha = torch.where(cnt > 0, (a * mask).sum(dim=1) / cnt.clamp(min=1), torch.zeros_like(cnt, dtype=a.dtype))
    else:
        alpha = (a[mask].mean() if mask.any() else a.new_tensor(0.0)).expand(w.shape[0]).clone()
    return codes, alpha.float()


def dorefa(w: torch.Tensor, bits: int, per_channel: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """DoReFa k-bit weight quantization (Eq. 6, no tanh).

    Returns:
        codes (int16, odd integers in [-(2^k-1), 2^k-1]), scale (out,) float32 = max|W| / (2^k-1).
    """
    w = w.detach().float()
    n = 2 ** bits - 1
    a = _flat(w).abs()
    s = a.amax(dim=1) if per_channel else a.max().expand(w.shape[0])
    safe = torch.where(s > 0, s, torch.ones_like(s))
    ws = _flat(w) / safe[:, None]
    m = torch.round(n * (ws / 2 + 0.5)).clamp(0, n)
    codes = (2 * m - n).to(torch.int16).reshape(w.shape)
    # an all-zero row (a pruned channel) has no zero level to round to: its scale 0 keeps it exactly zero
    return codes, (s / n).float()


def _int_codes(w: torch.Tensor, s: torch.Tensor, bits: int) -> torch.Tensor:
    """Nearest int-grid codes of ``w`` (rows, K) for the steps ``s`` (rows,); a zero step gives zero codes."""
    zero = s <= 0
    if not bool(zero.any()):
        return round_to_grid(w, s[:, None], bits, "int")
    return round_to_grid(w, torch.where(zero, torch.ones_like(s), s)[:, None], bits, "int").mul_(~zero[:, None])


def _row_error(w: torch.Tensor, s: torch.Tensor, bits: int, col_weight: torch.Tensor | None = None) -> torch.Tensor:
    """Each row's squared error ``||w - s q||^2`` on the int grid of step ``s`` (float32 work, float64 sums); with
    ``col_weight`` (rows, K) or (K,) each entry's square is weighted (``sum_k d_k (w_k - s q_k)^2``)."""
    d = _int_codes(w, s, bits).mul_(s[:, None]).sub_(w)
    d = d.mul_(d)
    if col_weight is not None:
        d = d.mul_(col_weight)
    return d.sum(1, dtype=torch.float64)


def int_grid(w: torch.Tensor, bits: int, per_channel: bool = False,
             col_weight: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric integer k-bit quantization with a zero level (module docstring), step by least weight error.

    Args:
        w: weight (out, ...) float.
        bits: 3..8.
        per_channel: one step per output channel (else one for the tensor).
        col_weight: optional non-negative weights of the error of each entry of the flattened weight, (out, K) or
            (K,) (K = in x kh x kw): with the layer input's per-column second moment ``E[x_k^2]`` the error becomes
            the output error ``E||(W - s q) x||^2`` of uncorrelated inputs (the diagonal of ``H``), which is what
            the recalibrate pass passes (``step_by = "output"``). None: plain weight error.

    Returns:
        codes (int16 in [-2^(k-1), 2^(k-1)-1], weight-shaped), scale (out,) float32 (0 for an all-zero row/tensor).
    """
    w = w.detach().float()
    wf = _flat(w)
    cw = None if col_weight is None else col_weight.detach().float().to(wf.device)
    rows = wf.shape[0]
    top = 2 ** (bits - 1) - 1
    a_row = wf.abs().amax(1) if wf.numel() else wf.new_zeros(rows)
    a_all = a_row.max() if rows else wf.new_tensor(0.0)
    base = a_row if per_channel else a_all.expand(rows)
    cands = [base / top, base / (top + 1)] + [base * r / top for r in INT_CLIP_RATIOS]
    # lattice steps: the smallest non-zero |w| divided by 1..LATTICE_DIVISORS (a lattice whose largest code is not
    # +-2^(k-1)-1, e.g. 124 or 126 after QAT, has its step here; on other weights they lose on error)
    pos = torch.where(wf.abs() > 0, wf.abs(), torch.full_like(wf, float("inf")))
    m_row = pos.amin(1) if wf.numel() else wf.new_zeros(rows)
    m_row = torch.where(torch.isfinite(m_row), m_row, torch.zeros_like(m_row))
    m_pos = m_row[m_row > 0]
    m_all = m_pos.min() if m_pos.numel() else wf.new_tensor(0.0)
    cands += [m_all.expand(rows) / d for d in range(1, LATTICE_DIVISORS + 1)]
    if per_channel:
        cands += [a_all.expand(rows) / top, a_all.expand(rows) / (top + 1)]
        cands += [m_row / d for d in range(1, LATTICE_DIVISORS + 1)]
    best_s = cands[0]
    best_err = _row_error(wf, best_s, bits, cw)
    for s in cands[1:]:
        err = _row_error(wf, s, bits, cw)
        if per_channel:
            better = err < best_err
            best_s, best_err = torch.where(better, s, best_s), torch.where(better, err, best_err)
        elif float(err.sum()) < float(best_err.sum()):
            best_s, best_err = s, err
    codes = _int_codes(wf, best_s, bits)
    scale = _snap(wf, codes, best_s, best_err, per_channel, cw)
    return codes.to(torch.int16).reshape(w.shape), scale


def _snap(w: torch.Tensor, codes: torch.Tensor, s: torch.Tensor, err: torch.Tensor, per_channel: bool,
          col_weight: torch.Tensor | None = None) -> torch.Tensor:
    """The float32 step within :data:`SNAP_ULPS` ulps of ``s`` with the least error (weighted as ``err`` was) for
    ``codes`` (exact lattices)."""
    s = s.float().clone()
    cand = s
    for direction in (float("inf"), 0.0):
        cand = s
        for _ in range(SNAP_ULPS):
            cand = torch.nextafter(cand, torch.full_like(cand, direction))
            d = (codes * cand[:, None]).sub_(w)
            d = d.mul_(d) if col_weight is None else d.mul_(d).mul_(col_weight)
            e = d.sum(1, dtype=torch.float64)
            better = (e < err) if per_channel else (e.sum() < err.sum()).expand_as(e)
            s, err = torch.where(better, cand, s), torch.where(better, e, err)
    return s


def quantize_weight(w: torch.Tensor, bits: int, per_channel: bool = False,
                    grid: str = DEFAULT_GRID) -> tuple[torch.Tensor, torch.Tensor]:
    """Ternary for ``bits == 2`` (as in the paper, Sec. 5.2), else the k-bit ``grid`` (``int`` or ``dorefa``)."""
    if bits == 2:
        return ternarize(w, per_channel)
    return int_grid(w, bits, per_channel) if check_grid(grid) == "int" else dorefa(w, bits, per_channel)


def round_to_grid(v: Any, scale: Any, bits: int, grid: str) -> Any:
    """Nearest code of each value ``v`` on the grid of step ``scale`` (broadcast as given; must be non-zero).

    Works on torch tensors and numpy arrays alike (the same float operations in the same order, so the same codes):
    ternary ``clip(round(v/s), -1, 1)``; ``int`` ``clip(round(v/s), -2^(k-1), 2^(k-1)-1)``; ``dorefa`` the odd code
    ``clip(2 round((v/s + n)/2) - n, -n, n)``, n = 2^k - 1. Ties round half to even. Returns ``v``'s float type.
    """
    xp: Any = np if isinstance(v, np.ndarray) else torch
    if bits == 2 or check_grid(grid) == "int":
        lo, hi = (-1, 1) if bits == 2 else (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1)
        q = v / scale  # a new array: rounded and clipped in place
        return xp.clip(xp.round(q, out=q), lo, hi, out=q)
    n = 2 ** bits - 1
    return xp.clip(2 * xp.round((v / scale + n) / 2) - n, -n, n)


def dequantize(codes: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``codes * scale`` broadcast over the output-channel axis (float32). Deterministic and bit-exact."""
    return codes.float() * scale.float().reshape(-1, *([1] * (codes.dim() - 1)))


def code_range(bits: int, grid: str) -> tuple[int, int]:
    """Inclusive range of the integer codes for ``bits`` on ``grid`` (ternary for 2 bits whatever the grid)."""
    if bits == 2:
        return -1, 1
    if check_grid(grid) == "int":
        return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    return -(2 ** bits - 1), 2 ** bits - 1
