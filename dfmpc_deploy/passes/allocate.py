"""Allocate pass: each layer's width chosen by data-free sensitivity under a size budget (after Lee et al. 2023).

Data-free, no training:

1. **Sensitivity.** On the synthetic inputs (calib_free, the same ones DF-MPC re-estimates statistics with) every
   quantizable layer ``l`` is quantized alone to each candidate width ``b`` while *all other layers sit at the
   high width* (the context the layer will live in, so the score sees its interaction with the others' noise rather
   than an FP network), the BN right after it is re-estimated when ``b`` is below the high width (what the
   pipeline will do to it), and the score is the mean ``KL(p_fp || p_q)`` of the class posteriors:
   ``S[l][b]``. Quantizers are the plain ones (TWN / the build's k-bit grid, nearest rounding); the build then applies
   error feedback on top, so the scores rank layers rather than predict the final accuracy.
2. **Choice.** Minimise ``sum_l S[l][b_l]`` (the additive proxy of the accuracy loss, as in ZeroQ's and HAWQ's
   Pareto selections) subject to the code bytes fitting the budget: an exact multiple-choice knapsack by dynamic
   programming over the budget in ``resolution`` units, each layer's cost rounded *up*, so the result never
   exceeds the budget.

Paper 002's exact metric is not in the text we have (../shared/papers holds its abstract only); the context-at-high
-bits measurement is our reading of "interaction with other layers". Candidates are every width from the low to
the high bits of ``--bits`` (2 = ternary, 1.6 bits/weight packed).
"""
from __future__ import annotations

import copy
import logging
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import cast

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..core.graph import Role
from ..core.options import option, positive_float
from ..core.quantizers import DEFAULT_GRID, dequantize, quantize_weight
from ..core.state import MixedPrecisionModel
from ..errors import DfmpcError, UsageError
from ..io.container import code_nbytes, packed_nbytes
from .base import Context, Pass, register_pass
from .quantize import requantize_, set_weights_

__all__ = ["Allocate", "Allocation", "layer_sensitivity", "choose_bits", "fit_budget", "megabytes"]

log = logging.getLogger("dfmpc_deploy")


@dataclass
class Allocation:
    """A chosen bit width per layer and what it was chosen from.

    Attributes:
        bits: ``{fqn: bits}``.
        code_bytes: bytes of the integer-code payloads (dense layouts) under ``bits``.
        budget_bytes: the budget the codes (``avg_bits``) or the whole packed file (``size_budget``) had to fit.
        predicted_loss: ``sum_l S[l][bits[l]]`` (mean KL on the synthetic inputs, additive proxy).
        sensitivity: ``{fqn: {bits: score}}``.
    """

    bits: dict[str, int]
    code_bytes: int
    budget_bytes: int
    predicted_loss: float
    sensitivity: dict[str, dict[int, float]] = field(default_factory=dict)

    def summary(self, numel: dict[str, int]) -> dict:
        """JSON-ready summary (histogram of widths, average code bits per weight)."""
        hist: dict[str, int] = {}
        for b in self.bits.values():
            hist[str(b)] = hist.get(str(b), 0) + 1
        n = sum(numel.values())
        return {"bits_histogram": dict(sorted(hist.items())), "code_bytes": self.code_bytes,
                "budget_bytes": self.budget_bytes, "avg_code_bits": round(8 * self.code_bytes / max(1, n), 4),
                "predicted_kl": round(self.predicted_loss, 6)}


