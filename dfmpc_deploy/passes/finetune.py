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

Where the budget differs from the paper (400 epochs x 200 iterations of batch 200 on a GPU): ``finetune_steps``
iterations of batch ``batch`` on the CPU, and the student's learning rate is 1e-3 instead of 1e-4 with a cosine decay,
because at 1e-4 a few hundred steps leave the weights where rounding put them. The wall time is measured and reported;
the table in the README states the budget next to the accuracy.
"""
from __future__ import annotations

import copy
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import cast

import torch
import torch.nn.functional as F
from torch import nn

from ..core.options import nonnegative_int, option, require_finite
from ..core.quantizers import dequantize, quantize_weight
from ..core.state import QuantLayer
from ..errors import UsageError
from .base import Context, Pass, register_pass
from .quantize import set_weights_

__all__ = ["Finetune", "Generator", "bns_loss"]

log = logging.getLogger("dfmpc_deploy")


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


def _ste_weights(targets: list[tuple[str, nn.Module, int]], per_channel: bool, grid: str) -> dict[str, torch.Tensor]:
    """Quantized weights of ``(fqn, module, bits)`` with a straight-through gradient to the latent float weights."""
    out = {}
    for name, mod, b in targets:
        w = cast(torch.Tensor, mod.weight)
        q = dequantize(*quantize_weight(w.detach(), b, per_channel, grid))
        out[f"{name}.weight"] = w + (q - w).detach()
    return out


@register_pass
@dataclass(frozen=True)
class Finetune(Pass):
    """GDFQ's generator and straight-through fine-tuning of the quantized layers (module docstring).

    Args:
        finetune_steps: iterations (generator warm-up included).
        warmup: generator-only iterations first (None: min(100, steps // 4)).
        batch, latent_dim, lr_g, lr_s, temperature, bns_weight, clip_norm: see the module docstring.
    """

    name = "finetune"
    finetune_steps: int = option(400, flag="--finetune-steps", parse=nonnegative_int, metavar="N",
                                 help="gdfq only: generator + fine-tuning iterations of batch 32")
    warmup: int | None = None
    batch: int = 32
    latent_dim: int = 100
    lr_g: float = 1e-3
    lr_s: float = 1e-3
    temperature: float = 20.0
    bns_weight: float = 0.1
    clip_norm: float = 5.0

    def __post_init__(self) -> None:
        if not isinstance(self.finetune_steps, int) or self.finetune_steps < 0:
            raise UsageError(f"bad --finetune-steps {self.finetune_steps!r}: give 0 or more, e.g. 400")
        if (self.warmup is not None and self.warmup < 0) or self.batch < 2:
            raise UsageError(f"finetune: warmup={self.warmup} must be >= 0 and batch={self.batch} >= 2")
        for name in ("lr_g", "lr_s", "temperature", "bns_weight", "clip_norm"):
            require_finite(name, getattr(self, name), lo=0.0)

    def apply(self, ctx: Context) -> dict:
        warmup = min(100, self.finetune_steps // 4) if self.warmup is None else self.warmup
        torch.manual_seed(ctx.seed)
        teacher = copy.deepcopy(ctx.fp_model).eval()
        for p in teacher.parameters():
            p.requires_grad_(False)
        shape = ctx.input_shape
        with torch.no_grad():
            num_classes = teacher(torch.zeros(2, *shape)).shape[1]
        gen = Generator(num_classes, shape[1], shape[0], self.latent_dim)
        student = copy.deepcopy(ctx.fp_model).eval()  # eval: BN statistics frozen, as the authors' trainer
        for p in student.parameters():
            p.requires_grad_(True)
        mods = dict(student.named_modules())
        targets = [(n, mods[n], q.bits) for n, q in ctx.layers.items()]  # the quantize pass's roles and bits
        opt_g = torch.optim.Adam(gen.parameters(), lr=self.lr_g, betas=(0.5, 0.999))
        opt_s = torch.optim.SGD(student.parameters(), lr=self.lr_s, momentum=0.9, nesterov=True, weight_decay=1e-4)
        joint = max(1, self.finetune_steps - warmup)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt_s, joint)
        take, remove = bns_loss(teacher)
        total = warmup + joint if self.finetune_steps else 0
        last_g = last_s = float("nan")
        skipped = 0
        T = self.temperature
        progress = ctx.task("gdfq: train")
        try:
            for step in range(total):
                z = torch.randn(self.batch, self.latent_dim)
                y = torch.randint(0, num_classes, (self.batch,))
                x = gen(z, y)
                take()
                t_out = teacher(x)
                loss_g = F.cross_entropy(t_out, y) + self.bns_weight * take()
                opt_g.zero_grad(set_to_none=True)
                loss_g.backward()
                opt_g.step()
                last_g = float(loss_g.detach())
                if step >= warmup:
                    s_out = torch.func.functional_call(student, _ste_weights(targets, ctx.per_channel, ctx.grid),
                                                       (x.detach(),))
                    kd = F.kl_div(F.log_softmax(s_out / T, 1), F.softmax(t_out.detach() / T, 1),
                                  reduction="batchmean")
                    loss_s = F.cross_entropy(s_out, y) + T * T * kd / num_classes  # authors: KLDivLoss 'mean' x T^2
                    opt_s.zero_grad(set_to_none=True)
                    last_s = float(loss_s.detach())
                    if math.isfinite(last_s):
                        loss_s.backward()
                        torch.nn.utils.clip_grad_norm_(student.parameters(), self.clip_norm)
                        opt_s.step()
                    else:
                        skipped += 1
                    sched.step()
                if progress:
                    progress(step + 1, total, last_g if step < warmup else last_s)
        finally:
            remove()
        student.requires_grad_(False)
        for n, q in list(ctx.layers.items()):  # codes from the final latent weights
            codes, scale = quantize_weight(mods[n].weight, q.bits, ctx.per_channel, q.grid)
            ctx.layers[n] = QuantLayer(n, q.kind, q.role, q.bits, codes, scale, partner=q.partner, grid=q.grid)
        set_weights_(student, ctx.layers)
        ctx.model = student
        ctx.estimator = (f"GDFQ generator samples ({total} steps x batch {self.batch}, {warmup} generator warm-up; "
                         f"student fine-tuned {joint if self.finetune_steps else 0} steps; no data)")
        return {"steps": total, "batch": self.batch, "student_steps": joint if self.finetune_steps else 0,
                "generator_loss_final": round(last_g, 5), "student_loss_final": round(last_s, 5),
                "skipped_nonfinite_steps": skipped}
