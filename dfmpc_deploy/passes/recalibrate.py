"""Recalibrate pass: re-estimate BN statistics and re-choose the low-bit codes, in one forward pass.

The paper's "re-calibrate mu_hat and sigma_hat" (D3) and error-feedback rounding (rounding.py) both need, for each
layer, the input it sees in the model *as quantized so far*: earlier layers with their final codes, earlier BN
layers with their re-estimated statistics. Both only depend on what comes before a layer, so one walk over the
graph in execution order (a torch.fx Interpreter over the calibration inputs) serves every layer:

* at a layer to re-round: its input gives ``H = E[x x^T]`` (im2col patches); the codes are chosen by error feedback
  (with the grid-step search for low-bit layers) and the layer then runs with its new weight;
* at a BatchNorm in scope: its input's batch mean and (unbiased) variance become its running statistics, and it then
  normalises with them (eval mode), so everything after it sees the final statistics.

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
from ..errors import UsageError
from .base import Context, Pass, register_pass
from .rounding import best_grid_codes, input_second_moment, supported

__all__ = ["Recalibrate"]


class _Walk(fx.Interpreter):
    """Runs the graph once, re-rounding ``todo`` layers and re-estimating the ``scope`` BN statistics on the way."""

    def __init__(self, gm: fx.GraphModule, todo: dict[str, Any], scope: set[str], round_layer, progress):
        super().__init__(gm)
        self.todo, self.scope, self.round_layer, self.progress = todo, scope, round_layer, progress
        self.total = len(todo) + len(scope)
        self.done = 0

    def _tick(self) -> None:
        self.done += 1
        if self.progress is not None:
            self.progress(self.done, self.total)

    def call_module(self, target, args, kwargs):
        m = self.fetch_attr(target)
        if target in self.todo:
            self.round_layer(target, m, args[0])
            self._tick()
        if target in self.scope and isinstance(m, nn.BatchNorm2d):
            x = args[0]
            with torch.no_grad():
                cast(torch.Tensor, m.running_mean).copy_(x.mean(dim=(0, 2, 3)))
                cast(torch.Tensor, m.running_var).copy_(x.var(dim=(0, 2, 3), unbiased=True))
                if m.num_batches_tracked is not None:
                    m.num_batches_tracked.fill_(1)
            self._tick()
        return super().call_module(target, args, kwargs)


@register_pass
@dataclass(frozen=True)
class Recalibrate(Pass):
    """Re-estimate BN statistics in network order, re-choosing codes by error feedback on the way.

    Args:
        rounding: ``gptq`` (error feedback on the calibration inputs) or ``nearest`` (codes kept).
        recal_scope: which BN layers get re-estimated statistics: ``low`` (after low-bit layers) or ``all``.
        rounding_scope: which layers error feedback re-rounds: ``low`` or ``all``.
        grid_search: pick each low-bit layer's grid step among rounding.GRID_MULTIPLIERS x the TWN/DoReFa scale.
        max_k: layers with more input columns than this keep plain rounding (cost grows as K^2 x out).
        hessian_rows: patches per layer second moment (None: all patches of the calibration inputs).
    """

    name = "recalibrate"
    rounding: str = option("gptq", flag="--rounding", choices=("nearest", "gptq"),
                           help="code choice: 'nearest' (the paper) or 'gptq' error feedback on the calibration inputs")
    recal_scope: str = option("low", flag="--recal-scope", choices=("low", "all"),
                              help="re-estimate only the low-bit layers' BN statistics, or every BN")
    rounding_scope: str = "low"
    grid_search: bool = True
    max_k: int = 4608
    hessian_rows: int | None = None

    def __post_init__(self) -> None:
        if self.rounding not in ("nearest", "gptq"):
            raise UsageError(f"bad --rounding '{self.rounding}': choose 'nearest' or 'gptq'")
        if self.recal_scope not in ("low", "all"):
            raise UsageError(f"bad --recal-scope '{self.recal_scope}': choose 'low' or 'all'")
        if self.rounding_scope not in ("low", "all"):
            raise UsageError(f"bad rounding_scope '{self.rounding_scope}': choose 'low' or 'all'")

    def apply(self, ctx: Context) -> dict:
        if ctx.inputs is None:
            if self.rounding == "gptq":
                raise UsageError("--rounding gptq needs calibration inputs: use --recal synthetic (default) or real"
                                 + ("" if ctx.bn_status == "real" else
                                    f"; this model's BN layers carry no statistics ({ctx.bn_status}), so use "
                                    f"--rounding nearest"))
            return {"skipped": "no calibration inputs"}
        mods = dict(ctx.model.named_modules())
        bn_after = ctx.graph.bn_after
        if self.recal_scope == "all":
            scope = {n for n, m in mods.items() if isinstance(m, nn.BatchNorm2d) and m.running_mean is not None}
        else:
            scope = {bn_after[q.fqn] for q in ctx.layers.values() if q.role == Role.LOW and q.fqn in bn_after}
        todo: dict[str, Any] = {}
        if self.rounding == "gptq":
            todo = {q.fqn: q for q in ctx.layers.values()
                    if (self.rounding_scope == "all" or q.role == Role.LOW) and supported(mods[q.fqn])
                    and q.in_scale is None and mods[q.fqn].weight[0].numel() <= self.max_k}
        fp = dict(ctx.fp_model.named_modules())
        chosen: dict[str, float] = {}
        timing = {"hessian": 0.0, "rounding": 0.0}

        def round_layer(name: str, m: nn.Conv2d | nn.Linear, x: torch.Tensor) -> None:
            q = ctx.layers[name]
            t = time.perf_counter()
            h = input_second_moment(m, x, self.hessian_rows)
            timing["hessian"] += time.perf_counter() - t
            t = time.perf_counter()
            w = fp[name].weight.detach().flatten(1).to(x.device)
            mults = None if (self.grid_search and q.role == Role.LOW) else (1.0,)
            grid: dict[str, Any] = {} if mults is None else {"multipliers": mults}
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
        with torch.no_grad():
            _Walk(gm, todo, scope, round_layer, ctx.task("statistics + rounding")).run(ctx.inputs.to(ctx.device))
        hist: dict[str, int] = {}
        for mult in chosen.values():
            hist[f"{mult:g}"] = hist.get(f"{mult:g}", 0) + 1
        return {"bn_reestimated": len(scope), "rounded_layers": len(todo), "grid_multipliers": hist,
                "hessian_seconds": round(timing["hessian"], 3), "rounding_seconds": round(timing["rounding"], 3)}
