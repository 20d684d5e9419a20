"""Pure weight quantizers (no module state). Each returns integer codes and a per-output-channel scale with
``dequant = codes * scale[:, None, ...]``.

* :func:`ternarize` - TWN, Eqs. 3-4: threshold ``0.7 * mean|W|``, codes in {-1, 0, +1},
  scale ``alpha = mean |W|`` over entries above the threshold.
* :func:`dorefa` - DoReFa k-bit, Eq. 6 exactly as printed (no tanh): ``kQ(W) = 2/(2^k-1) *
  round[(2^k-1)(W/(2 max|W|) + 1/2)] - 1``; the 2^k levels are odd multiples of ``1/(2^k-1)`` (zero is not a
  level), so the codes are the odd integers ``q = 2m - (2^k-1)`` in ``[-(2^k-1), 2^k-1]`` and the scale is
  ``max|W| / (2^k-1)``.

Both are layer-wise as in the paper (one threshold/range per tensor, D7) unless ``per_channel=True``.
"""
from __future__ import annotations

import torch

__all__ = ["ternarize", "dorefa", "quantize_weight", "dequantize", "code_range"]


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


def quantize_weight(w: torch.Tensor, bits: int, per_channel: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Ternary for ``bits == 2`` (as in the paper, Sec. 5.2), DoReFa otherwise."""
    return ternarize(w, per_channel) if bits == 2 else dorefa(w, bits, per_channel)


def dequantize(codes: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``codes * scale`` broadcast over the output-channel axis (float32). Deterministic and bit-exact."""
    return codes.float() * scale.float().reshape(-1, *([1] * (codes.dim() - 1)))


def code_range(bits: int) -> tuple[int, int]:
    """Inclusive range of the integer codes for ``bits``."""
    return (-1, 1) if bits == 2 else (-(2 ** bits - 1), 2 ** bits - 1)
