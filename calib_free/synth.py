"""Synthesise inputs whose BatchNorm-input statistics match the ones the FP model stored (ZeroQ-style).

A pretrained model's BN layers remember the per-channel mean and variance of their inputs over the training
data. Optimising a batch of inputs so that every BN layer sees those statistics gives samples that exercise the
network the way real data does, without any real image. They are used to re-estimate the statistics of the
quantized model (calib_free.recal), which is what DF-MPC's "re-calibrate mu_hat and sigma_hat" needs.

Budget (:func:`synth_budget`): the work is ``samples x steps`` forward+backward passes at the model's own input size.
Small inputs (CIFAR's 32 px) keep 32 samples x 100 steps, which the accuracy tables were measured with; large inputs
(ImageNet's 224 px, 49x the pixels of 32 px) take 8 samples x 40 steps: a tenth of what 32 x 100 would cost at that
size (still about 5x the pixel-steps of the CIFAR budget), since each sample there already covers thousands of
positions per channel. Synthesis stops early when the BN-matching loss has not improved by ``min_delta`` (relative) for
``patience`` steps (counted after the first quarter of the steps, while Adam's first moves settle), and returns the
inputs with the lowest loss seen.
"""
from __future__ import annotations

import copy
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

__all__ = ["SynthResult", "SynthBudget", "synth_budget", "synthesize_inputs", "bn_matching_hooks"]


@dataclass(frozen=True)
class SynthBudget:
    """How much synthesis a model gets: ``samples`` inputs optimised for at most ``steps`` Adam steps."""

    samples: int
    steps: int


def synth_budget(input_shape: tuple[int, int, int]) -> SynthBudget:
    """The default budget for inputs of ``input_shape`` (C, H, W): see the module docstring."""
    pixels = input_shape[1] * input_shape[2]
    return SynthBudget(32, 100) if pixels <= 64 * 64 else SynthBudget(8, 40)


@dataclass
class SynthResult:
    """The synthetic batch and how it was made.

    Attributes:
        inputs: (n, C, H, W) float32 on the device it was made on.
        steps: steps run (fewer than asked when stopped early).
        steps_max: steps asked for.
        seconds: wall time.
        final_loss, initial_loss: BN-matching loss of the returned inputs (the best seen) and of the start.
        stopped_early: the loss stopped improving before ``steps_max``.
    """

    inputs: torch.Tensor
    steps: int
    seconds: float
    final_loss: float
    initial_loss: float
    steps_max: int = 0
    stopped_early: bool = False


def bn_matching_hooks(model: nn.Module, store: list) -> list:
    """Forward hooks appending each BN layer's scale-free statistics mismatch to ``store`` (removed by the caller).

    The batch moments are taken as sums (``E[x^2] - E[x]^2``): one pass each, about 20 % faster per synthesis step
    than ``Tensor.var`` on a CPU; in float32 the cancellation error is far below the mismatch being minimised.
    """
    hooks = []
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d) and m.running_mean is not None:
            def hook(mod, inp, out, mod_ref=m):
                x = inp[0]
                count = x.numel() // x.shape[1]
                mu = x.sum(dim=(0, 2, 3)) / count
                var = ((x * x).sum(dim=(0, 2, 3)) / count - mu * mu).clamp_min(0)
                sd_ref = torch.sqrt(mod_ref.running_var + mod_ref.eps)
                # Scale-free per-channel mismatch: every layer counts alike whatever its activation scale.
                store.append((((mu - mod_ref.running_mean) / sd_ref) ** 2).mean()
                             + ((torch.sqrt(var + mod_ref.eps) / sd_ref - 1) ** 2).mean())
            hooks.append(m.register_forward_hook(hook))
    return hooks


def synthesize_inputs(model: nn.Module, shape: tuple[int, int, int], n: int = 64, steps: int = 200,
                      lr: float = 0.1, seed: int = 0, progress: Callable[..., None] | None = None,
                      patience: int = 10, min_delta: float = 0.01,
                      device: torch.device | str | None = None) -> SynthResult:
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
    x = torch.randn((n, *shape), generator=g).to(device).contiguous(memory_format=torch.channels_last)
    x.requires_grad_(True)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    store: list = []
    hooks = bn_matching_hooks(model, store)
    if not hooks:
        for h in hooks:
            h.remove()
        raise ValueError("the model has no BatchNorm2d layer with running statistics: nothing to synthesise from")
    opt = torch.optim.Adam([x], lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, max(1, steps))
    first = best = ref = float("nan")
    best_x = x.detach().clone()
    since_best, step, stopped = 0, 0, False
    try:
        for step in range(steps + 1):
            store.clear()
            opt.zero_grad(set_to_none=True)
            model(x)
            loss = torch.stack(store).sum()
            last = float(loss.detach())
            if step == 0:
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
            if patience and step >= steps // 4 and since_best >= patience:
                stopped = True
                break
            loss.backward()
            opt.step()
            sched.step()
            if progress:
                progress(step + 1, steps, best)
    finally:
        for h in hooks:
            h.remove()
    return SynthResult(best_x.contiguous(), step, time.perf_counter() - t0, best, first, steps, stopped)
