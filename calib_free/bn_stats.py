"""Read the BatchNorm statistics a pretrained model carries (they summarise its training data)."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

__all__ = ["BNStats", "collect_bn_stats"]


@dataclass(frozen=True)
class BNStats:
    """Per-channel BN parameters and running statistics (float64 copies).

    ``sigma`` is the standard deviation ``sqrt(running_var + eps)`` (D5), not the variance.
    """

    gamma: torch.Tensor
    beta: torch.Tensor
    mean: torch.Tensor
    var: torch.Tensor
    eps: float

    @property
    def sigma(self) -> torch.Tensor:
        return torch.sqrt(self.var + self.eps)

    @classmethod
    def from_module(cls, bn: nn.BatchNorm2d) -> BNStats:
        c = bn.num_features
        gamma = bn.weight.detach() if bn.weight is not None else torch.ones(c)
        beta = bn.bias.detach() if bn.bias is not None else torch.zeros(c)
        mean, var = bn.running_mean, bn.running_var
        if mean is None or var is None:
            raise ValueError("BatchNorm2d without running statistics (track_running_stats=False) has no BNStats")
        return cls(gamma.double().clone(), beta.double().clone(), mean.detach().double().clone(),
                   var.detach().double().clone(), float(bn.eps))


def collect_bn_stats(model: nn.Module) -> dict[str, BNStats]:
    """``{fqn: BNStats}`` for every BatchNorm2d of ``model`` that tracks running statistics."""
    return {n: BNStats.from_module(m) for n, m in model.named_modules()
            if isinstance(m, nn.BatchNorm2d) and m.running_mean is not None}
