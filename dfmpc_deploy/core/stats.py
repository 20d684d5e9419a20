"""What a model's BatchNorm layers carry: the training statistics the data-free passes rely on, or nothing.

Many deployed models arrive with BN folded into the convolutions (exports from ONNX, TFLite, quantization-aware
training): their BN layers are left with identity statistics (running mean 0, running variance 1, or 1 - eps so that
``var + eps = 1``), which describe no data. Matching inputs to such "statistics" is meaningless, so the passes that
need statistics check :func:`bn_status` first.
"""
from __future__ import annotations

import torch
from torch import nn

__all__ = ["bn_status", "BN_STATUSES"]

#: ``real``: at least one BN holds non-identity statistics; ``identity``: every BN's statistics are the identity;
#: ``absent``: no BN layer tracks running statistics.
BN_STATUSES = ("real", "identity", "absent")


def _is_identity(bn: nn.BatchNorm2d, tol: float = 1e-3) -> bool:
    mean, var = bn.running_mean, bn.running_var
    if mean is None or var is None:
        return False
    return bool(torch.all(mean.abs() <= tol) and torch.all((var + bn.eps - 1).abs() <= tol))


def bn_status(model: nn.Module) -> str:
    """``real``, ``identity`` or ``absent`` (see :data:`BN_STATUSES`) for the BatchNorm2d layers of ``model``."""
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d) and m.running_mean is not None]
    if not bns:
        return "absent"
    return "identity" if all(_is_identity(m) for m in bns) else "real"
