"""Related quantization methods behind one interface, so they run on the same model, data and bit budget.

Every method quantizes the same layers to the same bits (low/high per pairing.py, TWN ternary / DoReFa grids of
quantizers.py) and returns a :class:`MixedPrecisionModel`, so packing and size accounting are identical; only how
the weights and the float state (BN statistics, biases) are chosen differs.

* ``rtn``: round-to-nearest, FP statistics, nothing else.
* ``dfq``: Nagel et al. 2019 (ICCV), data-free: cross-layer equalization (CLE) + analytic bias correction.
* ``dfmpc``: this project's default pipeline (``QuantConfig()``).
* ``dfmpc-paper``: the paper as printed: closed-form c (Eq. 27) folded, FP statistics, nearest rounding.
* ``zeroq``: Cai et al. 2020: inputs synthesised from the BN statistics, then every BN re-estimated on them.
* ``gdfq``: Xu et al. 2020: a generator trained with BN-statistics and class-boundary losses, then the quantized
  model fine-tuned on its samples (gdfq.py; ``finetune_steps`` sets the budget).
* ``dfmpc-alloc``: DF-MPC with each layer's width chosen by data-free sensitivity under a size budget (allocate.py,
  the idea of paper 002); without ``size_budget_bytes`` / ``avg_bits`` the budget is the size of the fixed
  low/high pairing's packed file, so it is compared at the same size.

DFQ's implementation choices are in dfq.py. This module imports no torch, so ``dfmpc-deploy --help`` stays light.
"""
from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

from ..core.config import QuantConfig

if TYPE_CHECKING:
    from torch import nn

    from ..core.state import MixedPrecisionModel

__all__ = ["MethodSpec", "METHODS", "DATA_USED", "method_config", "run_method", "method_overrides", "fixed_pairing_bytes"]

log = logging.getLogger("dfmpc_deploy")

DATA_USED = ("none", "synthetic", "real")


@dataclass(frozen=True)
class MethodSpec:
    """One registered method.

    Attributes:
        name: registry key (``--method``).
        description: one line for tables and ``--help``.
        data_used: ``none`` | ``synthetic`` | ``real`` (what the method reads besides the weights).
        fine_tuning: whether weights are trained (by gradient steps) after quantization.
        config: maps the user's QuantConfig (bits, seed, budgets) to the one the method runs under.
        run: ``run(model, cfg, input_shape, arch=None, real_inputs=None, progress=None) -> MixedPrecisionModel``;
            ``cfg`` is the user's QuantConfig, ``run`` applies :attr:`config` itself.
    """

    name: str
    description: str
    data_used: str
    fine_tuning: bool
    config: Callable[[QuantConfig], QuantConfig]
    run: Callable[..., MixedPrecisionModel]

    def __post_init__(self) -> None:
        if self.data_used not in DATA_USED:
            raise ValueError(f"method {self.name!r}: data_used {self.data_used!r} not in {DATA_USED}")


_FIXED_BITS = dict(size_budget_bytes=None, avg_bits=None)  # methods that keep the fixed low/high pairing


def _rtn_config(cfg: QuantConfig) -> QuantConfig:
    return replace(cfg, compensation=False, recal="none", rounding="nearest", **_FIXED_BITS)


def _compensating(config: Callable[[QuantConfig], QuantConfig]) -> Callable[..., MixedPrecisionModel]:
    def run(model, cfg, input_shape, arch=None, real_inputs=None, progress=None, synthetic=None):
        from .compensate import compensate
        return compensate(model, config(cfg), input_shape, arch=arch, real_inputs=real_inputs, progress=progress,
                          synthetic=synthetic)
    return run


def _dfq(model, cfg, input_shape, **kwargs):
    from .dfq import dfq
    return dfq(model, cfg, input_shape, **kwargs)


def _gdfq(model, cfg, input_shape, arch=None, progress=None, **_):
    from .gdfq import gdfq
    return gdfq(model, cfg, input_shape, arch=arch, progress=progress)


def fixed_pairing_bytes(model, cfg: QuantConfig, arch: str | None) -> int:
    """Packed size of ``model`` under the fixed low/high pairing at ``cfg.bits`` (round-to-nearest: same size)."""
    from ..io.container import packed_nbytes
    from .compensate import compensate
    return packed_nbytes(compensate(model, _rtn_config(cfg), (1, 1, 1), arch=arch))


def _dfmpc_alloc(model, cfg, input_shape, arch=None, **kwargs):
    from .compensate import compensate
    if not cfg.allocating:
        cfg = replace(cfg, size_budget_bytes=fixed_pairing_bytes(model, cfg, arch))
    return compensate(model, cfg, input_shape, arch=arch, **kwargs)


_DFMPC_PAPER = dict(compensation=True, c_mode="paper", recal="none", rounding="nearest", **_FIXED_BITS)
_ZEROQ = dict(compensation=False, rounding="nearest", recal="synthetic", recal_scope="all", **_FIXED_BITS)