@torch.no_grad()
def layer_sensitivity(model: nn.Module, names: Iterable[str], inputs: torch.Tensor, candidates: Iterable[int],
                      context_bits: int, bn_after: dict[str, str] | None = None, per_channel: bool = False,
                      grid: str = DEFAULT_GRID, progress: Callable[[int, int], None] | None = None
                      ) -> dict[str, dict[int, float]]:
    """``S[l][b]``: mean KL(p_fp || p_q) on ``inputs`` with layer ``l`` at ``b`` bits, every other at ``context_bits``.

    Args:
        model: the FP model (not modified).
        names: fqns of the Conv2d/Linear layers to score.
        inputs: synthetic (or any) inputs, one batch.
        candidates: bit widths to score (2 = ternary).
        context_bits: width of all the other layers while one is scored.
        bn_after: ``{layer: bn}``; that BN is re-estimated on ``inputs`` when ``b < context_bits``.
        per_channel: per-output-channel quantizer ranges.
        grid: the k-bit grid (core.quantizers.GRIDS).
        progress: optional callable(done, total).

    Returns:
        ``{fqn: {bits: score}}``, scores >= 0.
    """
    names, cands = list(names), sorted(set(int(b) for b in candidates))
    bn_after = bn_after or {}
    q = copy.deepcopy(model).eval().to(inputs.device)
    ref = F.log_softmax(q(inputs).double(), dim=1)
    mods, fp = dict(q.named_modules()), dict(model.named_modules())

    def quant(name: str, bits: int) -> torch.Tensor:
        w = fp[name].weight
        return dequantize(*quantize_weight(w, bits, per_channel, grid)).to(inputs.device, w.dtype)

    context = {n: quant(n, context_bits) for n in names}
    for n in names:
        mods[n].weight.copy_(context[n])
    scores: dict[str, dict[int, float]] = {}
    for i, n in enumerate(names):
        found = mods.get(bn_after.get(n, ""))
        bn = found if isinstance(found, nn.BatchNorm2d) else None
        saved = ((cast(torch.Tensor, bn.running_mean).clone(), cast(torch.Tensor, bn.running_var).clone())
                 if bn is not None else None)
        scores[n] = {}
        for b in cands:
            mods[n].weight.copy_(quant(n, b) if b != context_bits else context[n])
            # Below the high width the pipeline re-estimates this BN on the inputs; normalising this one batch by
            # its own statistics (train mode) is that, up to the n/(n-1) of the unbiased running variance.
            if bn is not None and b < context_bits:
                bn.train()
            try:
                out = F.log_softmax(q(inputs).double(), dim=1)
            finally:
                if bn is not None and saved is not None:
                    bn.eval()
                    cast(torch.Tensor, bn.running_mean).copy_(saved[0])
                    cast(torch.Tensor, bn.running_var).copy_(saved[1])
            scores[n][b] = max(0.0, float(F.kl_div(out, ref, log_target=True, reduction="batchmean")))
        mods[n].weight.copy_(context[n])
        if progress is not None:
            progress(i + 1, len(names))
    return scores


def choose_bits(scores: dict[str, dict[int, float]], sizes: dict[str, dict[int, int]], budget: int,
                resolution: int = 16384) -> tuple[dict[str, int], float]:
    """Exact multiple-choice knapsack: minimise ``sum S[l][b_l]`` with ``sum sizes[l][b_l] <= budget``.

    The DP runs over the bytes *above* every layer's smallest option, in units of ``ceil(slack / resolution)``
    bytes with each layer's extra rounded up: the all-smallest choice stays exactly feasible, any choice fits
    ``budget``, and at most one unit per layer is left unused.

    Returns:
        (``{fqn: bits}``, predicted loss).

    Raises:
        DfmpcError: when even the smallest width of every layer does not fit, naming the smallest feasible budget.
    """
    names = list(scores)
    floor = {n: min(sizes[n][b] for b in scores[n]) for n in names}
    slack = budget - sum(floor.values())
    if slack < 0:
        raise DfmpcError(f"the size budget leaves {budget} bytes for the weight codes, but even the lowest width of "
                         f"every layer needs {sum(floor.values())}; raise the budget or lower --bits' LOW")
    unit = max(1, math.ceil(slack / resolution))
    cap = slack // unit
    opts = {n: sorted(scores[n]) for n in names}
    cost = {n: [math.ceil((sizes[n][b] - floor[n]) / unit) for b in opts[n]] for n in names}
    best = np.zeros(cap + 1)  # best[c] = least loss of the layers so far within c units of extra bytes
    choice = np.zeros((len(names), cap + 1), dtype=np.int16)
    for i, n in enumerate(names):
        new = np.full(cap + 1, np.inf)
        pick = np.zeros(cap + 1, dtype=np.int16)
        for j, b in enumerate(opts[n]):
            k = cost[n][j]
            if k > cap:
                continue
            cand = np.full(cap + 1, np.inf)
            cand[k:] = best[:cap + 1 - k] + scores[n][b]
            better = cand < new
            new[better], pick[better] = cand[better], j
        best, choice[i] = new, pick
    out, c = {}, cap
    for i in range(len(names) - 1, -1, -1):
        n = names[i]
        j = int(choice[i, c])
        out[n] = opts[n][j]
        c -= cost[n][j]
    return {n: out[n] for n in names}, float(best[cap])


def fit_budget(scores: dict[str, dict[int, float]], sizes: dict[str, dict[int, int]], budget: int,
               measure: Callable[[dict[str, int]], int] | None = None, overhead: int = 0,
               max_rounds: int = 4) -> Allocation:
    """Choose widths so that ``measure(bits)`` (the real packed size) is at most ``budget``.

    Args:
        scores, sizes: as for :func:`choose_bits` (``sizes`` are code bytes per layer and width).
        budget: bytes the whole file (``measure``) - or, without ``measure``, the codes alone - must fit.
        measure: ``bits -> bytes`` of the real artifact; None means the codes are the budget.
        overhead: first guess of the bytes outside the codes (scales, floats, header).
        max_rounds: corrections of ``overhead`` by the measured excess before giving up.

    Raises:
        DfmpcError: when the budget cannot be met.
    """
    code_budget = budget - overhead
    for _ in range(max_rounds):
        bits, loss = choose_bits(scores, sizes, code_budget)
        if measure is None:
            break
        real = measure(bits)
        if real <= budget:
            break
        code_budget -= real - budget  # the non-code part came out larger than guessed; take it off the codes
    else:
        raise DfmpcError(f"could not fit the packed file into {budget} bytes after {max_rounds} corrections")
    code = sum(sizes[n][b] for n, b in bits.items())
    return Allocation(bits, code, budget, loss, scores)


