"""DF-MPC compensation (Chen et al., Pattern Recognition 2023), per DFMPC_MATH.md.

Steps for every (low, high) pair found in the graph (pairing.py):

1. quantize: low layer ternary (Eqs. 3-4) or DoReFa-low (Eq. 6), high layer DoReFa-high; every other conv/linear
   high-bit too (D9). Dequantised weights keep alpha and max|W| (D4).
2. re-estimate the low-bit layers' BN statistics mu_hat, sigma_hat (D3) - the paper's "re-calibrate" - data-free by
   default (calib_free: inputs synthesised from the FP model's own BN statistics). With ``rounding="gptq"`` (the
   default) the codes are first re-chosen by error feedback on the same synthetic inputs (rounding.py).
3. solve c per output channel of the low layer in closed form (Eq. 27, per-channel reading D1, clamp c >= 0 D2):

       x_hat_j = gamma_j/sigma_hat_j * vec(W_hat_j),   x_j = gamma_j/sigma_j * vec(W_j)
       y_hat_j = beta_j - gamma_j mu_hat_j/sigma_hat_j, y_j = beta_j - gamma_j mu_j/sigma_j
       c_j = max(0, (<x_hat_j, x_j> + l1 y_hat_j y_j) / (||x_hat_j||^2 + l1 y_hat_j^2 + l2))

4. fold c, only when ``cfg.compensation`` is set: into BN gamma, beta when the activation is positively
   homogeneous (D6-i, exact since c ReLU(z) = ReLU(c z)), else into the high layer's input channels (Eq. 7, D6-ii).
   It is off by default because, once mu_hat and sigma_hat are right, folding c measured 28-47 points worse on the
   CIFAR ResNets (README); c is still solved and reported per layer.

``c_mode="norm"`` (ours): with re-estimated statistics the BN already restores each channel's output scale, and the
least-squares c then also carries the factor cos(x_hat_j, x_j) ~ 1/sqrt(1 + ||e||^2/||w||^2) that a minimum-MSE fit
gives a noisy estimate - it shrinks the channel, and the shrinkage compounds through the depth. ``norm`` divides that
factor out: ``c_j * ||x_hat_j|| ||x_j|| / <x_hat_j, x_j>`` restricted to the weight term, keeping the paper's
objective for the bias/mean part. scripts/dfmpc_accuracy.py measures both.
"""
from __future__ import annotations

import copy
import logging
import time
from collections.abc import Callable

import torch
from torch import nn

from calib_free import collect_bn_stats, recalibrate_bn_, synthesize_inputs
from calib_free.bn_stats import BNStats

from ..core.config import QuantConfig
from ..core.pairing import Link, bn_after, plan_roles
from ..core.quantizers import quantize_weight
from ..core.state import MixedPrecisionModel, QuantLayer
from ..errors import UsageError
from .rounding import error_feedback_round_

__all__ = ["compensate", "closed_form_c", "eq22_loss", "quantize_layers", "calibration_inputs"]

log = logging.getLogger("dfmpc_deploy")


def _affine(bn: BNStats | None, out: int, bias: torch.Tensor | None):
    """(gamma, beta, mu, sigma) of the BN after a conv; identity BN (with the conv bias as beta) when there is none."""
    if bn is not None:
        return bn.gamma, bn.beta, bn.mean, bn.sigma
    one, zero = torch.ones(out, dtype=torch.float64), torch.zeros(out, dtype=torch.float64)
    return one, (bias.double() if bias is not None else zero), zero, one


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
        # Remove the least-squares shrinkage cos(x_hat, x) from the weight term (module docstring).
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


def quantize_layers(model: nn.Module, cfg: QuantConfig) -> tuple[dict[str, QuantLayer], list[Link]]:
    """Quantize every Conv2d/Linear per its role (low-bit for the first layer of each pair, high-bit otherwise)."""
    roles, pairs = plan_roles(model)
    mods = dict(model.named_modules())
    layers = {}
    for r in roles:
        bits = cfg.bits.low if r.role == "low" else cfg.bits.high
        codes, scale = quantize_weight(mods[r.fqn].weight, bits, cfg.per_channel)
        layers[r.fqn] = QuantLayer(r.fqn, r.kind, r.role, bits, codes, scale, partner=r.partner)
    return layers, pairs


def _set_weights_(model: nn.Module, layers: dict[str, QuantLayer]) -> None:
    mods = dict(model.named_modules())
    with torch.no_grad():
        for q in layers.values():
            mods[q.fqn].weight.copy_(q.weight())