def _spec(name, description, data_used, fine_tuning, config, run=None) -> MethodSpec:
    return MethodSpec(name, description, data_used, fine_tuning, config, run or _compensating(config))


#: name -> MethodSpec, in table order
METHODS: dict[str, MethodSpec] = {s.name: s for s in (
    _spec("rtn", "round-to-nearest at the same bits, no compensation, FP statistics", "none", False, _rtn_config),
    _spec("dfq", "DFQ (Nagel 2019): cross-layer equalization + analytic bias correction", "none", False,
          _rtn_config, _dfq),
    _spec("dfmpc", "DF-MPC: low/high pairs, closed-form c, data-free BN statistics", "synthetic", False,
          lambda cfg: cfg),
    _spec("dfmpc-paper", "DF-MPC as printed: closed-form c folded, FP statistics, nearest rounding", "none", False,
          lambda cfg: replace(cfg, **_DFMPC_PAPER)),
    _spec("zeroq", "ZeroQ: BN-statistics-matched synthetic inputs, every BN re-estimated", "synthetic", False,
          lambda cfg: replace(cfg, **_ZEROQ)),
    _spec("gdfq", "GDFQ (Xu 2020): generator (BN statistics + class boundary) then STE fine-tuning", "synthetic", True,
          lambda cfg: replace(cfg, **_FIXED_BITS), _gdfq),
    _spec("dfmpc-alloc", "DF-MPC with per-layer widths from data-free sensitivity under the same size budget",
          "synthetic", False, lambda cfg: cfg, _dfmpc_alloc),
)}

#: QuantConfig field -> the build flag that sets it (for override warnings)
FLAGS = {"compensation": "--c-mode", "c_mode": "--c-mode", "recal": "--recal", "recal_scope": "--recal-scope",
         "rounding": "--rounding", "per_channel": "--per-channel", "synth_samples": "--synth-samples",
         "synth_steps": "--synth-steps", "lambda1": "--lambda1", "lambda2": "--lambda2",
         "size_budget_bytes": "--size-budget-mb", "avg_bits": "--avg-bits", "finetune_steps": "--finetune-steps"}

#: fields a method does not read at all (its own procedure replaces them)
_IGNORES = {
    "rtn": ("size_budget_bytes", "avg_bits", "finetune_steps"),
    "dfq": ("recal", "recal_scope", "synth_samples", "synth_steps", "size_budget_bytes", "avg_bits", "finetune_steps"),
    "dfmpc": ("finetune_steps",),
    "dfmpc-paper": ("size_budget_bytes", "avg_bits", "finetune_steps"),
    "zeroq": ("size_budget_bytes", "avg_bits", "finetune_steps"),
    "gdfq": ("compensation", "c_mode", "recal", "recal_scope", "rounding", "synth_samples", "synth_steps",
             "lambda1", "lambda2", "size_budget_bytes", "avg_bits"),
    "dfmpc-alloc": ("finetune_steps",),
}


def method_overrides(name: str, cfg: QuantConfig, explicit: frozenset[str] | set[str]) -> list[str]:
    """Build flags the user set (``explicit``: QuantConfig field names) that method ``name`` replaces or ignores.

    Returns:
        One message per flag, e.g. ``"--rounding gptq is replaced by zeroq's nearest"``.
    """
    mine = METHODS[name].config(cfg)
    out, seen = [], set()
    for f in sorted(explicit):
        flag = FLAGS.get(f)
        if flag is None or flag in seen:
            continue
        if f in _IGNORES.get(name, ()):
            out.append(f"{flag} is not used by {name}")
            seen.add(flag)
        elif getattr(mine, f) != getattr(cfg, f):
            out.append(f"{flag} {_show(getattr(cfg, f))} is replaced by {name}'s {_show(getattr(mine, f))}")
            seen.add(flag)
    return out


def _show(v) -> str:
    return ("on" if v else "off") if isinstance(v, bool) else str(v)


def method_config(name: str, cfg: QuantConfig) -> QuantConfig:
    """The QuantConfig method ``name`` runs under, given the user's ``cfg``."""
    return METHODS[name].config(cfg)


def run_method(name: str, model: nn.Module, cfg: QuantConfig, input_shape: tuple[int, int, int],
               **kwargs) -> MixedPrecisionModel:
    """Run registered method ``name`` (see :data:`METHODS`); ``kwargs`` go to its ``run``.

    Example::

        >>> net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3)).eval()
        >>> mp = run_method("dfq", net, QuantConfig(), (3, 16, 16))
        >>> sorted(q.role for q in mp.layers.values())
        ['high-compensating', 'low']
    """
    spec = METHODS[name]
    t0 = time.perf_counter()
    log.info("method %s: start", name)
    mp = spec.run(model, cfg, input_shape, **kwargs)
    log.info("method %s: finished in %.3f s", name, time.perf_counter() - t0)
    return mp
