"""Quantize pass: every Conv2d/Linear to its role's width (D7, D9).

The first layer of each pair (core.graph) goes to the low width, every other layer to the high width: TWN ternary
for 2 bits (Eqs. 3-4), otherwise the k-bit ``grid``: ``int`` (symmetric integers with a zero level, the form
TensorRT and ONNX INT8 execute; the default, :data:`~dfmpc_deploy.core.quantizers.DEFAULT_GRID`) or the paper's
``dorefa`` (Eq. 6); layer-wise unless ``per_channel``. Dequantised weights keep alpha and the step (D4): the working
model computes with ``codes * scale`` exactly. Each layer records its grid, which later passes round on.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..core.config import BitsSpec, parse_bits
from ..core.graph import GraphAnalysis, Role
from ..core.options import option
from ..core.quantizers import DEFAULT_GRID, GRIDS, check_grid, quantize_weight
from ..core.state import QuantLayer
from ..errors import UsageError
from .base import Context, Pass, register_pass

__all__ = ["Quantize", "set_weights_", "requantize_", "bits_option", "per_channel_option", "grid_option",
           "role_widths"]


def set_weights_(model: nn.Module, layers: dict[str, QuantLayer]) -> None:
    """In place: every quantized layer of ``model`` computes with its dequantised weight."""
    mods = dict(model.named_modules())
    with torch.no_grad():
        for q in layers.values():
            w = mods[q.fqn].weight
            w.copy_(q.weight().to(w.device, w.dtype))


def requantize_(ctx: Context, fqn: str, bits: int, role: Role) -> None:
    """Re-quantize one layer of ``ctx`` from the FP reference at ``bits`` with a new role (allocation)."""
    q = ctx.layers[fqn]
    codes, scale = quantize_weight(dict(ctx.fp_model.named_modules())[fqn].weight, bits, ctx.per_channel, ctx.grid)
    ctx.layers[fqn] = QuantLayer(fqn, q.kind, role, bits, codes, scale, partner=q.partner, grid=ctx.grid)


def role_widths(graph: GraphAnalysis, bits: BitsSpec) -> dict[str, int]:
    """``{layer: width}`` under the fixed pairing: the low width for each pair's first layer, the high one else."""
    return {r.fqn: bits.low if r.role == Role.LOW else bits.high for r in graph.roles}


def bits_option() -> Any:
    """The ``--bits`` field, declared alike by every pass that reads it."""
    return option(BitsSpec(2, 6), flag="--bits", parse=parse_bits, metavar="LOW/HIGH",
                  help="bit widths of the low and high layers of each pair, 2 <= LOW <= HIGH <= 8; "
                       "2 = ternary; one number = every layer at that width")


def per_channel_option() -> Any:
    """The ``--per-channel`` field, declared alike by every pass that reads it."""
    return option(False, flag="--per-channel", action="store_true",
                  help="per-output-channel quantizer ranges (the paper's are layer-wise)")


def grid_option() -> Any:
    """The ``--grid`` field, declared alike by every pass that reads it."""
    return option(DEFAULT_GRID, flag="--grid", choices=GRIDS,
                  help="k-bit grid (3..8 bits; 2 bits is always ternary): 'int' = symmetric integers with a "
                       "zero level, step by least weight error (what TensorRT/ONNX INT8 execute; int8-lattice "
                       "weights come back exactly at 8 bits), 'dorefa' = the paper's Eq. 6 (no zero level)")


@register_pass
@dataclass(frozen=True)
class Quantize(Pass):
    """Round-to-nearest quantization of every layer per its role.

    Args:
        bits: ``LOW/HIGH`` widths (``2/6``; ``6`` alone means every layer at 6 bits).
        per_channel: per-output-channel quantizer ranges instead of the paper's layer-wise ones.
        grid: the k-bit grid, ``int`` or ``dorefa`` (core.quantizers).
    """

    name = "quantize"
    bits: BitsSpec = bits_option()
    per_channel: bool = per_channel_option()
    grid: str = grid_option()

    def __post_init__(self) -> None:
        try:
            check_grid(self.grid)
        except ValueError:
            raise UsageError(f"bad --grid '{self.grid}': choose {' or '.join(GRIDS)}") from None
        if isinstance(self.bits, str):
            object.__setattr__(self, "bits", parse_bits(self.bits))
        if not isinstance(self.bits, BitsSpec):
            raise TypeError(f"bits must be a BitsSpec or 'LOW/HIGH', got {self.bits!r}")

    def apply(self, ctx: Context) -> dict:
        ctx.bits, ctx.per_channel, ctx.grid = self.bits, self.per_channel, self.grid
        fp = dict(ctx.fp_model.named_modules())
        layers = {}
        widths = role_widths(ctx.graph, self.bits)
        for r in ctx.graph.roles:
            bits = widths[r.fqn]
            codes, scale = quantize_weight(fp[r.fqn].weight, bits, self.per_channel, self.grid)
            layers[r.fqn] = QuantLayer(r.fqn, r.kind, r.role, bits, codes, scale, partner=r.partner, grid=self.grid)
        ctx.layers = layers
        set_weights_(ctx.model, layers)
        return {"layers": len(layers), "low_layers": sum(q.role == Role.LOW for q in layers.values())}