def calibration_inputs(fp_model: nn.Module, cfg: QuantConfig, input_shape: tuple[int, int, int],
                       real_inputs: torch.Tensor | None = None,
                       progress: Callable | None = None) -> tuple[torch.Tensor | None, str, dict]:
    """The inputs used to re-estimate statistics (D3): synthetic (data-free, default), real (reference) or none.

    Returns:
        (inputs or None, estimator label for the report, info).
    """
    if cfg.recal == "none":
        return None, "none (FP statistics kept)", {}
    if cfg.recal == "real":
        if real_inputs is None:
            raise UsageError("--recal real is a labelled reference that needs --data (it reads real images)")
        return real_inputs, f"REAL-DATA reference ({len(real_inputs)} images; not data-free)", {
            "recal_images": len(real_inputs)}
    syn = synthesize_inputs(fp_model, input_shape, n=cfg.synth_samples, steps=cfg.synth_steps, lr=cfg.synth_lr,
                            seed=cfg.seed, progress=progress)
    label = f"synthetic BN-statistics matching ({cfg.synth_samples} samples, {cfg.synth_steps} Adam steps; no data)"
    return syn.inputs, label, {"synth_seconds": round(syn.seconds, 3), "synth_loss_initial": round(syn.initial_loss, 5),
                               "synth_loss_final": round(syn.final_loss, 5)}


def compensate(model: nn.Module, cfg: QuantConfig, input_shape: tuple[int, int, int], arch: str | None = None,
               real_inputs: torch.Tensor | None = None, progress: Callable | None = None,
               synthetic: torch.Tensor | None = None) -> MixedPrecisionModel:
    """Quantize ``model`` to mixed precision and apply DF-MPC compensation, without data (by default).

    Args:
        model: FP32 eval-mode model built of Conv2d/BatchNorm2d/activations/Linear (not modified).
        cfg: bit widths, lambdas and the statistics estimator.
        input_shape: (C, H, W) of one input, for the synthetic samples.
        arch: name recorded in the result.
        real_inputs: only for the labelled real-data reference (``cfg.recal == "real"``).
        progress: optional callable(step, steps, loss) during synthesis.
        synthetic: inputs already synthesised with :func:`calib_free.synthesize_inputs` for this model and config
            (lets several variants share one synthesis); ignored unless ``cfg.recal == "synthetic"``.

    Returns:
        MixedPrecisionModel whose ``module`` computes with the compensated dequantised weights.

    Example::

        >>> net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3)).eval()
        >>> mp = compensate(net, QuantConfig(recal="none"), (3, 16, 16))
        >>> sorted(q.role for q in mp.layers.values())
        ['high-compensating', 'low']
    """
    t0 = time.perf_counter()
    info: dict = {}
    qmodel = copy.deepcopy(model).eval()
    layers, pairs = quantize_layers(qmodel, cfg)
    _set_weights_(qmodel, layers)
    info["quantize_seconds"] = round(time.perf_counter() - t0, 4)

    t1 = time.perf_counter()
    if synthetic is not None and cfg.recal == "synthetic":
        inputs, estimator, stat_info = synthetic, f"synthetic BN-statistics matching ({len(synthetic)} samples; no data)", {}
    else:
        inputs, estimator, stat_info = calibration_inputs(model, cfg, input_shape, real_inputs, progress)
    info.update(stat_info)
    bn_map = bn_after(model)
    if cfg.allocating:
        if inputs is None:
            raise UsageError("bit allocation scores the layers on calibration inputs: use --recal synthetic "
                             "(default, data-free) or real")
        info["allocation"] = _allocate_(model, qmodel, layers, inputs, cfg, bn_map,
                                        MixedPrecisionModel(qmodel, layers, arch or type(model).__name__, cfg,
                                                            estimator), progress)
    bn_all = [n for n, m in qmodel.named_modules() if isinstance(m, nn.BatchNorm2d)]
    bn_low = [bn_map[q.fqn] for q in layers.values() if q.role == "low" and q.fqn in bn_map]
    scope = bn_all if cfg.recal_scope == "all" else bn_low
    if cfg.rounding == "gptq":
        if inputs is None:
            raise UsageError("--rounding gptq needs calibration inputs: use --recal synthetic (default) or real")
        info.update(error_feedback_round_(qmodel, model, layers, inputs,
                                          recal=lambda m: recalibrate_bn_(m, inputs, scope), which=cfg.gptq_scope,
                                          grid_search=cfg.grid_search))
    if inputs is not None and scope:
        recalibrate_bn_(qmodel, inputs, scope)
    info["statistics_seconds"] = round(time.perf_counter() - t1, 4)

    t2 = time.perf_counter()
    fp_mods, q_mods = dict(model.named_modules()), dict(qmodel.named_modules())
    fp_stats = collect_bn_stats(model)
    q_stats = collect_bn_stats(qmodel)
    for p in pairs:
        low = layers[p.low]
        w = fp_mods[p.low].weight.detach()
        bias = fp_mods[p.low].bias.detach() if fp_mods[p.low].bias is not None else None
        g, b, mu, sd = _affine(fp_stats.get(p.bn), w.shape[0], bias)
        _, _, mu_h, sd_h = _affine(q_stats.get(p.bn), w.shape[0], bias)
        # c is always solved (the report shows it); it is folded only when cfg.compensation is set.
        c = closed_form_c(w, low.weight(), g, b, mu, sd, mu_h, sd_h, cfg.lambda1, cfg.lambda2, cfg.c_mode)
        low.c = c.float()
        if cfg.compensation:
            _fold_c_(p, c, layers, q_mods)
            low.c_folded = True
    info["compensate_seconds"] = round(time.perf_counter() - t2, 4)
    info["total_seconds"] = round(time.perf_counter() - t0, 4)
    return MixedPrecisionModel(qmodel, layers, arch or type(model).__name__, cfg, estimator, info)


