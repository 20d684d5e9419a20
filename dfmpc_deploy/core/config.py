"""Configuration dataclasses, validated at construction (user errors name the bad value and the fix)."""
from __future__ import annotations

import re
from dataclasses import dataclass
from enum import Enum

from ..errors import UsageError

__all__ = ["WeightFormat", "BitsSpec", "parse_bits", "QuantConfig", "RECAL_CHOICES", "RECAL_SCOPES"]


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
    """Parse ``"2/6"`` into ``BitsSpec(2, 6)``.

    Raises:
        UsageError: for anything that is not two integers ``low/high`` with 2 <= low <= high <= 8.
    """
    m = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", str(text))
    if not m:
        raise UsageError(f"bad --bits '{text}': expected LOW/HIGH such as 2/6, 3/6, 6/6 or 4/8")
    return BitsSpec(int(m.group(1)), int(m.group(2)))


#: Data-free BN statistics estimators (see calib_free/). ``real`` is a labelled reference that needs data.
RECAL_CHOICES = ("synthetic", "none", "real")
#: Which BatchNorm layers get re-estimated statistics.
RECAL_SCOPES = ("low", "all")


@dataclass(frozen=True)
class QuantConfig:
    """Everything :func:`dfmpc_deploy.compensate` needs.

    Args:
        bits: low/high bit widths.
        lambda1: weight of the BN bias term Theta in Eq. 22 (paper default 0.5).
        lambda2: ridge on c in Eq. 22 (paper default 0).
        compensation: fold the closed-form c (Eq. 27) into the model. Off by default: with correctly re-estimated
            statistics c only adds the least-squares shrinkage, which measured 28-47 points worse on the CIFAR
            ResNets (scripts/dfmpc_accuracy.py, README). With ``recal="none"`` (the paper without
            re-calibration) it is the only correction there is.
        c_mode: ``"paper"`` solves Eq. 27 with the statistics in force; ``"norm"`` removes the least-squares
            shrinkage (see compensate.py) so the compensated channel keeps the FP channel's output scale.
        per_channel: per-output-channel thresholds/ranges in the quantizers instead of the paper's layer-wise ones.
        recal: how the low-bit layers' BN statistics are re-estimated (``synthetic`` = data-free, the default).
        recal_scope: ``low`` = only BNs after low-bit convs (the paper), ``all`` = every BN, in network order.
        synth_samples / synth_steps / synth_lr: budget of the BN-statistics-matching input synthesis.
        rounding: ``nearest`` (the paper) or ``gptq`` (error-feedback rounding on the synthetic samples, rounding.py).
        gptq_scope: which layers error feedback re-rounds (``all`` or ``low``).
        grid_search: with ``gptq``, pick each low-bit layer's grid step among 0.7..1.4 x the TWN/DoReFa scale by
            the least scale-invariant output error on the synthetic inputs (rounding.best_grid_codes).
        seed: seed for everything random (synthesis, random weights).
        size_budget_bytes: when set, choose each layer's width in ``bits.low..bits.high`` by data-free sensitivity
            so that the packed file (dense layouts) fits this many bytes (allocate.py); else the fixed pairing.
        avg_bits: the same, with the budget given as average bits per weight of the integer codes (ternary
            counts 1.6, its packed size).
        finetune_steps: iterations of the ``gdfq`` method (generator warm-up included); no other method trains.
    """

    bits: BitsSpec = BitsSpec(2, 6)
    lambda1: float = 0.5
    lambda2: float = 0.0
    compensation: bool = False
    c_mode: str = "paper"
    per_channel: bool = False
    recal: str = "synthetic"
    recal_scope: str = "low"
    rounding: str = "gptq"
    gptq_scope: str = "low"
    grid_search: bool = True
    synth_samples: int = 32
    synth_steps: int = 100
    synth_lr: float = 0.25
    seed: int = 0
    size_budget_bytes: int | None = None
    avg_bits: float | None = None
    finetune_steps: int = 400

    @property
    def allocating(self) -> bool:
        """Whether widths are chosen per layer under a budget (instead of the fixed low/high pairing)."""
        return self.size_budget_bytes is not None or self.avg_bits is not None

    def __post_init__(self) -> None:
        if self.lambda1 < 0 or self.lambda2 < 0:
            raise UsageError(f"lambda1={self.lambda1}, lambda2={self.lambda2}: both must be >= 0 (paper: 0.5 and 0)")
        if self.c_mode not in ("paper", "norm"):
            raise UsageError(f"bad c_mode '{self.c_mode}': choose 'paper' or 'norm'")
        if self.recal not in RECAL_CHOICES:
            raise UsageError(f"bad --recal '{self.recal}': choose one of {', '.join(RECAL_CHOICES)}")
        if self.recal_scope not in RECAL_SCOPES:
            raise UsageError(f"bad --recal-scope '{self.recal_scope}': choose one of {', '.join(RECAL_SCOPES)}")
        if self.rounding not in ("nearest", "gptq"):
            raise UsageError(f"bad --rounding '{self.rounding}': choose 'nearest' or 'gptq'")
        if self.gptq_scope not in ("all", "low"):
            raise UsageError(f"bad gptq_scope '{self.gptq_scope}': choose 'all' or 'low'")
        if self.synth_samples < 1 or self.synth_steps < 0:
            raise UsageError("--synth-samples must be >= 1 and --synth-steps >= 0")
        if self.finetune_steps < 0:
            raise UsageError(f"bad --finetune-steps {self.finetune_steps}: give 0 or more, e.g. 400")
        if self.size_budget_bytes is not None and self.avg_bits is not None:
            raise UsageError("give either --size-budget-mb or --avg-bits, not both")
        if self.size_budget_bytes is not None and self.size_budget_bytes <= 0:
            raise UsageError(f"bad --size-budget-mb: {self.size_budget_bytes} bytes; give a positive size such as 0.2")
        if self.avg_bits is not None and not (1.6 <= self.avg_bits <= 8):
            raise UsageError(f"bad --avg-bits {self.avg_bits}: need 1.6 (all ternary) to 8, e.g. --avg-bits 3.5")
