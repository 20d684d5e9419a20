"""Recalibrate pass: re-estimate BN statistics and re-choose the low-bit codes, in one forward pass.

The paper's "re-calibrate mu_hat and sigma_hat" (D3) and error-feedback rounding (rounding.py) both need, for each
layer, the input it sees in the model *as quantized so far*: earlier layers with their final codes, earlier BN
layers with their re-estimated statistics. Both only depend on what comes before a layer, so one walk over the
graph in execution order (a torch.fx Interpreter over the calibration inputs) serves every layer:

* at a layer to re-round: its input gives ``H = E[x x^T]`` (im2col patches); the codes are chosen by error feedback
  (with the grid-step search for low-bit layers) and the layer then runs with its new weight;
* at a BatchNorm in scope: the statistics it normalises with are corrected, and it then normalises with them (eval
  mode), so everything after it sees the final statistics. ``absolute`` (ZeroQ, and this project on CIFAR): its
  input's batch mean and (unbiased) variance become its running statistics. ``delta``: only the *change* that
  quantization makes is taken from the synthetic inputs - the quantized model's batch statistics against the FP
  model's on the same inputs - and applied to the statistics the model stores (mean shifted by the difference,
  variance scaled by the ratio). Synthetic inputs at 224 px do not reproduce every layer's stored statistics
  (calibrate's ``per_bn`` report), and replacing real statistics by estimates from them destroys a model (issue 19:
  79 % -> 0.3 % on MobileNetV2); the change quantization makes is what they can measure. ``auto`` (the default) runs
  ``delta``, then ``absolute`` on the same codes, and keeps the one with the lower divergence from the FP model on
  the held-out synthetic inputs (passes/guard.py): a choice that reads no data.

Grouped (depthwise) convolutions get error feedback too, one input second moment per group
(:func:`~dfmpc_deploy.passes.rounding.grouped_codes`).

The int-grid layers that error feedback leaves at nearest rounding (at the default scope: the 6-bit layers) get
their step re-chosen by **output** error (``step_by="output"``): among the quantize pass's candidate steps, the one
with the least ``sum_k E[x_k^2] (w_k - s q_k)^2`` (the diagonal of the input second moment, measured on the way;
core.quantizers.int_grid ``col_weight``), rather than the least weight error, which clips large weights whose
inputs are strong. Only where the synthetic inputs are shown to be what the layer sees on real data: the BN after
the layer must be matched within :data:`TRUSTED_MISMATCH` (calibrate's per-BN synthesis quality; real calibration
inputs are always trusted). Measured (README, docs/MATH.md 6.6): on the CIFAR ResNets every layer qualifies and
2/6 gains 0.2-0.5 points; on MobileNetV2 at 224 px 9 of 52 layers do; without that check the output step there
cost 6 points at 6 bits per channel, while the held-out divergence did not see it.

This replaces one full forward pass plus one re-estimation pass per layer: the cost is one forward pass plus the
rounding itself. Scope: the BN layers after low-bit layers (``low``, the paper) or every BN (``all``, ZeroQ).
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, cast

import torch
import torch.fx as fx
from torch import nn

from ..core.graph import Role
from ..core.options import option
from ..core.quantizers import int_grid
from ..errors import UsageError
from .base import Context, Pass, register_pass
from .guard import holdout_kl
from .rounding import GRID_MULTIPLIERS, best_grid_codes, grouped_codes, input_second_moment, supported

#: which layers error feedback re-rounds: the low-bit ones, every one, or (auto) the low-bit ones and every layer of
#: at most AUTO_ROUNDING_MAX_BITS bits
ROUNDING_SCOPES = ("low", "all", "auto")
AUTO_ROUNDING_MAX_BITS = 4

#: how the statistics in scope are corrected (see the module docstring)
STATS_CHOICES = ("auto", "delta", "absolute")
#: how the int-grid step of a layer kept at nearest rounding is chosen (see ``Recalibrate.step_by``)
STEP_BY = ("output", "weights")
#: ``step_by="output"`` reads a layer's input energies from the synthetic inputs only where they reproduce the
#: statistics stored in the BN after the layer to within this :func:`calib_free.synth.bn_mismatch`: (1/5 of a
#: standard deviation)^2, e.g. every channel's mean off by 0.2 sd
TRUSTED_MISMATCH = 0.2 ** 2

#: delta statistics: a channel whose FP batch variance on the calibration inputs is below this fraction of its
#: stored variance is not exercised by them (standard deviation under a tenth of the stored one) and keeps its
#: stored statistics
EXERCISED = 0.1 ** 2
#: delta statistics: the largest factor by which a BN's variance is scaled (a quantized channel with no signal left
#: gets this: its BN then outputs its shift beta)
MAX_VAR_RATIO = 1e8
#: delta statistics, ``ratio``: a channel whose quantized batch variance is below this fraction of the FP one has no
#: signal left (a filter rounded to zero): its BN is set to output its shift
COLLAPSED = 1e-6
#: how delta statistics fit the quantized channel to the FP one (see :func:`delta_statistics`)
DELTA_FITS = ("ratio", "affine", "moments")

__all__ = ["Recalibrate", "STATS_CHOICES", "STEP_BY", "DELTA_FITS", "batch_moments", "column_energy",
           "delta_statistics"]


class _Walk(fx.Interpreter):
    """Runs the graph once, re-rounding ``todo`` layers and re-estimating the ``scope`` BN statistics on the way.

    In delta mode (``fp`` given: the FP model's GraphModule of the same graph) the FP model runs in lockstep, node
    by node on the same inputs, so that at each BN in scope the FP and the quantized inputs are both at hand (their
    per-channel covariance included) with only the live activations of the two models in memory."""

    def __init__(self, gm: fx.GraphModule, todo: dict[str, Any], scope: set[str], round_layer, progress,
                 fp: fx.GraphModule | None = None, restep: set[str] | None = None, restep_layer=None,
                 fit: str = "ratio"):
        super().__init__(gm)
        self.todo, self.scope, self.round_layer, self.progress = todo, scope, round_layer, progress
        self.fp = None if fp is None else fx.Interpreter(fp, garbage_collect_values=False)
        self.fp_nodes = {} if fp is None else {n.name: n for n in fp.graph.nodes}
        self.fp_input: torch.Tensor | None = None
        self.fit = fit
        self.restep, self.restep_layer = restep or set(), restep_layer  # layers whose int step output error picks
        self.total = len(todo) + len(scope) + len(self.restep)
        self.done = 0

    def run(self, *args, **kwargs):
        if self.fp is not None:
            self.fp.env = {}
            self.fp.args_iter = iter(args)
        return super().run(*args, **kwargs)

    def run_node(self, n: fx.Node):
        if self.fp is None:
            return super().run_node(n)
        fn = self.fp_nodes[n.name]
        self.fp_input = (self.fp.env[self.fp_nodes[n.args[0].name]]  # type: ignore[union-attr]
                         if n.op == "call_module" and n.target in self.scope else None)
        self.fp.env[fn] = self.fp.run_node(fn)
        out = super().run_node(n)
        for gone in self.user_to_last_uses.get(n, []):  # the FP values die with the quantized ones
            self.fp.env.pop(self.fp_nodes[gone.name], None)
        return out

    def _tick(self) -> None:
        self.done += 1
        if self.progress is not None:
            self.progress(self.done, self.total)

    def call_module(self, target, args, kwargs):
        m = self.fetch_attr(target)
        if target in self.todo:
            self.round_layer(target, m, args[0])
            self._tick()
        elif target in self.restep:
            self.restep_layer(target, m, args[0])
            self._tick()
        if target in self.scope and isinstance(m, nn.BatchNorm2d):
            mean, var = cast(torch.Tensor, m.running_mean), cast(torch.Tensor, m.running_var)
            with torch.no_grad():
                if self.fp is None:
                    new = batch_moments(args[0])
                else:
                    assert self.fp_input is not None
                    new = delta_statistics(mean, var, m.eps, self.fp_input, args[0], self.fit)
                mean.copy_(new[0])
                var.copy_(new[1])
                if m.num_batches_tracked is not None:
                    m.num_batches_tracked.fill_(1)
            self._tick()
        return super().call_module(target, args, kwargs)


def column_energy(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The diagonal of the layer-input second moment, ``E[x_k^2]`` for each column k of the flattened weight
    (in x kh x kw order), from the layer's input ``x``: (K,) for a Linear or an ungrouped conv, (out, K) for a
    grouped one (each row sees its own group's channels). A conv column's energy is its input channel's mean square
    over every position (the zeros that padding adds at the border are not counted)."""
    if isinstance(module, nn.Linear):
        return x.detach().float().pow(2).reshape(-1, x.shape[-1]).mean(0)
    conv = cast(nn.Conv2d, module)
    e = x.detach().float().pow(2).mean(dim=(0, 2, 3))
    taps = conv.kernel_size[0] * conv.kernel_size[1]
    if conv.groups == 1:
        return e.repeat_interleave(taps)
    per_group = e.reshape(conv.groups, -1).repeat_interleave(taps, dim=1)  # (G, K)
    return per_group.repeat_interleave(conv.out_channels // conv.groups, dim=0)


def batch_moments(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel batch mean and unbiased variance of an (N, C, H, W) activation."""
    return x.mean(dim=(0, 2, 3)), x.var(dim=(0, 2, 3), unbiased=True)


def delta_statistics(mean: torch.Tensor, var: torch.Tensor, eps: float, x_fp: torch.Tensor, x_q: torch.Tensor,
                     fit: str = "ratio") -> tuple[torch.Tensor, torch.Tensor]:
    """The stored statistics ``(mean, var)`` of a BN corrected by the change quantization makes to its input: ``x_fp``
    and ``x_q`` are the FP and the quantized model's inputs to the BN on the same (synthetic) inputs, (N, C, H, W).

    ``fit="ratio"`` (the default; docs/MATH.md 6.5): the mean moves by ``E[x_q] - E[x_fp]``, the variance is scaled
    by ``var_q / var_fp``; a channel that quantization left constant (``var_q`` below :data:`COLLAPSED` of
    ``var_fp``: a filter rounded to zero) gets the constant as its mean, so its BN outputs its shift ``beta`` (the
    ratio alone would give a variance of 0 and divide the synthetic mean's mismatch by ``sqrt(eps)``).

    ``fit="affine"``: per channel, what quantization does is measured as an affine map plus noise,
    ``x_q = a x_fp + c + e`` (least squares on the paired inputs: ``a = cov / var_fp``, ``c = E[x_q] - a E[x_fp]``,
    ``var(e)`` the residual variance). Composed with the statistics the model stores for ``x_fp`` (``mean``,
    ``var``: real data), it gives the quantized input's mean on real data, ``a mean + c``, and the least-squares
    slope of ``x_fp`` on ``x_q`` there, ``b = a var / (a^2 var + var(e))``; the BN then maps ``x_q`` to the BN
    output of the best estimate of ``x_fp``: running mean ``a mean + c``, running variance ``(var + eps) / b^2 -
    eps``. An exact rescaled copy (``e = 0``) is mapped exactly whatever the synthetic mismatch; a noisy channel is
    shrunk as least squares says; a channel with no signal left (``a = 0``) gives ``beta``. ``fit="moments"``: the
    same map's prediction of the quantized input's real-data moments, mean ``a mean + c`` and variance
    ``a^2 var + var(e)`` (BN re-estimation as if on real data).

    Every fit: a channel the inputs do not exercise (FP batch variance below :data:`EXERCISED` of the stored one:
    dark on the synthetic inputs) keeps its stored statistics: the inputs say nothing about it.
    """
    fp_m, fp_v = batch_moments(x_fp)
    q_m, q_v = batch_moments(x_q)
    exercised = fp_v > EXERCISED * (var + eps)
    if fit == "ratio":
        new_mean = mean + (q_m - fp_m)
        new_var = (var * q_v / fp_v.clamp_min(eps)).clamp_min(0)
        constant = q_v <= COLLAPSED * fp_v  # quantization left the channel constant: the BN outputs its shift
        new_mean, new_var = torch.where(constant, q_m, new_mean), torch.where(constant, var, new_var)
    else:
        n = x_q.numel() // x_q.shape[1]
        dev_fp = x_fp - fp_m[None, :, None, None]
        cov = (dev_fp * (x_q - q_m[None, :, None, None])).sum(dim=(0, 2, 3)) / max(1, n - 1)
        a = cov / fp_v.clamp_min(1e-30)
        noise = (q_v - a * cov).clamp_min(0)
        new_mean = a * mean + (q_m - a * fp_m)
        real_q_v = a * a * var + noise
        if fit == "moments":
            return torch.where(exercised, new_mean, mean), torch.where(exercised, real_q_v, var)
        b = torch.where(real_q_v > 0, a * var / real_q_v.clamp_min(1e-30), torch.zeros_like(a))
        inv_b2 = torch.where(b > 0, 1 / (b * b).clamp_min(1 / MAX_VAR_RATIO), torch.full_like(b, MAX_VAR_RATIO))
        new_var = ((var + eps) * inv_b2 - eps).clamp_min(0)
    return torch.where(exercised, new_mean, mean), torch.where(exercised, new_var, var)


def _statistics(bns: dict[str, nn.BatchNorm2d]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """A copy of each BN layer's running mean and variance."""
    return {n: (cast(torch.Tensor, b.running_mean).clone(), cast(torch.Tensor, b.running_var).clone())
            for n, b in bns.items()}


@torch.no_grad()
def _load_statistics(bns: dict[str, nn.BatchNorm2d], stats: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> None:
    """Put ``stats`` (from :func:`_statistics`) back into the BN layers."""
    for n, b in bns.items():
        cast(torch.Tensor, b.running_mean).copy_(stats[n][0])
        cast(torch.Tensor, b.running_var).copy_(stats[n][1])


@register_pass
@dataclass(frozen=True)
class Recalibrate(Pass):
    """Re-estimate BN statistics in network order, re-choosing codes by error feedback on the way.

    Args:
        rounding: ``gptq`` (error feedback on the calibration inputs) or ``nearest`` (codes kept).
        recal_scope: which BN layers get re-estimated statistics: ``low`` (after low-bit layers) or ``all``.
            ``delta`` statistics are corrected at every BN whatever the scope (every layer is quantized, so every
            BN input changes); the scope says where ``absolute`` ones replace the stored statistics.
        stats: how they are corrected: ``delta``, ``absolute`` or ``auto`` (see the module docstring).
        delta_fit: how ``delta`` carries the change: ``ratio``, ``affine`` or ``moments`` (:func:`delta_statistics`).
        rounding_scope: which layers error feedback re-rounds: ``low``, ``all``, or ``auto`` (the default: the low
            layers and every layer of at most 4 bits). At 6 bits nearest rounding costs little, and on ImageNet
            MobileNetV2 the 6-bit layers' error feedback lowered the held-out divergence but cost accuracy (the
            second moments of 8 synthetic inputs at 224 px do not carry over to images); at 4 bits the rounding
            error is 16 times larger (in mean square) and error feedback is what recovers it (docs/MATH.md 6.5).
        step_by: ``output`` (re-choose the int-grid step of the layers left at nearest rounding by output error,
            where the synthetic inputs are trusted; module docstring) or ``weights`` (keep the quantize pass's
            least-weight-error step).
        grid_search: pick each low-bit layer's grid step among rounding.GRID_MULTIPLIERS x the TWN/DoReFa scale.
        max_k: layers with more input columns than this keep plain rounding (cost grows as K^2 x out).
        hessian_rows: patches per layer second moment (None: all patches of the calibration inputs).
        shrink: shrink each second moment's off-diagonal part by its noise over the samples
            (rounding.shrink_to_diagonal).
    """

    name = "recalibrate"
    guarded = True
    rounding: str = option("gptq", flag="--rounding", choices=("nearest", "gptq"),
                           help="code choice: 'nearest' (the paper) or 'gptq' error feedback on the calibration inputs")
    recal_scope: str = option("low", flag="--recal-scope", choices=("low", "all"),
                              help="re-estimate only the low-bit layers' BN statistics, or every BN")
    stats: str = option("auto", flag="--stats", choices=STATS_CHOICES,
                        help="statistics correction: 'delta' (the change quantization makes, measured on synthetic "
                             "inputs, applied to the stored statistics), 'absolute' (statistics of the synthetic "
                             "inputs), or 'auto' (the one closer to the FP model on held-out synthetic inputs)")
    delta_fit: str = option("ratio", flag="--delta-fit", choices=DELTA_FITS,
                            help="how delta statistics carry the change quantization makes: 'ratio' (mean shift and "
                                 "variance ratio), 'affine' (per channel an affine map plus noise fitted on the "
                                 "synthetic inputs, composed with the stored statistics, least-squares slope) or "
                                 "'moments' (the same map's prediction of the real-data mean and variance)")
    rounding_scope: str = "auto"
    step_by: str = option("output", flag="--step-by", choices=STEP_BY,
                          help="int-grid step of the layers error feedback leaves at nearest rounding: 'output' "
                               "(least output error on the synthetic inputs, diagonal second moment) or 'weights' "
                               "(least weight error, the quantize pass's choice kept)")
    grid_search: bool = True
    max_k: int = 4608
    hessian_rows: int | None = None
    shrink: bool = False

    def __post_init__(self) -> None:
        if self.rounding not in ("nearest", "gptq"):
            raise UsageError(f"bad --rounding '{self.rounding}': choose 'nearest' or 'gptq'")
        if self.recal_scope not in ("low", "all"):
            raise UsageError(f"bad --recal-scope '{self.recal_scope}': choose 'low' or 'all'")
        if self.rounding_scope not in ROUNDING_SCOPES:
            raise UsageError(f"bad rounding_scope '{self.rounding_scope}': choose one of {', '.join(ROUNDING_SCOPES)}")
        if self.stats not in STATS_CHOICES:
            raise UsageError(f"bad --stats '{self.stats}': choose one of {', '.join(STATS_CHOICES)}")
        if self.delta_fit not in DELTA_FITS:
            raise UsageError(f"bad --delta-fit '{self.delta_fit}': choose one of {', '.join(DELTA_FITS)}")
        if self.step_by not in STEP_BY:
            raise UsageError(f"bad --step-by '{self.step_by}': choose one of {', '.join(STEP_BY)}")

    def apply(self, ctx: Context) -> dict:
        if ctx.inputs is None:
            if self.rounding == "gptq":
                raise UsageError("--rounding gptq needs calibration inputs: use --recal synthetic (default) or real"
                                 + ("" if ctx.bn_status == "real" else
                                    f"; this model's BN layers carry no statistics ({ctx.bn_status}), so use "
                                    f"--rounding nearest"))
            return {"skipped": "no calibration inputs"}
        mods = dict(ctx.model.named_modules())
        scope = self._scope(ctx, mods, "absolute" if self.stats == "absolute" else "delta")
        todo: dict[str, Any] = {}
        if self.rounding == "gptq":
            todo = {q.fqn: q for q in ctx.layers.values()
                    if self._rounds(q) and supported(mods[q.fqn])
                    and q.in_scale is None and mods[q.fqn].weight[0].numel() <= self.max_k}
        restep: set[str] = set()
        if self.step_by == "output":
            restep = {q.fqn for q in ctx.layers.values() if q.fqn not in todo and q.grid == "int" and q.bits > 2
                      and q.in_scale is None and isinstance(mods[q.fqn], (nn.Conv2d, nn.Linear))
                      and self._trusted(ctx, q.fqn)}
        fp = dict(ctx.fp_model.named_modules())
        chosen: dict[str, float] = {}
        timing = {"hessian": 0.0, "rounding": 0.0}
        restepped = {"changed": 0}

        def restep_layer(name: str, m: nn.Conv2d | nn.Linear, x: torch.Tensor) -> None:
            q = ctx.layers[name]
            t = time.perf_counter()
            energy = column_energy(m, x)
            codes, scale = int_grid(fp[name].weight.to(x.device), q.bits, ctx.per_channel, energy)
            if not torch.equal(scale.cpu(), q.scale.float()):
                restepped["changed"] += 1
            q.codes = codes.to("cpu", q.codes.dtype)
            q.scale = scale.float().cpu()
            with torch.no_grad():
                m.weight.copy_(q.weight().to(m.weight.device, m.weight.dtype))
            timing["rounding"] += time.perf_counter() - t

        def round_layer(name: str, m: nn.Conv2d | nn.Linear, x: torch.Tensor) -> None:
            q = ctx.layers[name]
            t = time.perf_counter()
            h = input_second_moment(m, x, self.hessian_rows, shrink=self.shrink)
            timing["hessian"] += time.perf_counter() - t
            t = time.perf_counter()
            w = fp[name].weight.detach().flatten(1).to(x.device)
            mults = None if (self.grid_search and q.role == Role.LOW) else (1.0,)
            grid: dict[str, Any] = {} if mults is None else {"multipliers": mults}
            if isinstance(m, nn.Conv2d) and m.groups > 1:
                codes, scale, mult = grouped_codes(w, h, q.scale.to(x.device), q.bits, m.groups,
                                                   multipliers=mults or GRID_MULTIPLIERS, grid=q.grid)
            else:
                codes, scale, mult = best_grid_codes(w, h, q.scale.to(x.device), q.bits, seed=ctx.seed, grid=q.grid,
                                                     **grid)
            q.codes = codes.reshape(q.codes.shape).to("cpu", q.codes.dtype)
            q.scale = scale.float().cpu()
            with torch.no_grad():
                m.weight.copy_(q.weight().to(m.weight.device, m.weight.dtype))
            timing["rounding"] += time.perf_counter() - t
            if mults is None:
                chosen[name] = mult

        ctx.model.to(ctx.device)
        gm = ctx.graph.graph_module(ctx.model)
        inputs = ctx.inputs.to(ctx.device)
        mode = "delta" if self.stats == "auto" else self.stats
        with torch.no_grad():
            fp_gm = ctx.graph.graph_module(ctx.fp_model.to(ctx.device)) if mode == "delta" else None
            _Walk(gm, todo, scope, round_layer, ctx.task("statistics + rounding"), fp_gm, restep,
                  restep_layer, self.delta_fit).run(inputs)
        hist: dict[str, int] = {}
        for mult in chosen.values():
            hist[f"{mult:g}"] = hist.get(f"{mult:g}", 0) + 1
        info: dict[str, Any] = {"bn_reestimated": len(scope), "rounded_layers": len(todo),
                                "grouped_rounded": sum(getattr(mods[n], "groups", 1) > 1 for n in todo),
                                "grid_multipliers": hist, "output_steps": len(restep),
                                "output_steps_changed": restepped["changed"],
                                "hessian_seconds": round(timing["hessian"], 3),
                                "rounding_seconds": round(timing["rounding"], 3), "stats": mode}
        if self.stats == "auto" and scope and ctx.holdout is not None:
            info.update(self._choose_statistics(ctx, gm, inputs, scope, mods))
        return info

    @staticmethod
    def _trusted(ctx: Context, fqn: str) -> bool:
        """Whether the calibration inputs reproduce what layer ``fqn`` sees: real inputs always; synthetic ones where
        the BN after the layer is matched within :data:`TRUSTED_MISMATCH` (a layer with no BN after: never)."""
        mismatch = ctx.shared.get("bn_mismatch")
        if mismatch is None:
            return bool(ctx.shared.get("inputs_real"))
        bn = ctx.graph.bn_after.get(fqn)
        return bn is not None and bn in mismatch and mismatch[bn] <= TRUSTED_MISMATCH

    def _rounds(self, q: Any) -> bool:
        """Whether error feedback re-rounds layer ``q`` (see ``rounding_scope``)."""
        if self.rounding_scope == "all" or q.role == Role.LOW:
            return True
        return self.rounding_scope == "auto" and q.bits <= AUTO_ROUNDING_MAX_BITS

    def _scope(self, ctx: Context, mods: dict[str, nn.Module], mode: str) -> set[str]:
        """The BN layers whose statistics ``mode`` corrects: every BN with statistics for ``delta`` and for
        ``recal_scope='all'``, else those after the low-bit layers (the paper)."""
        if mode == "delta" or self.recal_scope == "all":
            return {n for n, m in mods.items() if isinstance(m, nn.BatchNorm2d) and m.running_mean is not None}
        bn_after = ctx.graph.bn_after
        return {bn_after[q.fqn] for q in ctx.layers.values() if q.role == Role.LOW and q.fqn in bn_after}

    def _choose_statistics(self, ctx: Context, gm: fx.GraphModule, inputs: torch.Tensor, scope: set[str],
                           mods: dict[str, nn.Module]) -> dict[str, Any]:
        """``auto``: the delta statistics (at every BN, ``scope``) are in place; measure them, then the absolute ones
        (at the ``recal_scope`` BN layers, the others back to the stored statistics) on the same codes, and keep the
        statistics with the lower held-out divergence."""
        bns = {n: cast(nn.BatchNorm2d, mods[n]) for n in scope}
        delta_stats = _statistics(bns)
        kl_delta = holdout_kl(ctx)
        fp = dict(ctx.fp_model.named_modules())  # back to the statistics the model came with, then absolute ones
        _load_statistics(bns, _statistics({n: cast(nn.BatchNorm2d, fp[n]) for n in scope}))
        absolute = self._scope(ctx, mods, "absolute")
        with torch.no_grad():
            _Walk(gm, {}, absolute, None, None).run(inputs)
        kl_abs = holdout_kl(ctx)
        assert kl_delta is not None and kl_abs is not None
        keep_delta = kl_delta <= kl_abs
        if keep_delta:
            _load_statistics(bns, delta_stats)
        return {"stats": "delta" if keep_delta else "absolute",
                "bn_reestimated": len(scope) if keep_delta else len(absolute),
                "stats_kl": {"delta": round(kl_delta, 6), "absolute": round(kl_abs, 6)}}
