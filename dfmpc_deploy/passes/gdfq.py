"""GDFQ (Xu et al., ECCV 2020; ../shared/papers 003) at a small CPU budget: the expensive, fine-tuning family.

What runs, following the authors' trainer (xushoukai/GDFQ ``trainer.py`` and ``cifar100_resnet20.hocon``):

* **Generator** ("knowledge matching"): label-conditioned (``z * embed(y)``), linear to 128 x (H/4) x (W/4), BN, two
  upsample-conv-BN-LeakyReLU(0.2) stages, conv to 3 channels, tanh and a non-affine BN. Its loss is
  ``CE(teacher(G(z, y)), y) + 0.1 * BNS`` where BNS is the mean over the teacher's BN layers of the MSE between the
  batch mean/variance of their inputs and the stored running mean/variance. Adam, lr 1e-3, betas (0.5, 0.999).
* **Student**: the model quantized with the same layer roles and quantizers as every other method (TWN ternary /
  DoReFa, layer-wise), trained by straight-through estimation on the generator's samples with
  ``CE(s, y) + T^2 KL(softmax(t/T) || softmax(s/T))``, T = 20, in eval mode (BN statistics frozen, as in the
  authors' trainer). SGD with Nesterov momentum 0.9 and weight decay 1e-4.
* Schedule: ``warmup`` generator-only steps, then generator and student step together, as the authors' 4 warm-up
  epochs then joint training.
* Ours, for stability at low bits with batch 32: the student's gradient norm is clipped to ``clip_norm`` (5), and a
  step whose loss is not finite is skipped (counted in ``info``). Without clipping, 3/6 on ResNet-20 diverged to NaN
  within 10 student steps (gradient norm 14 -> 66,803), because a layer-wise DoReFa range moves with its largest
  weight and feeds back through the straight-through estimator.

Where the budget differs from the paper (400 epochs x 200 iterations of batch 200 on a GPU): ``steps`` iterations
of batch ``batch`` on the CPU, and the student's learning rate is 1e-3 instead of 1e-4 with a cosine decay, because
at 1e-4 a few hundred steps leave the weights where rounding put them. The wall time is measured and reported; the
table in the README states the budget next to the accuracy.
"""
from __future__ import annotations

import copy
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..core.config import QuantConfig
from ..core.quantizers import dequantize, quantize_weight
from ..core.state import MixedPrecisionModel
from .compensate import _set_weights_, quantize_layers

__all__ = ["GdfqConfig", "Generator", "gdfq", "bns_loss"]

log = logging.getLogger("dfmpc_deploy")


@dataclass(frozen=True)
class GdfqConfig:
    """Budget and hyper-parameters (module docstring says which follow the authors and which are ours)."""

    steps: int = 400
    warmup: int = 100
    batch: int = 32
    latent_dim: int = 100
    lr_g: float = 1e-3
    lr_s: float = 1e-3
    temperature: float = 20.0
    bns_weight: float = 0.1
    clip_norm: float = 5.0

    def __post_init__(self) -> None:
        if self.steps < 0 or self.warmup < 0 or self.batch < 2:
            raise ValueError(f"GdfqConfig: steps={self.steps}, warmup={self.warmup} must be >= 0 and batch >= 2")


