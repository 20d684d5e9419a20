"""Passes and recipes: how a compensation method is put together.

* A **pass** is a frozen dataclass whose fields are its configuration (each field may declare its CLI flag with
  :func:`dfmpc_deploy.core.options.option`) plus one :meth:`Pass.apply` that works on a :class:`Context`.
* A **recipe** is a named list of passes, each with the fields it *pins* (e.g. ZeroQ pins ``rounding="nearest"``).
  :meth:`Recipe.configure` builds the pass instances from the user's settings: a setting no pass of the recipe
  reads is reported as "not used", a setting a pin replaces as "replaced" - derived from the pass fields, never
  from a hand-kept table.
* :func:`run_recipe` analyses the graph once, runs the passes in order and returns the
  :class:`~dfmpc_deploy.core.state.MixedPrecisionModel` with a :class:`RecipeRun` record of the exact pass configs
  that ran, their times and what each pass measured.
"""
from __future__ import annotations

import copy
import dataclasses
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, ClassVar, Literal

import torch
from torch import nn

from ..core.config import BitsSpec
from ..core.graph import GraphAnalysis
from ..core.options import flag_of
from ..core.quantizers import DEFAULT_GRID
from ..core.state import MixedPrecisionModel, QuantLayer
from ..core.stats import bn_status
from ..core.validate import check_weights
from ..errors import DfmpcError, UsageError

__all__ = ["Pass", "Context", "PassRecord", "RecipeRun", "Recipe", "run_recipe", "json_value", "register_recipes"]

log = logging.getLogger("dfmpc_deploy")


def json_value(v: Any) -> Any:
    """A config value as JSON (enums by value, BitsSpec as ``"2/6"``, tuples as lists)."""
    if isinstance(v, Enum):
        return v.value
    if isinstance(v, BitsSpec):
        return str(v)
    if isinstance(v, (tuple, list)):
        return [json_value(x) for x in v]
    if isinstance(v, dict):
        return {str(k): json_value(x) for k, x in v.items()}
    return v


@dataclass
class Context:
    """What the passes of one recipe run share. Passes read and update it in order.

    Attributes:
        fp_model: the FP32 reference the quantized model approximates (eval mode; a pass that changes the reference
            function-preservingly, such as equalisation, replaces it by its own copy - the caller's model is never
            modified).
        model: the working copy that ends up quantized.
        graph: the graph analysis of the architecture (traced once).
        input_shape: (C, H, W) of one input.
        device: where the passes compute.
        seed: seed for everything random.
        arch: architecture name for the result.
        layers: ``{fqn: QuantLayer}`` once the quantize pass has run.
        bits: the low/high widths the quantize pass used (later passes choose within them).
        per_channel: whether the quantizer ranges are per output channel.
        grid: the k-bit grid the quantize pass used (``int`` or ``dorefa``); re-quantized layers use it too.
        inputs: calibration inputs (synthetic, or real for the labelled reference), None when there are none.
        estimator: one line saying where the low-bit layers' BN statistics come from.
        real_inputs: real images, only for the labelled real-data reference.
        bn_status: what the model's BN layers carry: ``real``, ``identity`` or ``absent`` (core.stats).
        progress: optional object with ``task(label) -> update(done, total, *extra)`` and ``say(message)``.
        shared: values one pass hands to a later one (e.g. DFQ's pre-activation statistics).
    """

    fp_model: nn.Module
    model: nn.Module
    graph: GraphAnalysis
    input_shape: tuple[int, int, int]
    device: torch.device = torch.device("cpu")
    seed: int = 0
    arch: str = ""
    layers: dict[str, QuantLayer] = field(default_factory=dict)
    bits: BitsSpec = BitsSpec(2, 6)
    per_channel: bool = False
    grid: str = DEFAULT_GRID
    inputs: torch.Tensor | None = None
    estimator: str = "none (FP statistics kept)"
    real_inputs: torch.Tensor | None = None
    bn_status: str = "real"
    progress: Any = None
    shared: dict[str, Any] = field(default_factory=dict)

    def task(self, label: str) -> Callable[..., None] | None:
        """A progress callback ``update(done, total, *extra)`` for a long step, or None when nobody listens."""
        return self.progress.task(label) if self.progress is not None else None


class Pass:
    """Base of every pass: subclasses are frozen dataclasses (their fields are the configuration) with one apply."""

    name: ClassVar[str] = ""

    def apply(self, ctx: Context) -> dict[str, Any]:
        """Do the pass's work on ``ctx``; returns what it measured (JSON-ready scalars / small dicts)."""
        raise NotImplementedError

    def config(self) -> dict[str, Any]:
        """The configuration as JSON (every field, including the pinned and default ones)."""
        return {f.name: json_value(getattr(self, f.name)) for f in dataclasses.fields(self)}  # type: ignore[arg-type]


@dataclass(frozen=True)
class PassRecord:
    """One pass as it ran: its name, exact configuration, wall time and measurements."""

    name: str
    config: dict[str, Any]
    seconds: float
    info: dict[str, Any]


