"""Refuse weights that are non-finite or degenerate before any pass sees them.

Without this check one NaN in a conv weight ends the default pipeline in a Cholesky traceback, while round-to-nearest
and DFQ write a packed file of NaN statistics; the cause (which tensor, what value) is lost. :func:`check_weights`
names the first bad tensor in module order:

* any NaN or +-Inf in a floating-point parameter or buffer;
* a tensor whose squared L2 norm exceeds :data:`MAX_SQUARED_NORM` (2^-20 of float32's largest value, i.e. a norm
  above 1.8e16). Every Gram matrix or squared error a pass forms from the tensor is bounded by its squared norm
  (Cauchy-Schwarz), so the bound keeps them finite with a 2^20 margin for the sums and scalings around them.
  Measured on the test suite's tiny net: one 1e18 entry in a paired conv (squared norm 1e36) already makes the
  default pipeline's statistics non-finite, 1e17 does not. Trained CNN tensors have norms below 1e6;
* a BatchNorm ``running_var`` with a negative entry, or a BatchNorm ``eps`` that is not a positive finite number
  (``sqrt(var + eps)`` would be NaN or zero).

Integer buffers (``num_batches_tracked``) are not checked.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from ..errors import DfmpcError

__all__ = ["check_weights", "MAX_SQUARED_NORM"]

MAX_SQUARED_NORM = float(torch.finfo(torch.float32).max) * 2.0 ** -20
_FIX = "the weights are corrupt or not a trained model's: fix or re-export the checkpoint"


def _index(t: torch.Tensor, flat: int) -> list[int]:
    return [int(i) for i in torch.unravel_index(torch.tensor(flat), t.shape)] if t.dim() else []


def _check_tensor(name: str, t: torch.Tensor) -> None:
    finite = torch.isfinite(t)
    if not bool(finite.all()):
        nan = int(torch.isnan(t).sum())
        inf = int(t.numel() - int(finite.sum()) - nan)
        first = int((~finite).flatten().nonzero()[0, 0])
        raise DfmpcError(f"tensor '{name}' {list(t.shape)} holds {nan} NaN and {inf} infinite value(s) (first at "
                         f"index {_index(t, first)}); {_FIX}")
    sq = float(t.detach().double().square().sum())
    if sq > MAX_SQUARED_NORM:
        peak = float(t.detach().abs().max())
        raise DfmpcError(f"tensor '{name}' {list(t.shape)} holds values up to {peak:.3g}: its squared norm {sq:.3g} "
                         f"exceeds {MAX_SQUARED_NORM:.3g}, so quantization statistics would overflow float32; {_FIX}")


def _check_bn(fqn: str, m: nn.modules.batchnorm._NormBase) -> None:
    if not (isinstance(m.eps, (int, float)) and math.isfinite(m.eps) and m.eps > 0):
        raise DfmpcError(f"BatchNorm '{fqn}' has eps={m.eps!r}; it must be a positive finite number (e.g. 1e-5)")
    var = m.running_var
    if var is not None and bool((var < 0).any()):
        neg = (var < 0).flatten().nonzero()[:, 0]
        c = int(neg[0])
        name = f"{fqn}.running_var" if fqn else "running_var"
        raise DfmpcError(f"tensor '{name}' holds {len(neg)} negative variance(s) (first {float(var.flatten()[c]):.3g} "
                         f"at channel {c}); a variance cannot be negative: {_FIX}")


def check_weights(module: nn.Module) -> None:
    """Raise a one-line :class:`DfmpcError` naming the first non-finite or degenerate tensor of ``module``.

    Args:
        module: any model; its floating-point parameters and buffers and its BatchNorm layers are checked (module
            order, so the first bad tensor in the network is named).

    Raises:
        DfmpcError: see the module docstring for the rules.

    Example::

        >>> net = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4))
        >>> check_weights(net)  # fine
        >>> with torch.no_grad():
        ...     net[0].weight[0, 0, 0, 0] = float("nan")
        >>> check_weights(net)
        Traceback (most recent call last):
        dfmpc_deploy.errors.DfmpcError: tensor '0.weight' [4, 3, 1, 1] holds 1 NaN and 0 infinite value(s) ...
    """
    for fqn, m in module.named_modules():
        prefix = f"{fqn}." if fqn else ""
        for name, t in [*m.named_parameters(recurse=False), *m.named_buffers(recurse=False)]:
            if t is not None and (t.is_floating_point() or t.is_complex()):
                if t.is_complex():
                    raise DfmpcError(f"tensor '{prefix}{name}' is complex ({t.dtype}); CNN weights are real numbers")
                _check_tensor(prefix + name, t)
        if isinstance(m, nn.modules.batchnorm._NormBase):
            _check_bn(fqn, m)
