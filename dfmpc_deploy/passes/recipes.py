"""The named recipes: every method of the comparison as a list of passes, on the same layers, grids and file format.

Every recipe quantizes the same layers to the same bits (the quantize pass: low/high per the graph's pairs, TWN
ternary / DoReFa grids) and returns a :class:`~dfmpc_deploy.core.state.MixedPrecisionModel`, so packing and size
accounting are identical; only how the weights and the float state (BN statistics, biases) are chosen differs.

=============  ======================================================================================================
``rtn``        quantize (round-to-nearest, FP statistics).
``dfq``        equalize -> quantize -> bias_correct (Nagel et al. 2019: CLE + analytic bias correction, data-free).
``dfmpc``      equalize_rows -> quantize -> calibrate -> allocate -> recalibrate -> solve_c: this project's default
               (per-tensor k-bit rows equalised into their BN, exact; synthetic inputs, statistics corrected by the
               change quantization makes or re-estimated (chosen on held-out synthetic inputs), error feedback on
               the low layers and every layer of at most 4 bits, grid search, int steps by output error where the
               synthesis is trusted; c solved and reported; allocation only under a budget). Recalibrate is guarded:
               undone when it does not bring the model closer to the FP model on held-out synthetic inputs
               (passes/guard.py).
``dfmpc-paper`` quantize -> solve_c (folded): the equations as printed (FP statistics, nearest rounding).
``zeroq``      quantize -> calibrate -> recalibrate (every BN, nearest rounding): Cai et al. 2020.
``gdfq``       quantize -> finetune: Xu et al. 2020 (generator + straight-through fine-tuning).
``dfmpc-alloc`` ``dfmpc`` whose allocate pass, given no budget, takes the fixed pairing's own packed size.
``dfmpc-weights`` equalize (per-tensor grids only) -> quantize -> fit_weights -> bias_from_weights: DF-MPC for models
               without BN statistics, from the weights alone (passes/weight_fit.py); per-channel grids unless
               the caller chose, where CLE cannot run (ReLU6 / SiLU links).
=============  ======================================================================================================

On a model whose BN layers carry no statistics (identity or absent: BN folded before publication), ``rtn``,
``dfq`` (without its bias correction), ``dfmpc-paper`` (c from the weights alone) and ``dfmpc-weights`` run as they
are, ``dfmpc`` and ``dfmpc-alloc`` run as ``dfmpc-weights`` (measured best of the data-free variants on the real
MobileNetV2, results/imagenet_mobilenet_ablation.json), and ``zeroq`` and ``gdfq``, which synthesise from the
statistics, refuse with the reason.

Importing this module registers every pass (their flags are what the CLI offers).
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..core.graph import GraphAnalysis
from ..core.state import MixedPrecisionModel
from ..errors import DfmpcError
from ..io.container import packed_nbytes
from .allocate import Allocate
from .base import PASS_CLASSES, PassSpec, Recipe, RecipeRun, register_recipes, run_recipe
from .calibrate import Calibrate
from .equalize import BiasCorrect, Equalize, EqualizeRows, cle_blocked_links
from .finetune import Finetune
from .quantize import Quantize
from .recalibrate import Recalibrate
from .solve_c import SolveC
from .weight_fit import CorrectBias, EqualizeForGrid, FitWeights

__all__ = ["RECIPES", "get_recipe", "compensate", "fixed_pairing_bytes", "PASS_CLASSES", "RecipeRun"]

def _grids_for_equalisation(graph: GraphAnalysis, model: nn.Module,
                            settings: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """``dfmpc-weights``: per-tensor grids only work after cross-layer equalisation (a per-tensor grid is as coarse
    as its widest channel); where links between convs pass through an activation CLE cannot rescale (ReLU6, SiLU),
    the grids are per channel unless the caller chose. Measured on the real MobileNetV2 at 6 bits: without CLE,
    per-tensor grids lose 6 points and per-channel grids 0.2 (README, "ImageNet MobileNetV2")."""
    if "per_channel" in settings:
        return settings, []
    blocked = cle_blocked_links(graph, dict(model.named_modules()))
    if not blocked:
        return settings, []
    acts = ", ".join(sorted({lk.act for lk in blocked}))
    return {**settings, "per_channel": True}, [
        f"per-channel grids: per-tensor grids need cross-layer equalisation, which {len(blocked)} conv links of this "
        f"model cannot take ({acts} is not positively homogeneous)"]


_DFMPC: tuple[PassSpec, ...] = ((EqualizeRows, {}), (Quantize, {}), (Calibrate, {}), (Allocate, {}), (Recalibrate, {}),
                                 (SolveC, {}))

#: name -> Recipe, in table order
RECIPES: dict[str, Recipe] = {r.name: r for r in (
    Recipe("rtn", "round-to-nearest at the same bits, no compensation, FP statistics", "none", False,
           ((Quantize, {}),)),
    Recipe("dfq", "DFQ (Nagel 2019): cross-layer equalization + analytic bias correction", "none", False,
           ((Equalize, {}), (Quantize, {}), (BiasCorrect, {}))),
    Recipe("dfmpc", "DF-MPC: low/high pairs, closed-form c, data-free BN statistics", "synthetic", False, _DFMPC,
           without_statistics="dfmpc-weights", guard=True),
    Recipe("dfmpc-paper", "DF-MPC as printed: closed-form c folded, FP statistics, nearest rounding", "none", False,
           ((Quantize, {}), (SolveC, {"c_mode": "paper"}))),
    Recipe("zeroq", "ZeroQ: BN-statistics-matched synthetic inputs, every BN re-estimated", "synthetic", False,
           ((Quantize, {}), (Calibrate, {"recal": "synthetic"}),
            (Recalibrate, {"rounding": "nearest", "recal_scope": "all", "stats": "absolute", "step_by": "weights"})),
           without_statistics="refuse"),
    Recipe("gdfq", "GDFQ (Xu 2020): generator (BN statistics + class boundary) then STE fine-tuning", "synthetic", True,
           ((Quantize, {}), (Finetune, {})), without_statistics="refuse"),
    Recipe("dfmpc-alloc", "DF-MPC with per-layer widths from data-free sensitivity under the same size budget",
           "synthetic", False,
           ((EqualizeRows, {}), (Quantize, {}), (Calibrate, {}), (Allocate, {"default_budget": "fixed-pairing"}),
            (Recalibrate, {}), (SolveC, {})), without_statistics="dfmpc-weights", guard=True),
    Recipe("dfmpc-weights", "DF-MPC from the weights alone (no BN statistics): CLE for per-tensor grids, grid step "
           "by weight error, bias correction from propagated moments", "none", False,
           ((EqualizeForGrid, {}), (Quantize, {}), (FitWeights, {"fit_c": False}), (CorrectBias, {})),
           adapt=_grids_for_equalisation),
)}
register_recipes(RECIPES)  # run_recipe finds a recipe's without_statistics fallback there


def get_recipe(name: str) -> Recipe:
    """The recipe called ``name``.

    Raises:
        DfmpcError: unknown name (the message lists the recipes).
    """
    if name not in RECIPES:
        raise DfmpcError(f"unknown method '{name}': choose one of {', '.join(RECIPES)}")
    return RECIPES[name]


def compensate(model: nn.Module, input_shape: tuple[int, int, int], recipe: str = "dfmpc", *, arch: str | None = None,
               real_inputs: torch.Tensor | None = None, progress: Any = None, device: str | torch.device = "cpu",
               seed: int = 0, **settings: Any) -> MixedPrecisionModel:
    """Quantize ``model`` to mixed precision with a named recipe (DF-MPC by default), without data by default.

    Args:
        model: FP32 eval-mode model built of Conv2d/BatchNorm2d/activations/Linear (not modified).
        input_shape: (C, H, W) of one input (for the synthetic samples).
        recipe: a name in :data:`RECIPES`.
        arch, real_inputs, progress, device, seed: see :func:`dfmpc_deploy.passes.base.run_recipe`.
        **settings: pass settings by field name, as the CLI flags (``bits="3/6"``, ``synth_steps=50``,
            ``c_mode="paper"``, ``rounding="nearest"``, ...).

    Returns:
        MixedPrecisionModel whose ``module`` computes with the compensated dequantised weights; ``config`` is the
        :class:`RecipeRun` (the exact pass configs that ran).

    Example::

        >>> net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3)).eval()
        >>> mp = compensate(net, (3, 16, 16), recal="none", rounding="nearest")
        >>> sorted(q.role.value for q in mp.layers.values())
        ['high-compensating', 'low']
    """
    return run_recipe(get_recipe(recipe), model, input_shape, settings, arch=arch, real_inputs=real_inputs,
                      progress=progress, device=device, seed=seed)


def fixed_pairing_bytes(model: nn.Module, bits: Any, arch: str | None = None) -> int:
    """Packed size of ``model`` under the fixed low/high pairing at ``bits`` (round-to-nearest: the same size)."""
    return packed_nbytes(compensate(model, (1, 1, 1), "rtn", arch=arch, bits=bits))