class Generator(nn.Module):
    """GDFQ's label-conditioned generator for ``channels x size x size`` inputs."""

    def __init__(self, num_classes: int, size: int, channels: int = 3, latent_dim: int = 100, width: int = 128):
        super().__init__()
        self.size, self.init = size, max(1, size // 4)
        self.embed = nn.Embedding(num_classes, latent_dim)
        self.fc = nn.Linear(latent_dim, width * self.init ** 2)
        self.width = width
        self.bn0 = nn.BatchNorm2d(width)
        self.conv1, self.bn1 = nn.Conv2d(width, width, 3, padding=1), nn.BatchNorm2d(width, 0.8)
        self.conv2, self.bn2 = nn.Conv2d(width, width // 2, 3, padding=1), nn.BatchNorm2d(width // 2, 0.8)
        self.conv3 = nn.Conv2d(width // 2, channels, 3, padding=1)
        self.out = nn.BatchNorm2d(channels, affine=False)

    def forward(self, z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        x = self.bn0(self.fc(self.embed(y) * z).view(len(z), self.width, self.init, self.init))
        x = F.leaky_relu(self.bn1(self.conv1(F.interpolate(x, scale_factor=2))), 0.2)
        x = F.leaky_relu(self.bn2(self.conv2(F.interpolate(x, scale_factor=2))), 0.2)
        x = torch.tanh(self.conv3(x))
        if x.shape[-1] != self.size:
            x = F.interpolate(x, size=(self.size, self.size), mode="bilinear", align_corners=False)
        return self.out(x)


def bns_loss(model: nn.Module) -> tuple[Callable[[], torch.Tensor], Callable[[], None]]:
    """Hooks on every BatchNorm2d of ``model`` collecting GDFQ's BN-statistics loss.

    Returns:
        (``take()`` -> mean over layers of MSE(batch mean, running mean) + MSE(batch var, running var) since the
        last call, ``remove()``).
    """
    terms: list[torch.Tensor] = []

    def hook(mod, inp, out):
        x = inp[0]
        mean, var = x.mean((0, 2, 3)), x.var((0, 2, 3), unbiased=False)
        terms.append(F.mse_loss(mean, mod.running_mean) + F.mse_loss(var, mod.running_var))

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, nn.BatchNorm2d)]

    def take() -> torch.Tensor:
        out = torch.stack(terms).mean() if terms else torch.zeros(())
        terms.clear()
        return out

    def remove() -> None:
        for h in handles:
            h.remove()
    return take, remove


def _ste_weights(targets: list[tuple[str, nn.Module, int]], per_channel: bool) -> dict[str, torch.Tensor]:
    """Quantized weights of ``(fqn, module, bits)`` with a straight-through gradient to the latent float weights."""
    out = {}
    for name, mod, b in targets:
        w = mod.weight
        q = dequantize(*quantize_weight(w.detach(), b, per_channel))
        out[f"{name}.weight"] = w + (q - w).detach()
    return out


def gdfq(model: nn.Module, cfg: QuantConfig, input_shape: tuple[int, int, int], arch: str | None = None,
         gcfg: GdfqConfig | None = None, progress: Callable | None = None, **_ignored) -> MixedPrecisionModel:
    """Quantize ``model`` by GDFQ at ``cfg.bits`` (same layer roles as DF-MPC) with the budget of ``gcfg``.

    Args:
        model: FP32 eval-mode classifier (not modified).
        cfg: bits, per-channel and seed are used; statistics/rounding fields are not (GDFQ has its own).
        input_shape: (C, H, W).
        gcfg: budget; :class:`GdfqConfig` defaults when None.
        progress: optional callable(step, steps, loss).

    Returns:
        MixedPrecisionModel of the fine-tuned student (codes re-derived from its final latent weights).
    """
    gcfg = gcfg or GdfqConfig(steps=cfg.finetune_steps, warmup=min(100, cfg.finetune_steps // 4))
    t0 = time.perf_counter()
    torch.manual_seed(cfg.seed)
    teacher = copy.deepcopy(model).eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    with torch.no_grad():
        num_classes = teacher(torch.zeros(2, *input_shape)).shape[1]
    gen = Generator(num_classes, input_shape[1], input_shape[0], gcfg.latent_dim)
    student = copy.deepcopy(model).eval()  # eval: BN statistics frozen, as the authors' trainer
    for p in student.parameters():
        p.requires_grad_(True)
    mods = dict(student.named_modules())
    targets = [(n, mods[n], q.bits) for n, q in quantize_layers(teacher, cfg)[0].items()]  # DF-MPC's roles/bits
    opt_g = torch.optim.Adam(gen.parameters(), lr=gcfg.lr_g, betas=(0.5, 0.999))
    opt_s = torch.optim.SGD(student.parameters(), lr=gcfg.lr_s, momentum=0.9, nesterov=True, weight_decay=1e-4)
    joint = max(1, gcfg.steps - gcfg.warmup)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt_s, joint)
    take, remove = bns_loss(teacher)
    total = gcfg.warmup + joint if gcfg.steps else 0
    last_g = last_s = float("nan")
    skipped = 0
    T = gcfg.temperature
    try:
        for step in range(total):
            z = torch.randn(gcfg.batch, gcfg.latent_dim)
            y = torch.randint(0, num_classes, (gcfg.batch,))
            x = gen(z, y)
            take()
            t_out = teacher(x)
            loss_g = F.cross_entropy(t_out, y) + gcfg.bns_weight * take()
            opt_g.zero_grad(set_to_none=True)
            loss_g.backward()
            opt_g.step()
            last_g = float(loss_g.detach())
            if step >= gcfg.warmup:
                s_out = torch.func.functional_call(student, _ste_weights(targets, cfg.per_channel),
                                                   (x.detach(),))
                kd = F.kl_div(F.log_softmax(s_out / T, 1), F.softmax(t_out.detach() / T, 1), reduction="batchmean")
                loss_s = F.cross_entropy(s_out, y) + T * T * kd / num_classes  # authors: KLDivLoss 'mean' x T^2
                opt_s.zero_grad(set_to_none=True)
                last_s = float(loss_s.detach())
                if math.isfinite(last_s):
                    loss_s.backward()
                    torch.nn.utils.clip_grad_norm_(student.parameters(), gcfg.clip_norm)
                    opt_s.step()
                else:
                    skipped += 1
                sched.step()
            if progress:
                progress(step + 1, total, last_g if step < gcfg.warmup else last_s)
    finally:
        remove()
    student.requires_grad_(False)
    layers, _ = quantize_layers(student, cfg)  # codes from the final latent weights
    _set_weights_(student, layers)
    seconds = time.perf_counter() - t0
    estimator = (f"GDFQ generator samples ({total} steps x batch {gcfg.batch}, {gcfg.warmup} generator warm-up; "
                 f"student fine-tuned {joint if gcfg.steps else 0} steps; no data)")
    info = {"gdfq_steps": total, "gdfq_batch": gcfg.batch, "finetune_steps": joint if gcfg.steps else 0,
            "generator_loss_final": round(last_g, 5), "student_loss_final": round(last_s, 5),
            "skipped_nonfinite_steps": skipped,
            "total_seconds": round(seconds, 3)}
    log.info("gdfq: %d steps in %.1f s", total, seconds)
    return MixedPrecisionModel(student, layers, arch or type(model).__name__, cfg, estimator, info)