@dataclass(frozen=True)
class RecipeRun:
    """A recipe as it ran (what :attr:`MixedPrecisionModel.config` holds).

    Attributes:
        recipe: the recipe's name.
        passes: one record per pass, in order.
        overrides: one message per user setting the recipe replaced or did not use.
        bn_status: what the model's BN layers carried (``real`` / ``identity`` / ``absent``).
    """

    recipe: str
    passes: tuple[PassRecord, ...]
    overrides: tuple[str, ...] = ()
    bn_status: str = "real"

    def record(self, name: str) -> PassRecord | None:
        """The record of the pass called ``name``, if it ran."""
        return next((p for p in self.passes if p.name == name), None)


PassSpec = tuple[type[Pass], Mapping[str, Any]]


def _show(v: Any) -> str:
    if isinstance(v, bool):
        return "on" if v else "off"
    return str(json_value(v))


@dataclass(frozen=True)
class Recipe:
    """A named list of passes with the fields each one pins.

    Attributes:
        name: registry key (``--method``).
        description: one line for tables and ``--help``.
        data_used: ``none`` | ``synthetic`` | ``real`` (what the method reads besides the weights).
        fine_tuning: whether weights are trained by gradient steps.
        passes: ``(pass class, {field: pinned value})`` in order.
        without_statistics: what happens on a model whose BN layers carry no statistics (identity or absent, e.g.
            BN folded before publication): ``run`` (the recipe needs none), ``refuse`` (it cannot work: one line
            says why), or the name of the recipe that runs instead (said in the overrides).
        adapt: optional ``(graph, model, settings) -> (settings, messages)``: settings the user left unset that the
            recipe chooses from the model's graph (each choice said in the overrides).
    """

    name: str
    description: str
    data_used: Literal["none", "synthetic", "real"]
    fine_tuning: bool
    passes: tuple[PassSpec, ...]
    without_statistics: str = "run"
    adapt: Callable[[GraphAnalysis, nn.Module, dict[str, Any]], tuple[dict[str, Any], list[str]]] | None = None

    def __post_init__(self) -> None:
        if self.data_used not in ("none", "synthetic", "real"):
            raise ValueError(f"recipe {self.name!r}: data_used {self.data_used!r}")
        for cls, pins in self.passes:
            names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
            bad = set(pins) - names
            if bad:
                raise ValueError(f"recipe {self.name!r}: {cls.__name__} has no field(s) {sorted(bad)}")

    def fields(self) -> set[str]:
        """Every setting some pass of this recipe reads."""
        return {f.name for cls, _ in self.passes for f in dataclasses.fields(cls)}  # type: ignore[arg-type]

    def configure(self, settings: Mapping[str, Any]) -> tuple[list[Pass], list[str]]:
        """Pass instances for ``settings`` (field name -> value, the user's), and the override messages.

        Pins win over the user's settings; a pinned value the user set differently is reported as replaced, a
        setting no pass reads as not used (one message per flag).

        Raises:
            UsageError: a setting no pass of any recipe knows, or a bad value (from the pass's own validation).
        """
        messages: list[str] = []
        reported: set[str] = set()
        used = self.fields()
        for key in settings:
            if key not in used and key not in reported:
                messages.append(f"{_flag(key)} is not used by {self.name}")
                reported.add(key)
        out = []
        for cls, pins in self.passes:
            names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
            kwargs = {k: v for k, v in settings.items() if k in names}
            for k, v in pins.items():
                if k in kwargs and json_value(kwargs[k]) != json_value(v) and k not in reported:
                    messages.append(f"{_flag(k)} {_show(kwargs[k])} is replaced by {self.name}'s {_show(v)}")
                    reported.add(k)
                kwargs[k] = v
            out.append(cls(**kwargs))
        return out, messages


#: every pass class, registered by :func:`register_pass` (for flag lookup and settings validation)
PASS_CLASSES: list[type[Pass]] = []


def register_pass(cls: type[Pass]) -> type[Pass]:
    """Class decorator: make ``cls`` known to the CLI (its flags) and to settings validation."""
    PASS_CLASSES.append(cls)
    return cls


#: name -> Recipe: where a recipe's ``without_statistics`` fallback is found. passes/recipes.py registers the named
#: methods; the table imports every pass, and every pass imports this module, so this module cannot import it.
_RECIPES: dict[str, Recipe] = {}


def register_recipes(recipes: Mapping[str, Recipe]) -> None:
    """Make ``recipes`` (name -> Recipe) the recipes a ``without_statistics`` fallback may name."""
    _RECIPES.update(recipes)


def _flag(field_name: str) -> str:
    for cls in PASS_CLASSES:
        for f in dataclasses.fields(cls):  # type: ignore[arg-type]
            if f.name == field_name and flag_of(f):
                return str(flag_of(f))
    return field_name


