"""DFQ (Nagel et al. 2019, ICCV): data-free cross-layer equalization and analytic bias correction.

DFQ choices (ours, stated because the paper leaves them to the implementation):

* CLE equalises the *BN-folded* weights: for every link ``a -> BN -> ReLU -> b`` (pairing.find_links, not only the
  chosen pairs) the BN is folded into ``a`` (``W_a <- W_a * gamma/sigma``; the BN becomes a pure bias: weight 1,
  running mean 0, running var ``1 - eps``, bias ``beta - gamma*mu/sigma``), then ``s_j = sqrt(r_a_j / r_b_j)``
  with ``r_a_j = max|W_a[j]|`` and ``r_b_j = max|W_b[:, j]|``; ``W_a[j] /= s_j``, bias_j ``/= s_j``,
  ``W_b[:, j] *= s_j`` (exact for positively homogeneous activations, ReLU(z/s) = ReLU(z)/s). Passes repeat until
  every ``s`` is within 1e-3 of 1 (at most 20). Links through ReLU6/SiLU/... or into grouped convs are skipped.
  The folded BNs no longer hold statistics, so statistics are never re-estimated afterwards (``recal="none"``).
* Bias correction: for each conv fed by a folded BN and ReLU/identity, ``E[x_j] = E[ReLU(N(m_j, sd_j^2))]``
  (clipped-normal mean; ``m = beta``, ``sd = |gamma|`` of the original BN, divided by the CLE scales), and the
  output error ``(W_q - W) E[x]`` (summed over the kernel, padding ignored) is removed from the BN after that conv
  (``running_mean += delta``) or, without a BN, from the conv bias. Convs fed by a residual sum, the stem and the
  classifier get no correction (their input mean is not known from one BN).
"""
from __future__ import annotations

import copy
import math
import time
from dataclasses import replace

import torch
import torch.fx as fx
from torch import nn

from calib_free import collect_bn_stats

from ..core.config import QuantConfig
from ..core.pairing import Link, find_links
from ..core.state import MixedPrecisionModel
from .compensate import compensate

__all__ = ["cross_layer_equalize", "dfq", "dfq_config"]


def dfq_config(cfg: QuantConfig) -> QuantConfig:
    """Plain rounding at ``cfg``'s bits, FP statistics (CLE folds BNs, so they must not be re-estimated)."""
    return replace(cfg, compensation=False, recal="none", rounding="nearest")


def _trace_bn_after(model: nn.Module) -> dict[str, str]:
    """``{conv fqn: fqn of the BatchNorm2d that is its only user}``."""
    gm = fx.symbolic_trace(model)
    mods = dict(gm.named_modules())
    out = {}
    for node in gm.graph.nodes:
        if node.op == "call_module" and isinstance(mods[node.target], (nn.Conv2d, nn.Linear)) and len(node.users) == 1:
            user = next(iter(node.users))
            if user.op == "call_module" and isinstance(mods[user.target], nn.BatchNorm2d):
                out[node.target] = user.target
    return out


def _cle_links(model: nn.Module) -> list[Link]:
    mods = dict(model.named_modules())
    return [lk for lk in find_links(model)
            if lk.act in ("relu", "identity") and mods[lk.high].groups == 1 and mods[lk.low].groups == 1]


@torch.no_grad()
def cross_layer_equalize(model: nn.Module, max_passes: int = 20,
                         tol: float = 1e-3) -> tuple[nn.Module, dict[str, tuple[torch.Tensor, torch.Tensor]]]:
    """CLE on BN-folded weights (module docstring). Returns a new model computing the same function.

    Args:
        model: FP32 eval-mode model (not modified).
        max_passes: sweeps over the links at most.
        tol: stop when every scale is within ``tol`` of 1.

    Returns:
        (equalised model, ``{bn fqn: (pre-activation mean, pre-activation std)}`` per folded BN, float64, already
        divided by the CLE scales: the Gaussian model of that BN's output that bias correction uses).
    """
    model = copy.deepcopy(model).eval()
    mods = dict(model.named_modules())
    links = _cle_links(model)
    pre: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for lk in links:  # fold each link's BN into its first conv once
        if lk.bn is None or lk.bn in pre:
            continue
        conv, bn = mods[lk.low], mods[lk.bn]
        gamma, beta = bn.weight.double(), bn.bias.double()
        sigma = torch.sqrt(bn.running_var.double() + bn.eps)
        b0 = conv.bias.double() if conv.bias is not None else torch.zeros_like(beta)
        conv.weight.mul_((gamma / sigma).float().reshape(-1, *([1] * (conv.weight.dim() - 1))))
        if conv.bias is not None:
            conv.bias.zero_()
        bn.bias.copy_((beta + gamma * (b0 - bn.running_mean.double()) / sigma).float())
        bn.weight.fill_(1.0)
        bn.running_mean.zero_()
        bn.running_var.fill_(1.0 - bn.eps)
        pre[lk.bn] = (beta.clone(), gamma.abs().clone())
    for _ in range(max_passes):
        worst = 0.0
        for lk in links:
            a, b = mods[lk.low], mods[lk.high]
            r1 = a.weight.detach().double().flatten(1).abs().amax(1)
            r2 = b.weight.detach().double().transpose(0, 1).flatten(1).abs().amax(1)
            ok = (r1 > 0) & (r2 > 0)
            s = torch.where(ok, torch.sqrt(r1 / torch.where(ok, r2, torch.ones_like(r2))), torch.ones_like(r1))
            worst = max(worst, float((s.log().abs()).max()))
            a.weight.div_(s.float().reshape(-1, *([1] * (a.weight.dim() - 1))))
            if a.bias is not None:
                a.bias.div_(s.float())
            if lk.bn is not None:
                mods[lk.bn].bias.div_(s.float())
                m, sd = pre[lk.bn]
                pre[lk.bn] = (m / s, sd / s)
            b.weight.mul_(s.float().reshape(1, -1, *([1] * (b.weight.dim() - 2))))
        if worst < math.log1p(tol):
            break
    return model, pre


