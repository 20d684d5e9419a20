"""Synthesise inputs whose BatchNorm-input statistics match the ones the FP model stored (ZeroQ-style).

A pretrained model's BN layers remember the per-channel mean and variance of their inputs over the training
data. Optimising a batch of inputs so that every BN layer sees those statistics gives samples that exercise the
network the way real data does, without any real image. They are used to re-estimate the statistics of the
quantized model (calib_free.recal), which is what DF-MPC's "re-calibrate mu_hat and sigma_hat" needs.
"""
from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

__all__ = ["SynthResult", "synthesize_inputs"]


@dataclass
class SynthResult:
    """The synthetic batch and how it was made."""

    inputs: torch.Tensor
    steps: int
    seconds: float
    final_loss: float
    initial_loss: float


def _bn_hooks(model: nn.Module, store: list):
    hooks = []
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d) and m.running_mean is not None:
            def hook(mod, inp, out, mod_ref=m):
                x = inp[0]
                mu = x.mean(dim=(0, 2, 3))
                var = x.var(dim=(0, 2, 3), unbiased=False)
                sd_ref = torch.sqrt(mod_ref.running_var + mod_ref.eps)
                # Scale-free per-channel mismatch: every layer counts alike whatever its activation scale.
                store.append((((mu - mod_ref.running_mean) / sd_ref) ** 2).mean()
                             + ((torch.sqrt(var + mod_ref.eps) / sd_ref - 1) ** 2).mean())
            hooks.append(m.register_forward_hook(hook))
    return hooks


def synthesize_inputs(model: nn.Module, shape: tuple[int, int, int], n: int = 64, steps: int = 200,
                      lr: float = 0.1, seed: int = 0,
                      progress: Callable[[int, int, float], None] | None = None) -> SynthResult:
    """Optimise ``n`` inputs of ``shape`` (C, H, W) so that the model's BN layers see their stored statistics.

    Args:
        model: the full-precision model (not modified; used in eval mode).
        shape: input shape without the batch dimension.
        n: number of samples.
        steps: Adam steps.
        lr: Adam learning rate on the (normalised) input pixels.
        seed: RNG seed for the starting noise.
        progress: optional callable(step, steps, loss).

    Returns:
        SynthResult with ``inputs`` of shape (n, *shape).
    """
    t0 = time.perf_counter()
    g = torch.Generator().manual_seed(seed)
    x = torch.randn((n, *shape), generator=g).requires_grad_(True)
    was_training = model.training
    model.eval()
    params = [p.requires_grad for p in model.parameters()]
    for p in model.parameters():
        p.requires_grad_(False)
    store: list = []
    hooks = _bn_hooks(model, store)
    opt = torch.optim.Adam([x], lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, max(1, steps))
    first = last = float("nan")
    try:
        for step in range(steps + 1):
            store.clear()
            opt.zero_grad(set_to_none=True)
            model(x)
            loss = torch.stack(store).sum()
            last = float(loss.detach())
            if step == 0:
                first = last
            if step == steps:
                break
            loss.backward()
            opt.step()
            sched.step()
            if progress:
                progress(step + 1, steps, last)
    finally:
        for h in hooks:
            h.remove()
        for p, r in zip(model.parameters(), params):
            p.requires_grad_(r)
        model.train(was_training)
    return SynthResult(x.detach(), steps, time.perf_counter() - t0, last, first)
