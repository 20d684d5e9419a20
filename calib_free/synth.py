"""Synthesise inputs whose BatchNorm-input statistics match the ones the FP model stored (ZeroQ-style).

A pretrained model's BN layers remember the per-channel mean and variance of their inputs over the training
data. Optimising a batch of inputs so that every BN layer sees those statistics gives samples that exercise the
network the way real data does, without any real image. They are used to re-estimate the statistics of the
quantized model (calib_free.recal), which is what DF-MPC's "re-calibrate mu_hat and sigma_hat" needs.

Budget (:func:`synth_budget`): the work is ``samples x steps`` forward+backward passes. Small inputs (CIFAR's 32 px)
keep 32 samples x 100 steps at their own size, which the accuracy tables were measured with. Large inputs (ImageNet's
224 px, 49x the pixels of 32 px) take 8 samples x 40 steps, **coarse to fine**: the first 70 % of the steps at half the
resolution (a quarter of the pixels), then the inputs are upsampled (bilinear) and the rest run at full size, with a
fresh Adam state and the cosine schedule continued. Each forward stops after the last BatchNorm (nothing after it
enters the loss), which also lets a model with a fixed-size head run at the coarse size. On ResNet-18/50 with
image-like BN statistics (random weights, the only 224 px models with statistics here) coarse to fine ended at a
lower full-resolution BN-matching loss than 40 full-size steps in about half the time (ResNet-18 0.72 against 1.26,
ResNet-50 3.6 against 74; docs/MATH.md, section 6.3). Synthesis stops early when the BN-matching loss has not
improved by ``min_delta`` (relative) for ``patience`` steps (counted after the first quarter of the steps, while
Adam's first moves settle; at full size only), and returns the full-size inputs with the lowest loss seen.
"""
from __future__ import annotations

import copy
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import cast

import torch
import torch.nn.functional as F
from torch import nn

log = logging.getLogger("calib_free")

__all__ = ["SynthResult", "SynthBudget", "synth_budget", "synthesize_inputs", "bn_matching_hooks",
           "bn_matching_loss", "bn_matching_losses", "bn_mismatch"]


@dataclass(frozen=True)
class SynthBudget:
    """How much synthesis a model gets: ``samples`` inputs optimised for at most ``steps`` Adam steps, the first
    ``coarse`` fraction of them at half the resolution."""

    samples: int
    steps: int
    coarse: float = 0.0


def synth_budget(input_shape: tuple[int, int, int]) -> SynthBudget:
    """The default budget for inputs of ``input_shape`` (C, H, W): see the module docstring."""
    pixels = input_shape[1] * input_shape[2]
    return SynthBudget(32, 100) if pixels <= 64 * 64 else SynthBudget(8, 40, coarse=0.7)


class _LastBN(Exception):
    """Raised by a forward hook once every BatchNorm call of a forward pass has been seen."""


@dataclass
class SynthResult:
    """The synthetic batch and how it was made.

    Attributes:
        inputs: (n, C, H, W) float32 on the device it was made on.
        steps: steps run (fewer than asked when stopped early).
        steps_max: steps asked for.
        seconds: wall time.
        final_loss, initial_loss: BN-matching loss of the returned inputs (the best seen) and of the start of the
            full-size phase (after the coarse phase, if any).
        stopped_early: the loss stopped improving before ``steps_max``.
        coarse_steps: steps run at half the resolution first (0: none).
    """

    inputs: torch.Tensor
    steps: int
    seconds: float
    final_loss: float
    initial_loss: float
    steps_max: int = 0
    stopped_early: bool = False
    coarse_steps: int = 0


def bn_mismatch(x: torch.Tensor, bn: nn.BatchNorm2d) -> torch.Tensor:
    """Scale-free mismatch between the batch statistics of ``x`` (a BN layer's input) and what ``bn`` stored: per
    channel ``((mu - mean) / sd)^2 + (sqrt(var + eps) / sd - 1)^2``, averaged, with ``sd = sqrt(running_var + eps)``,
    so every layer counts alike whatever its activation scale.

    The batch moments are taken as sums (``E[x^2] - E[x]^2``): one pass each, about 20 % faster per synthesis step
    than ``Tensor.var`` on a CPU; in float32 the cancellation error is far below the mismatch being minimised.
    """
    count = x.numel() // x.shape[1]
    mu = x.sum(dim=(0, 2, 3)) / count
    var = ((x * x).sum(dim=(0, 2, 3)) / count - mu * mu).clamp_min(0)
    mean, var_ref = cast(torch.Tensor, bn.running_mean), cast(torch.Tensor, bn.running_var)
    sd_ref = torch.sqrt(var_ref + bn.eps)
    return ((((mu - mean) / sd_ref) ** 2).mean()
            + ((torch.sqrt(var + bn.eps) / sd_ref - 1) ** 2).mean())