def _relu_mean(m: torch.Tensor, sd: torch.Tensor) -> torch.Tensor:
    """E[ReLU(z)], z ~ N(m, sd^2): m Phi(m/sd) + sd phi(m/sd) (sd = 0 gives ReLU(m))."""
    safe = torch.where(sd > 0, sd, torch.ones_like(sd))
    t = m / safe
    val = m * 0.5 * (1 + torch.erf(t / math.sqrt(2))) + safe * torch.exp(-0.5 * t * t) / math.sqrt(2 * math.pi)
    return torch.where(sd > 0, val, m.clamp(min=0))


@torch.no_grad()
def _bias_correct_(mp: MixedPrecisionModel, fp: nn.Module, pre: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> int:
    """Analytic bias correction in place on ``mp.module`` (module docstring); returns how many layers it changed."""
    fp_mods, q_mods = dict(fp.named_modules()), dict(mp.module.named_modules())
    bn_after = _trace_bn_after(mp.module)
    done = 0
    for lk in _cle_links(fp):
        if lk.bn is None or lk.bn not in pre:
            continue
        m, sd = pre[lk.bn]
        ex = _relu_mean(m, sd) if lk.act == "relu" else m
        dw = (mp.layers[lk.high].weight().double() - fp_mods[lk.high].weight.double()).sum(dim=(2, 3))
        delta = dw @ ex  # (out,) expected output error of the quantized conv
        if lk.high in bn_after:
            q_mods[bn_after[lk.high]].running_mean.add_(delta.float())
        elif q_mods[lk.high].bias is not None:
            q_mods[lk.high].bias.sub_(delta.float())
        else:
            continue
        done += 1
    return done


def dfq(model: nn.Module, cfg: QuantConfig, input_shape: tuple[int, int, int], arch: str | None = None,
        real_inputs: torch.Tensor | None = None, progress=None, synthetic=None, equalize: bool = True,
        bias_correction: bool = True) -> MixedPrecisionModel:
    """Data-free quantization (Nagel et al. 2019): CLE, quantize at ``cfg.bits`` per pairing.py, bias correction.

    Args:
        model: FP32 eval-mode model (not modified).
        cfg: bits and quantizer options; compensation, re-estimation and error-feedback rounding are turned off.
        input_shape: (C, H, W) of one input (unused: no data, kept for the common signature).
        arch: name recorded in the result.
        real_inputs, progress, synthetic: unused (common signature).
        equalize, bias_correction: switch either step off (ablations, tests).

    Returns:
        MixedPrecisionModel of the equalised, quantized, bias-corrected model.
    """
    t0 = time.perf_counter()
    eq, pre = cross_layer_equalize(model) if equalize else (copy.deepcopy(model).eval(), {})
    t1 = time.perf_counter()
    if not equalize and bias_correction:
        stats = collect_bn_stats(model)
        pre = {lk.bn: (stats[lk.bn].beta, stats[lk.bn].gamma.abs()) for lk in _cle_links(model) if lk.bn in stats}
    mp = compensate(eq, dfq_config(cfg), input_shape, arch=arch or type(model).__name__)
    corrected = _bias_correct_(mp, eq, pre) if bias_correction else 0
    steps = " + ".join(n for n, on in (("CLE", equalize), ("analytic bias correction", bias_correction)) if on)
    mp.estimator = f"none (data-free: {steps or 'plain rounding'} from BN statistics)"
    mp.info.update({"cle_seconds": round(t1 - t0, 4), "cle_links": len(_cle_links(model)) if equalize else 0,
                    "bias_corrected_layers": corrected, "total_seconds": round(time.perf_counter() - t0, 4)})
    return mp
