"""Solve-c pass: DF-MPC's closed-form compensation (Eq. 27), solved for every pair, folded on request.

For every (low, high) pair (core.graph), per output channel j of the low layer (Eq. 27 read per channel, D1; the
clamp c >= 0, D2; a degenerate channel, D10)::

    x_hat_j = gamma_j/sigma_hat_j * vec(W_hat_j),   x_j = gamma_j/sigma_j * vec(W_j)
    y_hat_j = beta_j - gamma_j mu_hat_j/sigma_hat_j, y_j = beta_j - gamma_j mu_j/sigma_j
    c_j = max(0, (<x_hat_j, x_j> + l1 y_hat_j y_j) / (||x_hat_j||^2 + l1 y_hat_j^2 + l2))

with the FP statistics (mu, sigma) and those in force in the quantized model (mu_hat, sigma_hat: re-estimated by the
recalibrate pass, or the FP ones). c is always solved and reported; it is folded only with ``--c-mode paper|norm``:
into BN gamma, beta when the activation is positively homogeneous (D6-i, exact since c ReLU(z) = ReLU(c z)), else
into the high layer's input channels (Eq. 7, D6-ii). The integer codes are never touched. Folding is off by default
because, once mu_hat and sigma_hat are right, folding c measured 28-47 points worse on the CIFAR ResNets
(docs/MATH.md).

``c_mode="norm"`` (ours): with re-estimated statistics the BN already restores each channel's output scale, and the
least-squares c then also carries the factor cos(x_hat_j, x_j) ~ 1/sqrt(1 + ||e||^2/||w||^2) that a minimum-MSE fit
gives a noisy estimate - it shrinks the channel, and the shrinkage compounds through the depth. ``norm`` divides that
factor out: ``c_j * ||x_hat_j|| ||x_j|| / <x_hat_j, x_j>`` restricted to the weight term.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import cast

import torch
from torch import nn

from calib_free import collect_bn_stats
from calib_free.bn_stats import BNStats

from ..core.graph import Link
from ..core.options import float_in, option, require_finite
from ..core.state import QuantLayer
from ..errors import UsageError
from .base import Context, Pass, register_pass

__all__ = ["SolveC", "closed_form_c", "eq22_loss", "C_MODES"]

#: --c-mode: fold nothing, the paper's c, or c without the least-squares shrinkage
C_MODES = ("off", "paper", "norm")


def _affine(bn: BNStats | None, out: int, bias: torch.Tensor | None):
    """(gamma, beta, mu, sigma) of the BN after a conv; identity BN (with the conv bias as beta) when there is none."""
    if bn is not None:
        return bn.gamma, bn.beta, bn.mean, bn.sigma
    one, zero = torch.ones(out, dtype=torch.float64), torch.zeros(out, dtype=torch.float64)
    return one, (bias.detach().double() if bias is not None else zero), zero, one


def closed_form_c(w: torch.Tensor, w_hat: torch.Tensor, gamma, beta, mu, sigma, mu_hat, sigma_hat,
                  lambda1: float = 0.5, lambda2: float = 0.0, mode: str = "paper") -> torch.Tensor:
    """Per-channel minimiser of Eq. 22 under c >= 0 (Eq. 27 read per channel, D1/D2/D10).

    Args:
        w, w_hat: FP and dequantised low-bit weights (out, ...).
        gamma, beta, mu, sigma: FP BN parameters/statistics (sigma = std), shape (out,).
        mu_hat, sigma_hat: statistics of the quantized layer's output (re-estimated, or FP ones), shape (out,).
        lambda1, lambda2: Eq. 22 weights.
        mode: ``paper`` or ``norm`` (see module docstring).

    Returns:
        c, shape (out,), float64, >= 0.
    """
    w, w_hat = w.double().flatten(1), w_hat.double().flatten(1)
    x = (gamma / sigma)[:, None] * w
    x_hat = (gamma / sigma_hat)[:, None] * w_hat
    y = beta - gamma * mu / sigma
    y_hat = beta - gamma * mu_hat / sigma_hat
    xx = (x_hat * x).sum(1)
    nn_hat = (x_hat * x_hat).sum(1)
    if mode == "norm":
        xx = torch.sqrt(nn_hat * (x * x).sum(1))
    num = xx + lambda1 * y_hat * y
    den = nn_hat + lambda1 * y_hat ** 2 + lambda2
    c = torch.where(den > 0, num / torch.where(den > 0, den, torch.ones_like(den)), torch.ones_like(den))
    return c.clamp(min=0.0)


def eq22_loss(c, w, w_hat, gamma, beta, mu, sigma, mu_hat, sigma_hat, lambda1=0.5, lambda2=0.0) -> torch.Tensor:
    """Eq. 22, L(c) = sum_j ||Gamma_j||^2 + lambda1 Theta_j^2 + lambda2 c_j^2 (Eq. 20 for Gamma, Theta)."""
    w, w_hat = w.double().flatten(1), w_hat.double().flatten(1)
    gam = c[:, None] * (gamma / sigma_hat)[:, None] * w_hat - (gamma / sigma)[:, None] * w
    theta = (gamma * mu / sigma - c * gamma * mu_hat / sigma_hat) + (c * beta - beta)
    return (gam ** 2).sum() + lambda1 * (theta ** 2).sum() + lambda2 * (c ** 2).sum()


@torch.no_grad()
def _fold_c_(p: Link, c: torch.Tensor, layers: dict[str, QuantLayer], mods: dict[str, nn.Module]) -> None:
    """Fold c where deployment wants it (D6); the integer codes are never touched."""
    if p.homogeneous and p.bn is not None:
        bn = cast(nn.BatchNorm2d, mods[p.bn])
        bn.weight.mul_(c.to(bn.weight))
        bn.bias.mul_(c.to(bn.bias))
    elif p.homogeneous:
        low = layers[p.low]
        low.scale = (low.scale.double() * c).float()
        low_conv = cast(nn.Conv2d, mods[p.low])
        low_conv.weight.copy_(low.weight())
        if low_conv.bias is not None:
            low_conv.bias.mul_(c.to(low_conv.bias))
    else:
        high = layers[p.high]
        conv = cast(nn.Conv2d, mods[p.high])
        if conv.groups == conv.in_channels and conv.groups > 1:  # depthwise: input channel j is output j
            high.scale = (high.scale.double() * c).float()
        else:
            high.in_scale = c.float()
        conv.weight.copy_(high.weight())


#: the largest Eq. 22 weight: the closed form squares activations times lambda in float32, which a larger weight
#: overflows (a weight of 1e6 already makes the term dominate completely)
MAX_LAMBDA = 1e6


@register_pass
@dataclass(frozen=True)
class SolveC(Pass):
    """Solve Eq. 27 for every pair (always reported) and fold it when ``c_mode`` is not ``off``.

    Args:
        lambda1: weight of the BN bias term Theta in Eq. 22 (paper: 0.5).
        lambda2: ridge on c in Eq. 22 (paper: 0).
        c_mode: ``off`` (solve and report only), ``paper`` (fold Eq. 27's c), ``norm`` (fold c without the
            least-squares shrinkage).
    """

    name = "solve_c"
    lambda1: float = option(0.5, flag="--lambda1", parse=float_in(0.0, MAX_LAMBDA),
                            help="Eq. 22 weight of the BN bias term, 0..1e6")
    lambda2: float = option(0.0, flag="--lambda2", parse=float_in(0.0, MAX_LAMBDA), help="Eq. 22 ridge on c, 0..1e6",
                            show_default=False)
    c_mode: str = option("off", flag="--c-mode", choices=C_MODES,
                         help="fold the closed-form c: 'paper' (Eq. 27), 'norm' (without least-squares shrinkage) or "
                              "'off' (c = 1; measured best once the BN statistics are re-estimated, see README)")

    def __post_init__(self) -> None:
        require_finite("--lambda1", self.lambda1, lo=0.0, hi=MAX_LAMBDA)
        require_finite("--lambda2", self.lambda2, lo=0.0, hi=MAX_LAMBDA)
        if self.c_mode not in C_MODES:
            raise UsageError(f"bad --c-mode '{self.c_mode}': choose one of {', '.join(C_MODES)}")

    def apply(self, ctx: Context) -> dict:
        fp_mods, q_mods = dict(ctx.fp_model.named_modules()), dict(ctx.model.named_modules())
        fp_stats, q_stats = collect_bn_stats(ctx.fp_model), collect_bn_stats(ctx.model)
        mode = "paper" if self.c_mode == "off" else self.c_mode
        cs = []
        for p in ctx.graph.pairs:
            low = ctx.layers[p.low]
            w = fp_mods[p.low].weight.detach().cpu()
            bias = fp_mods[p.low].bias
            bias = bias.detach().cpu() if bias is not None else None
            g, b, mu, sd = _affine(fp_stats.get(p.bn) if p.bn else None, w.shape[0], bias)
            _, _, mu_h, sd_h = _affine(q_stats.get(p.bn) if p.bn else None, w.shape[0], bias)
            c = closed_form_c(w, low.weight(), g, b, mu, sd, mu_h.cpu(), sd_h.cpu(), self.lambda1, self.lambda2, mode)
            low.c = c.float()
            cs.append(c)
            if self.c_mode != "off":
                _fold_c_(p, c, ctx.layers, q_mods)
                low.c_folded = True
        allc = torch.cat(cs) if cs else torch.ones(1, dtype=torch.float64)
        return {"pairs": len(ctx.graph.pairs), "folded": self.c_mode != "off",
                "c_mean": round(float(allc.mean()), 4), "c_min": round(float(allc.min()), 4)}