def _allocate_(model: nn.Module, qmodel: nn.Module, layers: dict[str, QuantLayer], inputs: torch.Tensor,
               cfg: QuantConfig, bn_map: dict[str, str], probe: MixedPrecisionModel,
               progress: Callable | None = None) -> dict:
    """In place: re-quantize ``layers`` (and ``qmodel``'s weights) to the widths chosen under the budget.

    A layer below the high width becomes role ``low`` (re-estimated BN, error feedback, grid search, as the low
    layer of a fixed pair); the others become ``high`` (keeping ``high-compensating`` where the pairing said so).
    ``probe`` wraps ``qmodel``/``layers`` to measure the real packed size while fitting a ``size_budget_bytes``.
    """
    from ..io.container import code_nbytes, packed_nbytes
    from .allocate import fit_budget, layer_sensitivity

    t0 = time.perf_counter()
    names = list(layers)
    cands = list(range(cfg.bits.low, cfg.bits.high + 1))
    first = {n: (q.role, q.partner) for n, q in layers.items()}
    scores = layer_sensitivity(model, names, inputs, cands, cfg.bits.high, bn_map, cfg.per_channel, progress)
    sizes = {n: {b: code_nbytes(b, layers[n].numel) for b in cands} for n in names}
    fp = dict(model.named_modules())

    def apply(bits: dict[str, int]) -> None:
        for n, b in bits.items():
            q = layers[n]
            if q.bits == b:
                continue
            role = "low" if b < cfg.bits.high else ("high" if first[n][0] == "low" else first[n][0])
            codes, scale = quantize_weight(fp[n].weight, b, cfg.per_channel)
            layers[n] = QuantLayer(n, q.kind, role, b, codes, scale, partner=first[n][1])
        _set_weights_(qmodel, layers)

    if cfg.avg_bits is not None:
        numel = sum(q.numel for q in layers.values())
        alloc = fit_budget(scores, sizes, int(cfg.avg_bits * numel / 8))
    else:
        fixed = sum(code_nbytes(q.bits, q.numel) for q in layers.values())
        overhead = packed_nbytes(probe) - fixed

        def measure(bits: dict[str, int]) -> int:
            apply(bits)
            return packed_nbytes(probe)
        alloc = fit_budget(scores, sizes, int(cfg.size_budget_bytes), measure, overhead)
    apply(alloc.bits)
    summary = alloc.summary({n: q.numel for n, q in layers.items()})
    summary["seconds"] = round(time.perf_counter() - t0, 3)
    log.info("allocation: %s", summary)
    return summary


def _fold_c_(p: Link, c: torch.Tensor, layers: dict[str, QuantLayer], mods: dict[str, nn.Module]) -> None:
    """Fold c where deployment wants it (D6); the integer codes are never touched."""
    with torch.no_grad():
        if p.homogeneous and p.bn is not None:
            bn = mods[p.bn]
            bn.weight.mul_(c.to(bn.weight.dtype))
            bn.bias.mul_(c.to(bn.bias.dtype))
        elif p.homogeneous:
            low = layers[p.low]
            low.scale = (low.scale.double() * c).float()
            mods[p.low].weight.copy_(low.weight())
            if mods[p.low].bias is not None:
                mods[p.low].bias.mul_(c.to(mods[p.low].bias.dtype))
        else:
            high = layers[p.high]
            conv = mods[p.high]
            if conv.groups == conv.in_channels and conv.groups > 1:  # depthwise: input channel j is output j
                high.scale = (high.scale.double() * c).float()
            else:
                high.in_scale = c.float()
            conv.weight.copy_(high.weight())