def _stat_bns(model: nn.Module) -> list[tuple[str, nn.BatchNorm2d]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, nn.BatchNorm2d) and m.running_mean is not None]


def bn_matching_hooks(model: nn.Module, store: list) -> list:
    """Forward hooks appending each BN layer's :func:`bn_mismatch` to ``store`` (removed by the caller)."""
    return [m.register_forward_hook(lambda mod, inp, out: store.append(bn_mismatch(inp[0], mod)))
            for _, m in _stat_bns(model)]


@torch.no_grad()
def bn_matching_losses(model: nn.Module, x: torch.Tensor) -> dict[str, float]:
    """Per BN layer (by module name, in call order), the :func:`bn_mismatch` of ``model`` on ``x``: how well
    synthetic inputs reproduce each layer's stored statistics (0 = exactly)."""
    out: dict[str, float] = {}

    def record(name: str, mod: nn.BatchNorm2d, x: torch.Tensor) -> None:  # a hook's return value replaces the output
        out.setdefault(name, float(bn_mismatch(x, mod)))

    hooks = [m.register_forward_hook(lambda mod, inp, o, name=n: record(name, mod, inp[0]))
             for n, m in _stat_bns(model)]
    try:
        model(x)
    finally:
        for h in hooks:
            h.remove()
    return out


@torch.no_grad()
def bn_matching_loss(model: nn.Module, x: torch.Tensor) -> float:
    """The scale-free BN-matching loss (:func:`bn_mismatch`, summed over layers) of ``model`` on ``x``."""
    store: list = []
    hooks = bn_matching_hooks(model, store)
    try:
        model(x)
    finally:
        for h in hooks:
            h.remove()
    return float(torch.stack(store).sum())


