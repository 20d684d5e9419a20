"""The vocabulary of bit widths: weight formats and the low/high pair (validated at construction)."""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from enum import Enum

from ..errors import UsageError
from .options import float32_problem

__all__ = ["WeightFormat", "BitsSpec", "parse_bits", "InputSpec", "MAX_INPUT_SIDE", "normalization_problem"]

#: largest input channel count / side an :class:`InputSpec` (and a ``.dfmpc`` file's input block) accepts
MAX_INPUT_SIDE = 65535


class WeightFormat(str, Enum):
    """How a layer's weights are stored. Serialises to readable JSON strings."""

    TERNARY = "ternary"  # TWN, Eqs. 3-4: codes in {-1, 0, +1}
    UNIFORM = "uniform"  # k-bit uniform: the int grid (zero level) or DoReFa (Eq. 6, odd codes); core.quantizers
    FLOAT = "float"


@dataclass(frozen=True)
class BitsSpec:
    """A ``low/high`` bit-width pair: low-bit layers of each pair, high-bit for everything else.

    2 means ternary (TWN, Eq. 3); 3..8 means a k-bit grid: ``int`` (zero level) or the paper's DoReFa (Eq. 6,
    Sec. 5.2), chosen by ``--grid`` (core.quantizers).
    """

    low: int
    high: int

    def __post_init__(self) -> None:
        if not (2 <= self.low <= self.high <= 8):
            raise UsageError(
                f"bad --bits '{self.low}/{self.high}': need 2 <= low <= high <= 8, e.g. --bits 2/6 or --bits 3/6"
            )

    def __str__(self) -> str:
        return f"{self.low}/{self.high}"

    @staticmethod
    def fmt(bits: int) -> WeightFormat:
        return WeightFormat.TERNARY if bits == 2 else WeightFormat.UNIFORM


def parse_bits(text: str) -> BitsSpec:
    """Parse ``"2/6"`` into ``BitsSpec(2, 6)``; a single width ``"6"`` means every layer at 6 bits (``6/6``).

    Raises:
        UsageError: for anything that is not ``low/high`` or one integer with 2 <= low <= high <= 8.
    """
    m = re.fullmatch(r"\s*(\d{1,3})\s*(?:/\s*(\d{1,3})\s*)?", str(text))
    if not m:
        raise UsageError(f"bad --bits '{text}': expected LOW/HIGH such as 2/6, 3/6, 6/6 or 4/8, or one width such as 6")
    low = int(m.group(1))
    return BitsSpec(low, int(m.group(2)) if m.group(2) is not None else low)


#: the largest normalised input magnitude accepted: real normalisations give a few units; beyond this the network's
#: float32 activations overflow (a --std of 1e-30 maps a pixel to 1e30)
MAX_NORMALIZED_INPUT = 1e6


def normalization_problem(mean, std) -> str | None:
    """Why ``(x - mean) / std`` for pixels ``x`` in [0, 1] is no usable float32 input, or None: each of the three
    means and stds must be finite in float32, each std > 0 and normal, and every normalised pixel finite in float32
    and at most :data:`MAX_NORMALIZED_INPUT` in magnitude."""
    import numpy as np


    mean, std = tuple(mean), tuple(std)
    if len(mean) != 3 or len(std) != 3:
        return "need three values each (R,G,B)"
    for name, vals in (("mean", mean), ("std", std)):
        for v in vals:
            why = float32_problem(float(v))
            if why:
                return f"{name} {v!r} {why}"
    if min(std) <= 0:
        return f"std {min(std)!r} must be > 0"
    m, sd = np.asarray(mean, np.float32), np.asarray(std, np.float32)
    with np.errstate(all="ignore"):
        ends = np.concatenate([(np.float32(0) - m) / sd, (np.float32(1) - m) / sd])
    worst = float(np.abs(ends).max())
    if not math.isfinite(worst) or worst > MAX_NORMALIZED_INPUT:
        return (f"mean {list(mean)} / std {list(std)} map pixels in [0, 1] to values up to {worst:.3g} in magnitude "
                f"(float32 inputs beyond {MAX_NORMALIZED_INPUT:.0e} overflow the network); use a std near the "
                f"pixels' spread, e.g. 0.229,0.224,0.225")
    return None


@dataclass(frozen=True)
class InputSpec:
    """What one model input is: its shape and the normalisation of its pixels (recorded in ``.dfmpc`` files).

    Attributes:
        shape: (C, H, W) of one input, each 1..65535.
        mean, std: per-channel normalisation of RGB pixels in [0, 1]: ``(x - mean) / std``; std > 0, all finite.
        resize: shorter side the image is resized to before the centre crop, or None (no resize).

    Raises:
        ValueError: a value out of range (naming it).
    """

    shape: tuple[int, int, int]
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    resize: int | None = None

    def __post_init__(self) -> None:
        shape, mean, std = tuple(self.shape), tuple(float(v) for v in self.mean), tuple(float(v) for v in self.std)
        if len(shape) != 3 or not all(isinstance(d, int) and 1 <= d <= MAX_INPUT_SIDE for d in shape):
            raise ValueError(f"input shape {list(shape)}: need (C, H, W), each 1..{MAX_INPUT_SIDE}")
        why = normalization_problem(mean, std)
        if why:
            raise ValueError(f"input normalisation mean {list(mean)} / std {list(std)}: {why}")
        if self.resize is not None and not (isinstance(self.resize, int) and 1 <= self.resize <= MAX_INPUT_SIDE):
            raise ValueError(f"input resize {self.resize!r}: need None or 1..{MAX_INPUT_SIDE}")
        object.__setattr__(self, "shape", shape)
        object.__setattr__(self, "mean", mean)
        object.__setattr__(self, "std", std)
