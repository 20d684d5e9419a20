"""The vocabulary of bit widths: weight formats and the low/high pair (validated at construction)."""
from __future__ import annotations

import re
from dataclasses import dataclass
from enum import Enum

from ..errors import UsageError

__all__ = ["WeightFormat", "BitsSpec", "parse_bits"]


class WeightFormat(str, Enum):
    """How a layer's weights are stored. Serialises to readable JSON strings."""

    TERNARY = "ternary"  # TWN, Eqs. 3-4: codes in {-1, 0, +1}
    UNIFORM = "uniform"  # DoReFa k-bit, Eq. 6: odd integer codes in [-(2^k-1), 2^k-1]
    FLOAT = "float"


@dataclass(frozen=True)
class BitsSpec:
    """A ``low/high`` bit-width pair: low-bit layers of each pair, high-bit for everything else.

    2 means ternary (TWN, Eq. 3); 3..8 means DoReFa k-bit (Eq. 6), as in the paper (Sec. 5.2).
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
