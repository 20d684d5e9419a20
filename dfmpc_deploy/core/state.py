"""Data passed between pipeline stages (plain dataclasses, no globals)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .config import BitsSpec, InputSpec, WeightFormat
from .graph import GraphAnalysis
from .quantizers import dequantize

__all__ = ["QuantLayer", "MixedPrecisionModel"]


@dataclass
class QuantLayer:
    """One quantized Conv2d/Linear: integer codes plus float scales; ``weight()`` is what the model computes with.

    Attributes:
        fqn: module name in ``model.named_modules()``.
        kind: ``conv`` or ``linear``.
        role: ``low`` | ``high-compensating`` | ``high``.
        bits: 2 (ternary) .. 8.
        codes: integer codes, weight-shaped (int8 for ternary; int16 for k-bit: on the ``int`` grid in
            [-2^(k-1), 2^(k-1)-1], on the ``dorefa`` grid odd values in [-(2^k-1), 2^k-1]).
        scale: (out,) float32 per-output-channel scale; dequantised weight = codes * scale.
        in_scale: (in,) float32 compensation folded into the input channels (DF-MPC Eq. 7 / D6-ii), used when the
            activation between the pair is not positively homogeneous (ReLU6); None otherwise.
        c: (out,) closed-form compensation solved for a ``low`` layer (Eq. 27); folded into BN or ``in_scale`` only
            when the recipe asks for it, else reported only.
        c_folded: whether ``c`` was folded into the model (``c`` is then part of the BN or scales, not extra).
        partner: the other layer of the pair.
        grid: the k-bit grid of the codes (``int`` or ``dorefa``, core.quantizers.GRIDS); also the grid the layer is
            re-rounded on by later passes. Ternary layers (2 bits) are TWN whatever it says.
    """

    fqn: str
    kind: str
    role: str
    bits: int
    codes: torch.Tensor
    scale: torch.Tensor
    in_scale: torch.Tensor | None = None
    c: torch.Tensor | None = None
    partner: str | None = None
    c_folded: bool = False
    grid: str = "dorefa"

    @property
    def fmt(self) -> WeightFormat:
        return BitsSpec.fmt(self.bits)

    def weight(self) -> torch.Tensor:
        """Dequantised float32 weight (bit-exact function of codes and scales)."""
        w = dequantize(self.codes, self.scale)
        if self.in_scale is not None:
            w = w * self.in_scale.float().reshape(1, -1, *([1] * (w.dim() - 2)))
        return w

    @property
    def numel(self) -> int:
        return self.codes.numel()


@dataclass
class MixedPrecisionModel:
    """The compensated model: ``module`` computes with the dequantised weights of ``layers`` (activations FP32).

    Attributes:
        module: eval-mode nn.Module (a deep copy of the input model).
        layers: ``{fqn: QuantLayer}`` for every Conv2d/Linear, in module order.
        arch: model name (or class name for user modules).
        config: the configuration that produced it (None for a model read back from a packed file).
        estimator: how the low-bit BN statistics were obtained (e.g. ``synthetic-bn-matching (64 samples)``).
        info: timings (seconds per step) and diagnostics for the report.
        graph: the architecture's graph analysis (traced once; None until someone needs it).
        input: the model's input shape and normalisation when known (``build`` records it; a packed file of format 3
            stores it), else None.
    """

    module: nn.Module
    layers: dict[str, QuantLayer]
    arch: str
    config: Any
    estimator: str
    info: dict = field(default_factory=dict)
    graph: GraphAnalysis | None = None
    input: InputSpec | None = None

    def analysis(self) -> GraphAnalysis:
        """The graph analysis, traced on first use and kept."""
        if self.graph is None:
            self.graph = GraphAnalysis.of(self.module)
        return self.graph