def validate_settings(settings: Mapping[str, Any]) -> None:
    """Check every setting against the pass that declares it, whatever the recipe (a bad value never passes).

    Raises:
        UsageError: an unknown setting, or a value the declaring pass refuses.
    """
    known: dict[str, type[Pass]] = {}
    for cls in PASS_CLASSES:
        for f in dataclasses.fields(cls):  # type: ignore[arg-type]
            known.setdefault(f.name, cls)
    unknown = sorted(set(settings) - set(known))
    if unknown:
        raise UsageError(f"unknown setting(s) {', '.join(unknown)}: known settings are {', '.join(sorted(known))}")
    for cls in {known[k] for k in settings}:
        names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
        cls(**{k: v for k, v in settings.items() if k in names})


def _for_statistics(recipe: Recipe, status: str) -> tuple[Recipe, str | None]:
    """The recipe to run on a model whose BN statistics are ``status`` (see :attr:`Recipe.without_statistics`)."""
    if status == "real" or recipe.without_statistics == "run":
        return recipe, None
    if recipe.without_statistics == "refuse":
        raise DfmpcError(f"--method {recipe.name} needs the BN statistics a trained model carries, and this model's BN "
                         f"layers carry none ({status}: BN folded into the convolutions before publication?); use "
                         f"--method dfmpc (runs as dfmpc-weights), dfmpc-weights, dfq, dfmpc-paper or rtn, which work "
                         f"from the weights alone")
    alt = _RECIPES.get(recipe.without_statistics)
    if alt is None:
        raise DfmpcError(f"recipe {recipe.name}: its fallback without statistics, '{recipe.without_statistics}', is "
                         f"not a registered recipe (register_recipes; registered: {', '.join(_RECIPES) or 'none'})")
    return alt, (f"this model's BN layers carry no statistics ({status}), so {recipe.name} runs as {alt.name} "
                 f"({alt.description})")


def run_recipe(recipe: Recipe, model: nn.Module, input_shape: tuple[int, int, int],
               settings: Mapping[str, Any] | None = None, *, arch: str | None = None,
               real_inputs: torch.Tensor | None = None, progress: Any = None, device: str | torch.device = "cpu",
               seed: int = 0, graph: GraphAnalysis | None = None) -> MixedPrecisionModel:
    """Run ``recipe`` on a copy of ``model``.

    Args:
        recipe: the recipe (see :mod:`dfmpc_deploy.passes.recipes` for the registry).
        model: FP32 eval-mode model (not modified).
        input_shape: (C, H, W) of one input.
        settings: ``{field name: value}`` the user set (CLI flags map 1:1 to field names); the rest keep the pass
            defaults or the recipe's pins.
        arch: name recorded in the result.
        real_inputs: real images, only for the labelled real-data reference (``recal="real"``).
        progress: optional progress sink (``task(label)``, ``say(message)``).
        device: ``cpu``, ``cuda`` or a torch.device for the passes' work; the result lives on the CPU.
        seed: seed for everything random.
        graph: the model's graph analysis when the caller has it already (else traced here, once).

    Returns:
        The compensated model; ``config`` is the :class:`RecipeRun`, ``graph`` the analysis.
    """

    settings = dict(settings or {})
    validate_settings(settings)
    status = bn_status(model)
    recipe, note = _for_statistics(recipe, status)
    check_weights(model)  # non-finite or overflowing weights, bad BN statistics: refused here, naming the tensor
    t0 = time.perf_counter()
    graph = graph or GraphAnalysis.of(model)
    chosen: list[str] = []
    if recipe.adapt is not None:
        settings, chosen = recipe.adapt(graph, model, settings)
    passes, overrides = recipe.configure(settings)
    overrides = ([note] if note else []) + chosen + overrides
    dev = torch.device(device)
    fp = model.eval()
    ctx = Context(fp_model=fp, model=copy.deepcopy(fp).eval(), graph=graph, input_shape=tuple(input_shape),  # type: ignore[arg-type]
                  device=dev, seed=seed, arch=arch or type(model).__name__, real_inputs=real_inputs,
                  progress=progress, bn_status=status)
    records = []
    log.info("recipe %s: %s", recipe.name, " -> ".join(p.name for p in passes))
    try:
        for p in passes:
            t = time.perf_counter()
            info = p.apply(ctx) or {}
            seconds = time.perf_counter() - t
            records.append(PassRecord(p.name, p.config(), round(seconds, 4), json_value(info)))
            log.info("pass %s: %.3f s %s", p.name, seconds, info)
    finally:
        ctx.model.to("cpu")
    if not ctx.layers:
        raise DfmpcError(f"recipe {recipe.name} quantized no layer")
    run = RecipeRun(recipe.name, tuple(records), tuple(overrides), ctx.bn_status)
    info = {"total_seconds": round(time.perf_counter() - t0, 4)}
    return MixedPrecisionModel(ctx.model.eval(), ctx.layers, ctx.arch, run, ctx.estimator, info, graph=graph)
