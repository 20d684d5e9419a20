"""DFQ (Nagel et al. 2019, ICCV), data-free: cross-layer equalization (this pass) and analytic bias correction.

Choices (ours, stated because the paper leaves them to the implementation):

* CLE equalises the *BN-folded* weights: for every link ``a -> BN -> ReLU -> b`` (core.graph links, not only the
  chosen pairs) the BN is folded into ``a`` (``W_a <- W_a * gamma/sigma``; the BN becomes a pure bias: weight 1,
  running mean 0, running var ``1 - eps``, bias ``beta - gamma*mu/sigma``), then ``s_j = sqrt(r_a_j / r_b_j)``
  with ``r_a_j = max|W_a[j]|`` and ``r_b_j = max|W_b[:, j]|``; ``W_a[j] /= s_j``, bias_j ``/= s_j``,
  ``W_b[:, j] *= s_j`` (exact for positively homogeneous activations, ReLU(z/s) = ReLU(z)/s). A depthwise conv
  (``groups == in_channels == out_channels``) holds one filter per channel, which is both its output row ``j`` and
  its input column ``j``: as ``a`` it is scaled like any conv, as ``b`` its filter ``j`` is multiplied by ``s_j``
  (and ``r_b_j = max|W_b[j]|``). This is the case CLE was made for (Nagel et al.'s MobileNetV2: expansion ->
  depthwise -> projection, every link equalised, repeatedly). Passes repeat until every ``s`` is within 1e-3 of 1
  (at most 20). Links through ReLU6/SiLU/... or into other grouped convs are skipped.
  The folded BNs no longer hold statistics, so statistics are never re-estimated afterwards.
* Bias correction (:class:`BiasCorrect`): for each conv fed by a folded BN and ReLU/identity,
  ``E[x_j] = E[ReLU(N(m_j, sd_j^2))]`` (clipped-normal mean; ``m = beta``, ``sd = |gamma|`` of the original BN,
  divided by the CLE scales), and the output error ``(W_q - W) E[x]`` (summed over the kernel, padding ignored) is
  removed from the BN after that conv (``running_mean += delta``) or, without a BN, from the conv bias. Convs fed by
  a residual sum, the stem and the classifier get no correction (their input mean is not known from one BN).
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import torch
from torch import nn

from ..core.config import BitsSpec, parse_bits
from ..core.graph import GraphAnalysis, Link
from ..core.quantizers import DEFAULT_GRID, dequantize, quantize_weight
from ..errors import UsageError
from .base import Context, Pass, register_pass
from .quantize import bits_option, grid_option, per_channel_option, role_widths

__all__ = ["Equalize", "EqualizeRows", "BiasCorrect", "cross_layer_equalize", "equalize_rows",
           "require_before_quantize", "cle_links", "cle_blocked_links"]


def _depthwise(m: nn.Module) -> bool:
    return isinstance(m, nn.Conv2d) and m.groups > 1 and m.groups == m.in_channels == m.out_channels


def _conv_link(lk: Link, mods: dict[str, nn.Module]) -> bool:
    return all(mods[n].groups == 1 or _depthwise(mods[n]) for n in (lk.low, lk.high))


def cle_links(graph: GraphAnalysis, mods: dict[str, nn.Module]) -> list[Link]:
    """The links CLE can equalise: ReLU or no activation between two convs, each ungrouped or depthwise."""
    return [lk for lk in graph.links if lk.act in ("relu", "identity") and _conv_link(lk, mods)]


def cle_blocked_links(graph: GraphAnalysis, mods: dict[str, nn.Module]) -> list[Link]:
    """Links between two such convs that CLE must skip: the activation between them (ReLU6, SiLU, ...) is not
    positively homogeneous, so rescaling a channel would change the function."""
    return [lk for lk in graph.links if lk.act not in ("relu", "identity") and _conv_link(lk, mods)]


def _in_ranges(b: nn.Module) -> torch.Tensor:
    """``max |W_b[:, j]|`` per input channel ``j`` (a depthwise filter ``j`` is input channel ``j``)."""
    w = b.weight
    assert isinstance(w, torch.Tensor)
    w = w.detach()
    return (w if _depthwise(b) else w.transpose(0, 1)).flatten(1).abs().amax(1).double()  # max is exact in float32


@torch.no_grad()
def cross_layer_equalize(model: nn.Module, graph: GraphAnalysis, max_passes: int = 20,
                         tol: float = 1e-3) -> tuple[nn.Module, dict[str, tuple[torch.Tensor, torch.Tensor]]]:
    """CLE on BN-folded weights (module docstring). Returns a new model computing the same function.

    Args:
        model: FP32 eval-mode model (not modified).
        graph: its graph analysis.
        max_passes: sweeps over the links at most.
        tol: stop when every scale is within ``tol`` of 1.

    Returns:
        (equalised model, ``{bn fqn: (pre-activation mean, pre-activation std)}`` per folded BN, float64, already
        divided by the CLE scales: the Gaussian model of that BN's output that bias correction uses).
    """
    model = copy.deepcopy(model).eval()
    mods = dict(model.named_modules())
    links = cle_links(graph, mods)
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
            r1 = a.weight.detach().flatten(1).abs().amax(1).double()
            r2 = _in_ranges(b)
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
            lead = (-1, 1) if _depthwise(b) else (1, -1)
            b.weight.mul_(s.float().reshape(*lead, *([1] * (b.weight.dim() - 2))))
        if worst < math.log1p(tol):
            break
    return model, pre


@register_pass
@dataclass(frozen=True)
class Equalize(Pass):
    """Cross-layer equalization: the FP reference is replaced by its equalised copy (the same function)."""

    name = "equalize"
    max_passes: int = 20
    tol: float = 1e-3

    def __post_init__(self) -> None:
        if self.max_passes < 1 or not self.tol > 0:
            raise UsageError(f"equalize: max_passes={self.max_passes} must be >= 1 and tol={self.tol} > 0")

    def apply(self, ctx: Context) -> dict:
        require_before_quantize(ctx, self.name)
        return self._commit(ctx, *cross_layer_equalize(ctx.fp_model, ctx.graph, self.max_passes, self.tol))

    @staticmethod
    def _commit(ctx: Context, eq: nn.Module, pre: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> dict:
        """Make the equalised copy ``eq`` the FP reference (and the working model) of ``ctx``."""
        ctx.fp_model, ctx.model = eq, copy.deepcopy(eq).eval()
        ctx.shared["bn_pre"] = pre
        ctx.shared["steps"] = ctx.shared.get("steps", []) + ["CLE"]
        return {"links": len(cle_links(ctx.graph, dict(eq.named_modules()))), "folded_bn": len(pre)}


def require_before_quantize(ctx: Context, name: str) -> None:
    """A pass that changes the weights to quantize refuses to run once they are quantized."""
    if ctx.layers:
        raise UsageError(f"{name} must run before the quantize pass (it changes the weights to quantize)")


def _relu_mean(m: torch.Tensor, sd: torch.Tensor) -> torch.Tensor:
    """E[ReLU(z)], z ~ N(m, sd^2): m Phi(m/sd) + sd phi(m/sd) (sd = 0 gives ReLU(m))."""
    safe = torch.where(sd > 0, sd, torch.ones_like(sd))
    t = m / safe
    val = m * 0.5 * (1 + torch.erf(t / math.sqrt(2))) + safe * torch.exp(-0.5 * t * t) / math.sqrt(2 * math.pi)
    return torch.where(sd > 0, val, m.clamp(min=0))


@register_pass
@dataclass(frozen=True)
class BiasCorrect(Pass):
    """DFQ's analytic bias correction of the quantized model (module docstring)."""

    name = "bias_correct"

    @torch.no_grad()
    def apply(self, ctx: Context) -> dict:
        if ctx.bn_status != "real":  # the BN's (beta, |gamma|) would not describe the activations
            steps = " + ".join(ctx.shared.get("steps", []) or ["plain rounding"])
            ctx.estimator = f"none (data-free: {steps}; no bias correction: the BN layers carry no statistics)"
            return {"corrected_layers": 0, "skipped": f"bn statistics {ctx.bn_status}"}
        fp_mods, q_mods = dict(ctx.fp_model.named_modules()), dict(ctx.model.named_modules())
        links = cle_links(ctx.graph, fp_mods)
        pre = ctx.shared.get("bn_pre")
        if pre is None:  # no equalisation: the BN's own output distribution
            pre = {}
            for lk in links:
                bn = fp_mods.get(lk.bn) if lk.bn else None
                if isinstance(bn, nn.BatchNorm2d):
                    pre[lk.bn] = (bn.bias.detach().double(), bn.weight.detach().double().abs())
        bn_after = ctx.graph.bn_after
        done = 0
        for lk in links:
            if lk.bn is None or lk.bn not in pre:
                continue
            m, sd = pre[lk.bn]
            ex = _relu_mean(m, sd) if lk.act == "relu" else m
            dw = (ctx.layers[lk.high].weight().double() - fp_mods[lk.high].weight.double().cpu()).sum(dim=(2, 3))
            # (out,) expected output error of the quantized conv (a depthwise filter j reads input channel j only)
            delta = (dw[:, 0] * ex.cpu() if _depthwise(fp_mods[lk.high]) else dw @ ex.cpu()).float()
            if lk.high in bn_after:
                rm = q_mods[bn_after[lk.high]].running_mean
                rm.add_(delta.to(rm))
            elif q_mods[lk.high].bias is not None:
                q_mods[lk.high].bias.sub_(delta.to(q_mods[lk.high].bias))
            else:
                continue
            done += 1
        steps = " + ".join(ctx.shared.get("steps", []) + ["analytic bias correction"])
        ctx.estimator = f"none (data-free: {steps} from BN statistics)"
        return {"corrected_layers": done}


def _normalised_error(w: torch.Tensor, w_hat: torch.Tensor, gain: torch.Tensor) -> float:
    """``sum_j gain_j^2 ||w_hat_j - w_j||^2``: a BN-followed conv's rounding error in the units the BN outputs."""
    return float(((w_hat - w).flatten(1).double() ** 2).sum(1).mul(gain.double() ** 2).sum())


@torch.no_grad()
def equalize_rows(model: nn.Module, graph: GraphAnalysis, bits: dict[str, int],
                  grid: str = DEFAULT_GRID) -> tuple[nn.Module, dict[str, float], list[str]]:
    """A copy of ``model`` in which every conv of ``bits`` whose sole consumer is a BN with statistics has each
    output row scaled to the largest row's range, the BN absorbing the scale (exact, in real arithmetic):
    ``W[j] *= f_j``, ``b_j *= f_j``, ``mu_j *= f_j``, ``var_j <- f_j^2 (var_j + eps) - eps``, with
    ``f_j = max_i max|W[i]| / max|W[j]|`` (f >= 1, so the new variance is never negative), since
    ``(f z - f mu) / sqrt(f^2 (var + eps)) = (z - mu) / sqrt(var + eps)``.

    A layer is equalised only if that lowers its per-tensor rounding error at its width as the BN passes it on
    (each row's squared error times ``(gamma_j / sqrt(var_j + eps))^2``, in the original units): weights already on
    a per-tensor lattice, for example, stay as they are.

    Returns:
        (the copy, ``{equalised conv: largest / smallest non-zero row range before}``, the convs left as they were).
    """
    eq = copy.deepcopy(model).eval()
    mods = dict(eq.named_modules())
    spread: dict[str, float] = {}
    kept: list[str] = []
    for fqn, bn_name in graph.bn_after.items():
        conv, bn = mods[fqn], mods[bn_name]
        if fqn not in bits or not isinstance(conv, nn.Conv2d) or not isinstance(bn, nn.BatchNorm2d):
            continue
        if bn.running_mean is None or bn.running_var is None:
            continue
        w = conv.weight.detach()
        r = w.flatten(1).abs().amax(1)
        live = r > 0
        if not bool(live.any()):
            continue
        f = torch.where(live, r.max() / torch.where(live, r, torch.ones_like(r)), torch.ones_like(r))
        shape = (-1, *[1] * (w.dim() - 1))
        gain = (bn.weight.detach() if bn.weight is not None else torch.ones_like(r)) / torch.sqrt(
            bn.running_var + bn.eps)
        plain = dequantize(*quantize_weight(w, bits[fqn], False, grid))
        equalised = dequantize(*quantize_weight(w * f.reshape(shape), bits[fqn], False, grid)) / f.reshape(shape)
        if _normalised_error(w, equalised, gain) >= _normalised_error(w, plain, gain):
            kept.append(fqn)
            continue
        conv.weight.mul_(f.reshape(shape))
        if conv.bias is not None:
            conv.bias.mul_(f)
        bn.running_mean.mul_(f)
        bn.running_var.copy_(f * f * (bn.running_var + bn.eps) - bn.eps)
        spread[fqn] = float(r.max() / r[live].min())
    return eq, spread, kept


@register_pass
@dataclass(frozen=True)
class EqualizeRows(Pass):
    """Per-tensor k-bit grids on a model with BN statistics: every output row of a conv spans the tensor's range.

    A conv whose sole consumer is a BatchNorm with statistics can scale each output row freely: the BN normalises the
    scale away (:func:`equalize_rows`, exact). A per-tensor grid is as coarse as the widest row, so rows a decade
    narrower (MobileNetV2's depthwise and projection layers) round to a few levels; with every row scaled to the
    widest, one step serves every row. Unlike CLE (:class:`Equalize`), nothing moves into the next layer and the BN
    keeps its statistics, so synthesis and the statistics corrections run afterwards as before. A layer is equalised
    only where that lowers its rounding error as the BN passes it on (:func:`equalize_rows`). Ternary layers keep
    the paper's TWN threshold on the weights as published; per-channel grids need nothing. ``bits``, ``per_channel``
    and ``grid`` are the quantize pass's own settings, read here too.
    """

    name = "equalize_rows"
    bits: BitsSpec = bits_option()
    per_channel: bool = per_channel_option()
    grid: str = grid_option()

    def __post_init__(self) -> None:
        if isinstance(self.bits, str):
            object.__setattr__(self, "bits", parse_bits(self.bits))

    def apply(self, ctx: Context) -> dict:
        require_before_quantize(ctx, self.name)
        if self.per_channel:
            return {"skipped": "per-channel grids (each row has its own step)"}
        if ctx.bn_status != "real":
            return {"skipped": f"BN statistics {ctx.bn_status}"}
        widths = role_widths(ctx.graph, self.bits)
        eq, spread, kept = equalize_rows(ctx.fp_model, ctx.graph, {n: b for n, b in widths.items() if b > 2},
                                         self.grid)
        ctx.fp_model, ctx.model = eq, copy.deepcopy(eq).eval()
        vals = sorted(spread.values())
        return {"layers": len(spread), "left_as_they_were": len(kept),
                "row_range_spread": {"median": round(vals[len(vals) // 2], 2), "max": round(vals[-1], 2)}
                if vals else None}
