"""Passes for models without BN statistics: DF-MPC from the weights alone (the ``dfmpc-weights`` recipe).

A model whose BN was folded into the convolutions before publication (ONNX, TFLite, QAT exports) keeps BN layers
with identity statistics: nothing describes the activations, nothing can be synthesised, and every statistic a pass
needs has to come from the weights. Three passes, run as ``equalize -> quantize -> fit_weights -> bias_from_weights``
(each one measured on the real MobileNetV2 at 6 bits; every variant is in results/imagenet_mobilenet_ablation.json):

* :class:`EqualizeForGrid`: DFQ's cross-layer equalisation (passes/equalize.py, depthwise included) when the grids
  are per tensor, skipped for per-channel grids;
* :class:`FitWeights` - **grid step**: rounds the FP weight to nearest on the grid ``m * scale`` for every ``m`` in
  :data:`~dfmpc_deploy.passes.rounding.GRID_MULTIPLIERS` (the candidates the error-feedback rounding searches, not
  chosen on any test set) and keeps the ``m`` with the least weight error ``||W_q - W||^2``: the output error is
  ``(W_q - W) x`` and with nothing known about ``x`` its second moment is taken as the identity (multiplier 1 keeps
  the quantize pass's codes, TWN thresholding for ternary). Optionally (``fit_c``, off in the recipe: no better once
  the bias is corrected) the **per-channel least-squares rescale** ``c_j = <q_j, w_j> / ||q_j||^2`` of every output
  channel of every layer - DF-MPC's Eq. 27 without its statistics terms, extended from the low layer of each pair to
  all layers - folded exactly for any activation into the BatchNorm that follows (``gamma' = c gamma``, ``mu' =
  mu / c``, so ``BN'(y) = BN(c y)``), else into the per-channel scale; the grid step is then chosen by the error left
  after that rescale;
* :class:`CorrectBias`: DFQ's bias correction with the activation means propagated from the weights
  (:func:`calib_free.ranges.estimate_act_ranges` with ``statistics="propagate"``) instead of read from BN.

None of them reads data or statistics.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from calib_free.ranges import estimate_act_ranges

from ..core.config import BitsSpec, parse_bits
from ..core.quantizers import dequantize, quantize_weight, round_to_grid
from ..core.state import QuantLayer
from ..core.threads import one_thread
from ..errors import UsageError
from .base import Context, Pass, register_pass
from .equalize import Equalize, cross_layer_equalize, require_before_quantize
from .quantize import bits_option, grid_option, per_channel_option, role_widths
from .rounding import GRID_MULTIPLIERS

__all__ = ["EqualizeForGrid", "FitWeights", "CorrectBias", "fit_layer"]


def _weight_error(codes: torch.Tensor, scale: torch.Tensor, w: torch.Tensor, rescaled: bool) -> float:
    """``||w - scale * codes||^2`` summed over the rows (``scale`` (rows,)), or with ``rescaled`` what is left after
    the best rescale of each row, ``||w||^2 - <q, w>^2 / ||q||^2``."""
    if not rescaled:
        return float((w - codes * scale[:, None]).pow(2).sum(dtype=torch.float64))
    qq, qw, ww = (codes * codes).sum(1), (codes * w).sum(1), (w * w).sum(1)
    return float((ww - torch.where(qq > 0, qw ** 2 / qq.clamp_min(1e-30), torch.zeros_like(qw))).sum())


@torch.no_grad()
def fit_layer(w: torch.Tensor, q: QuantLayer, fit_grid: bool = True, fit_c: bool = False,
              multipliers: tuple[float, ...] = GRID_MULTIPLIERS
              ) -> tuple[torch.Tensor, torch.Tensor, float, torch.Tensor]:
    """Weight-space fit of one layer (module docstring).

    Args:
        w: the FP weight (out, ...).
        q: the layer as the quantize pass left it (codes, scale, bits).
        fit_grid: search the grid step among ``multipliers`` (else keep ``q``'s): the least weight error, after the
            per-channel rescale when ``fit_c``.
        fit_c: compute the per-channel least-squares rescale (else all ones).
        multipliers: candidate grid steps relative to ``q.scale``.

    Returns:
        (codes shaped like ``q.codes``, grid scale (out,), chosen multiplier, c (out,) float64 >= 0; channels with
        all-zero codes get c = 1).
    """
    wf = w.detach().float().flatten(1)  # float32: codes are small integers, errors are only compared
    base = q.scale.float()
    codes = q.codes.float().flatten(1)
    best_m = 1.0
    if fit_grid:
        best = _weight_error(codes, base, wf, fit_c)  # m = 1: the quantize pass's own codes
        for m in multipliers:
            if m == 1.0:
                continue
            cand = round_to_grid(wf, (m * base)[:, None], q.bits, q.grid)
            err = _weight_error(cand, m * base, wf, fit_c)
            if err < best:
                best, best_m, codes = err, m, cand
    scale = q.scale.double() * best_m
    c = torch.ones_like(scale)
    if fit_c:
        qq, qw = (codes * codes).sum(1, dtype=torch.float64), (codes.double() * wf.double()).sum(1)
        ok = (qq > 0) & (qw > 0)
        c = torch.where(ok, qw / (qq.clamp_min(1e-30) * scale), c)
    return codes.reshape(q.codes.shape).to(q.codes.dtype), scale.float(), best_m, c


@register_pass
@dataclass(frozen=True)
class EqualizeForGrid(Equalize):
    """Cross-layer equalisation (DFQ) only where it serves: before *per-tensor* grids.

    CLE moves each channel's range between the two layers of a link so that one grid step fits every channel of a
    tensor (the depthwise convolutions of MobileNetV2 span two decades of channel ranges); a per-channel grid fits
    each channel already, and equalising then only moves rounding error between the layers (MobileNetV2, 6 bits,
    per-channel, weights only: 78.15 % with CLE against 78.85 % without). ``per_channel`` is the quantize pass's own
    setting (``--per-channel``), read here too.
    """

    per_channel: bool = per_channel_option()
    bits: BitsSpec = bits_option()
    grid: str = grid_option()

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.bits, str):
            object.__setattr__(self, "bits", parse_bits(self.bits))

    def apply(self, ctx: Context) -> dict:
        if self.per_channel:
            return {"skipped": "per-channel grids (CLE serves per-tensor grids)"}
        require_before_quantize(ctx, self.name)
        with one_thread():
            eq, pre = cross_layer_equalize(ctx.fp_model, ctx.graph, self.max_passes, self.tol)
            widths = role_widths(ctx.graph, self.bits)
            plain, cle = (_rounding_error(m, widths, self.grid) for m in (ctx.fp_model, eq))
        errors = {"rounding_error": round(plain, 6), "rounding_error_cle": round(cle, 6)}
        if cle >= plain:  # e.g. weights already on a per-tensor lattice (rounding error 0): CLE would only cost
            return {"skipped": "CLE would not lower the per-tensor rounding error", **errors}
        return {**self._commit(ctx, eq, pre), **errors}


def _rounding_error(model: nn.Module, widths: dict[str, int], grid: str) -> float:
    """Sum over the layers of ``widths`` of the per-tensor relative rounding error ``||W - Q(W)||^2 / ||W||^2``."""
    mods = dict(model.named_modules())
    total = 0.0
    for fqn, bits in widths.items():
        w = mods[fqn].weight.detach()
        norm = float(w.double().pow(2).sum())
        if norm > 0:
            total += float((dequantize(*quantize_weight(w, bits, False, grid)) - w).double().pow(2).sum()) / norm
    return total


@register_pass
@dataclass(frozen=True)
class FitWeights(Pass):
    """Data-free, statistics-free fit of every layer's grid step and per-channel scale to its FP weights.

    Args:
        fit_grid: search each layer's grid step by weight error (module docstring, step 1).
        fit_c: fold each output channel's least-squares rescale into the following BN or the scale (step 2; off by
            default: measured no better once the bias is corrected, see results/imagenet_mobilenet_ablation.json).
    """

    name = "fit_weights"
    fit_grid: bool = True
    fit_c: bool = False

    def apply(self, ctx: Context) -> dict:
        with one_thread(), torch.no_grad():
            return self._fit(ctx)

    def _fit(self, ctx: Context) -> dict:
        fp_mods, q_mods = dict(ctx.fp_model.named_modules()), dict(ctx.model.named_modules())
        bn_after = ctx.graph.bn_after
        hist: dict[str, int] = {}
        cs, into_bn = [], 0
        for fqn, q in ctx.layers.items():
            codes, scale, m, c = fit_layer(fp_mods[fqn].weight.cpu(), q, self.fit_grid, self.fit_c)
            q.codes, q.scale = codes, scale
            hist[f"{m:g}"] = hist.get(f"{m:g}", 0) + 1
            bn = q_mods.get(bn_after.get(fqn, ""))
            if not self.fit_c:
                pass
            elif (isinstance(bn, nn.BatchNorm2d) and bn.weight is not None and bn.running_mean is not None
                  and bool((c > 0).all())):
                bn.weight.mul_(c.to(bn.weight))
                bn.running_mean.div_(c.to(bn.running_mean))
                into_bn += 1
            else:
                q.scale = (scale.double() * c).float()
            mod = q_mods[fqn]
            mod.weight.copy_(q.weight().to(mod.weight))
            cs.append(c)
        allc = torch.cat(cs) if cs else torch.ones(1, dtype=torch.float64)
        return {"layers": len(ctx.layers), "grid_multipliers": hist, "c_into_bn": into_bn,
                "c_into_scale": len(ctx.layers) - into_bn if self.fit_c else 0,
                "c_mean": round(float(allc.mean()), 4), "c_min": round(float(allc.min()), 4),
                "c_max": round(float(allc.max()), 4)}


def _bn_affine(bn: nn.BatchNorm2d) -> tuple[torch.Tensor, torch.Tensor]:
    """``(a, b)`` with ``bn(y) = a y + b`` in eval mode, float64."""
    c = bn.num_features
    g = bn.weight.detach().double() if bn.weight is not None else torch.ones(c, dtype=torch.float64)
    beta = bn.bias.detach().double() if bn.bias is not None else torch.zeros(c, dtype=torch.float64)
    assert bn.running_var is not None and bn.running_mean is not None
    a = g / torch.sqrt(bn.running_var.detach().double() + bn.eps)
    return a, beta - a * bn.running_mean.detach().double()


def _mean_out(m: nn.Conv2d | nn.Linear, mean_in: torch.Tensor) -> torch.Tensor:
    """``E[layer(x)]`` (out,) for inputs with per-channel mean ``mean_in`` (zero padding ignored), float64."""
    w = m.weight.detach().double().cpu()
    if isinstance(m, nn.Conv2d) and m.groups > 1:  # grouped (depthwise): group g reads its own input channels
        cin_g, go = w.shape[1], w.shape[0] // m.groups
        per = w.flatten(2).sum(2)  # (out, in / groups)
        idx = (torch.arange(w.shape[0]) // go)[:, None] * cin_g + torch.arange(cin_g)[None, :]
        out = (per * mean_in[idx]).sum(1)
    else:
        out = w.flatten(2).sum(2) @ mean_in if w.dim() > 2 else w @ mean_in
    return out + (m.bias.detach().double().cpu() if m.bias is not None else 0.0)


@register_pass
@dataclass(frozen=True)
class CorrectBias(Pass):
    """Bias correction (DFQ's, Nagel et al. 2019) from the weights alone, for models without BN statistics.

    The quantized model's output mean per channel should equal the FP model's: ``E[layer_q(x)]`` differs from
    ``E[layer(x)]`` by ``(W_q - W) E[x]`` (and by any change of the BN that follows, e.g. a folded rescale). DFQ reads
    ``E[x]`` from the BN statistics before the layer; here the BN layers carry none, so ``E[x]`` comes from the FP
    model's weights: moments propagated from a standardised input through every layer, BN applied as the affine
    map it is, ReLU/ReLU6 on a Gaussian, each input channel locally constant over a kernel window
    (:func:`calib_free.ranges.estimate_act_ranges` with ``statistics="propagate"``). The difference is removed from
    the bias of the BN that follows the layer (its statistics are left as they are), or from the layer's own bias;
    a layer with neither is left as it is (counted in ``skipped``).

    Args:
        windows: ``coherent`` (each input channel locally constant over a kernel window, as natural images and their
            feature maps are) or ``independent`` window entries (measured 1.1 points worse on MobileNetV2).
    """

    name = "bias_from_weights"
    windows: str = "coherent"

    def __post_init__(self) -> None:
        if self.windows not in ("coherent", "independent"):
            raise UsageError(f"bias_from_weights: windows={self.windows!r}, choose 'coherent' or 'independent'")

    def apply(self, ctx: Context) -> dict:
        with one_thread(), torch.no_grad():
            return self._correct(ctx)

    def _correct(self, ctx: Context) -> dict:
        fp_mods, q_mods = dict(ctx.fp_model.named_modules()), dict(ctx.model.named_modules())
        moments = estimate_act_ranges(ctx.fp_model, graph=ctx.graph.graph, statistics="propagate",
                                      coherent=self.windows == "coherent")
        bn_after = ctx.graph.bn_after
        done, skipped, shift = 0, 0, []
        for fqn in ctx.layers:
            if fqn not in moments:
                skipped += 1
                continue
            mean_in = moments[fqn].mean
            if mean_in.numel() == 1:
                mean_in = mean_in.expand(fp_mods[fqn].weight.shape[1] * getattr(fp_mods[fqn], "groups", 1))
            fp_out, q_out = _mean_out(fp_mods[fqn], mean_in), _mean_out(q_mods[fqn], mean_in)
            bn = q_mods.get(bn_after.get(fqn, ""))
            if isinstance(bn, nn.BatchNorm2d) and bn.bias is not None and bn.running_mean is not None:
                a_f, b_f = _bn_affine(fp_mods[bn_after[fqn]])
                a_q, b_q = _bn_affine(bn)
                delta = (a_q * q_out + b_q) - (a_f * fp_out + b_f)
                bn.bias.sub_(delta.to(bn.bias))
            elif q_mods[fqn].bias is not None:
                delta = q_out - fp_out
                q_mods[fqn].bias.sub_(delta.to(q_mods[fqn].bias))
            else:
                skipped += 1
                continue
            shift.append(float(delta.abs().mean()))
            done += 1
        ctx.estimator = ("none: no BN statistics; activation means for bias correction propagated from the weights "
                         "(no data)")
        return {"corrected_layers": done, "skipped": skipped,
                "mean_abs_shift": round(sum(shift) / max(1, len(shift)), 6)}