def megabytes(text: str) -> int:
    """``--size-budget-mb`` value (MB = 10^6 bytes, a positive finite number) in bytes."""
    return max(1, round(positive_float(text) * 1e6))


@register_pass
@dataclass(frozen=True)
class Allocate(Pass):
    """Choose every layer's width in LOW..HIGH of the quantize pass's bits so that the file fits a budget.

    Without a budget the fixed low/high pairing stays (the pass does nothing), unless ``default_budget`` is
    ``fixed-pairing`` (the ``dfmpc-alloc`` recipe): then the budget is the fixed pairing's own packed size.

    Args:
        size_budget_bytes: the packed file (analytic size, io.sizes) must fit this many bytes.
        avg_bits: or: the integer codes must average at most this many bits per weight (ternary counts 1.6).
        default_budget: ``none`` or ``fixed-pairing`` (see above).
    """

    name = "allocate"
    size_budget_bytes: int | None = option(None, flag="--size-budget-mb", parse=megabytes, metavar="MB",
                                           help="choose each layer's width in LOW..HIGH of --bits by data-free "
                                                "sensitivity so that model.dfmpc fits MB megabytes (10^6 bytes), "
                                                "e.g. 0.54")
    avg_bits: float | None = option(None, flag="--avg-bits", parse=positive_float,
                                    help="the same, as an average of bits per weight of the integer codes "
                                         "(ternary = 1.6), e.g. 3.5")
    default_budget: str = "none"

    def __post_init__(self) -> None:
        if self.size_budget_bytes is not None and self.avg_bits is not None:
            raise UsageError("give either --size-budget-mb or --avg-bits, not both")
        if self.size_budget_bytes is not None and not (isinstance(self.size_budget_bytes, int)
                                                       and self.size_budget_bytes > 0):
            raise UsageError(f"bad --size-budget-mb: {self.size_budget_bytes!r} bytes; give a positive size, e.g. 0.2")
        if self.avg_bits is not None and not (isinstance(self.avg_bits, (int, float)) and math.isfinite(self.avg_bits)
                                              and 1.6 <= self.avg_bits <= 8):
            raise UsageError(f"bad --avg-bits {self.avg_bits}: need 1.6 (all ternary) to 8, e.g. --avg-bits 3.5")
        if self.default_budget not in ("none", "fixed-pairing"):
            raise UsageError(f"allocate: default_budget {self.default_budget!r} must be 'none' or 'fixed-pairing'")

    def apply(self, ctx: Context) -> dict:
        def probe() -> MixedPrecisionModel:
            return MixedPrecisionModel(ctx.model, ctx.layers, ctx.arch, None, ctx.estimator)

        budget = self.size_budget_bytes
        if budget is None and self.avg_bits is None:
            if self.default_budget == "none":
                return {"skipped": "no budget: the fixed low/high pairing"}
            budget = packed_nbytes(probe())  # the quantize pass's fixed pairing, as packed
        if ctx.inputs is None:
            raise UsageError("bit allocation scores the layers on calibration inputs: use --recal synthetic "
                             "(default, data-free) or real")
        names = list(ctx.layers)
        cands = list(range(ctx.bits.low, ctx.bits.high + 1))
        first = {n: Role(q.role) for n, q in ctx.layers.items()}
        progress = ctx.task("score layers")
        scores = layer_sensitivity(ctx.fp_model, names, ctx.inputs, cands, ctx.bits.high, ctx.graph.bn_after,
                                   ctx.per_channel, ctx.grid, progress)
        sizes = {n: {b: code_nbytes(b, ctx.layers[n].numel) for b in cands} for n in names}

        def apply_bits(bits: dict[str, int]) -> None:
            for n, b in bits.items():
                if ctx.layers[n].bits == b:
                    continue
                role = Role.LOW if b < ctx.bits.high else (Role.HIGH if first[n] == Role.LOW else first[n])
                requantize_(ctx, n, b, role)
            set_weights_(ctx.model, ctx.layers)

        if self.avg_bits is not None:
            numel = sum(q.numel for q in ctx.layers.values())
            alloc = fit_budget(scores, sizes, int(self.avg_bits * numel / 8))
        else:
            fixed = sum(code_nbytes(q.bits, q.numel) for q in ctx.layers.values())
            overhead = packed_nbytes(probe()) - fixed

            def measure(bits: dict[str, int]) -> int:
                apply_bits(bits)
                return packed_nbytes(probe())
            alloc = fit_budget(scores, sizes, int(budget), measure, overhead)  # type: ignore[arg-type]
        apply_bits(alloc.bits)
        summary = alloc.summary({n: q.numel for n, q in ctx.layers.items()})
        log.info("allocation: %s", summary)
        return summary