def synthesize_inputs(model: nn.Module, shape: tuple[int, int, int], n: int = 64, steps: int = 200,
                      lr: float = 0.1, seed: int = 0, progress: Callable[..., None] | None = None,
                      patience: int = 10, min_delta: float = 0.01,
                      device: torch.device | str | None = None, coarse: float = 0.0) -> SynthResult:
    """Optimise ``n`` inputs of ``shape`` (C, H, W) so that the model's BN layers see their stored statistics.

    Args:
        model: the full-precision model (not modified: a private copy runs in eval mode, on ``device``).
        shape: input shape without the batch dimension.
        n: number of samples.
        steps: at most this many Adam steps (cosine-annealed learning rate over ``steps``).
        lr: Adam learning rate on the (normalised) input pixels.
        seed: RNG seed for the starting noise (drawn on the CPU, so every device starts from the same noise).
        progress: optional callable(step, steps, loss).
        patience, min_delta: stop when, after the first ``steps // 4`` steps, ``patience`` consecutive steps have not
            brought the loss below ``(1 - min_delta) x`` its value at the last such improvement (0 disables early
            stopping).
        device: where to compute (default: the model's parameters' device).
        coarse: fraction of the steps run at half the resolution before the full-size ones (0: none; a model that
            cannot run at half size gets none).

    Returns:
        SynthResult with ``inputs`` of shape (n, *shape) on ``device``.

    Raises:
        ValueError: the model has no BatchNorm2d layer with running statistics (nothing to match).
    """
    t0 = time.perf_counter()
    if device is None:
        device = next((p.device for p in model.parameters()), torch.device("cpu"))
    g = torch.Generator().manual_seed(seed)
    # channels-last: oneDNN's faster convolution layout on CPUs, and contiguous per-channel reductions; on a private
    # copy, so the caller's model keeps its layout (values and outputs are the same)
    model = copy.deepcopy(model).to(device).to(memory_format=torch.channels_last)  # type: ignore[call-overload]
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    c, h, w = shape
    coarse_steps = int(round(coarse * steps)) if coarse > 0 and min(h, w) >= 16 else 0
    small = (c, h // 2, w // 2)
    x = torch.randn((n, *(small if coarse_steps else shape)), generator=g).to(device)
    store: list = []
    hooks = bn_matching_hooks(model, store)
    if not hooks:
        raise ValueError("the model has no BatchNorm2d layer with running statistics: nothing to synthesise from")
    with torch.no_grad():  # how many BN calls one forward makes (the matching hooks record one entry each)
        model(torch.zeros((1, *shape), device=device).contiguous(memory_format=torch.channels_last))
    calls = len(store)

    def stop_after_last_bn(mod, inp, out):
        if len(store) >= calls:
            raise _LastBN

    hooks += [m.register_forward_hook(stop_after_last_bn) for m in model.modules()
              if isinstance(m, nn.BatchNorm2d) and m.running_mean is not None]

    def bn_loss(inputs: torch.Tensor) -> torch.Tensor:
        store.clear()
        try:
            model(inputs)
        except _LastBN:
            pass
        return torch.stack(store).sum()

    first = best = ref = float("nan")
    since_best, step, stopped = 0, 0, False
    try:
        if coarse_steps:
            try:
                x = _coarse_phase(x, bn_loss, coarse_steps, steps, lr, progress)
            except RuntimeError as err:  # e.g. a layer that needs the full size: all steps at full size instead
                log.info("synthesis: no coarse phase at %dx%d px (%s)", small[1], small[2], str(err).splitlines()[0])
                coarse_steps = 0
                x = torch.randn((n, *shape), generator=torch.Generator().manual_seed(seed)).to(device)
            else:
                x = F.interpolate(x, size=(h, w), mode="bilinear", align_corners=False)
        x = x.detach().contiguous(memory_format=torch.channels_last).requires_grad_(True)
        best_x = x.detach().clone()
        opt = torch.optim.Adam([x], lr=lr)
        sched = (torch.optim.lr_scheduler.CosineAnnealingLR(opt, max(1, steps)) if not coarse_steps
                 else _cosine(opt, steps, coarse_steps))
        for step in range(coarse_steps, steps + 1):
            opt.zero_grad(set_to_none=True)
            loss = bn_loss(x)
            last = float(loss.detach())
            if step == coarse_steps:
                first = best = ref = last
            else:
                if last < best:
                    best, best_x = last, x.detach().clone()
                if last < ref * (1 - min_delta):  # a real improvement on the loss of the last one
                    ref, since_best = last, 0
                else:
                    since_best += 1
            if step == steps:
                break
            if patience and step >= max(steps // 4, coarse_steps) and since_best >= patience:
                stopped = True
                break
            loss.backward()
            opt.step()
            sched.step()
            if progress:
                progress(step + 1, steps, best)
    finally:
        for hk in hooks:
            hk.remove()
    return SynthResult(best_x.contiguous(), step, time.perf_counter() - t0, best, first, steps, stopped, coarse_steps)


def _cosine(opt: torch.optim.Optimizer, steps: int, start: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Cosine annealing of the learning rate over ``steps`` in all, starting at step ``start`` (after a coarse
    phase)."""
    return torch.optim.lr_scheduler.LambdaLR(
        opt, lambda k: 0.5 * (1 + math.cos(math.pi * min(start + k, steps) / max(1, steps))))


def _coarse_phase(x: torch.Tensor, bn_loss: Callable[[torch.Tensor], torch.Tensor], coarse_steps: int, steps: int,
                  lr: float, progress: Callable[..., None] | None) -> torch.Tensor:
    """The first ``coarse_steps`` of the cosine schedule on the half-size inputs ``x``; returns them optimised."""
    x = x.contiguous(memory_format=torch.channels_last).requires_grad_(True)
    opt = torch.optim.Adam([x], lr=lr)
    sched = _cosine(opt, steps, 0)
    for step in range(coarse_steps):
        opt.zero_grad(set_to_none=True)
        loss = bn_loss(x)
        loss.backward()
        opt.step()
        sched.step()
        if progress:
            progress(step + 1, steps, float(loss.detach()))
    return x.detach()
