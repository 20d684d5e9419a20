"""``build --from-report``: run a build again from what its report.json recorded.

What is replayed, all from the report (format 2 with a ``build`` section, dfmpc-deploy >= 0.3):

* the build options as the build ran with them (``build.options``: model, weights, weights format, method, data,
  limit, normalisation, targets, batch sizes, packing, seed, ...), only ``--out`` and ``--force`` from the command line;
* the weights file at its recorded absolute path, refused in one line unless its SHA-256 is the recorded one;
* every pass configuration exactly as it ran (``recipe.passes``), handed to the recipe as settings. Nothing here
  knows a pass by name: a field the recipe pins is left to the recipe (and must have the recorded value), every other
  field is a setting; after the build the passes that ran and their configurations must equal the recorded ones, or
  the replay fails (exit 1) naming the first difference. A recipe that gained, lost or reordered passes since the
  report was written is refused before any work;
* the threads and the device the passes ran with (``runtime``): float reductions depend on the thread count.

The same machine, version and seed give a bit-identical ``model.dfmpc`` (tests/test_replay.py).
"""
from __future__ import annotations

import argparse
import dataclasses
import logging
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from .build import NOT_REPLAYED, BuildConfig, run_build
from .core.options import flag_of, options_of
from .errors import DfmpcError, UsageError
from .passes.base import json_value, validate_settings
from .passes.recipes import get_recipe
from .report.files import read_report
from .report.model import BuildSettings, PassRecord, Report
from .zoo.models import file_sha256

__all__ = ["config_from_report", "settings_from_passes", "replay", "check_replayed"]

log = logging.getLogger("dfmpc_deploy")


def settings_from_passes(recipe_name: str, passes: Sequence[PassRecord], where: str = "report") -> dict[str, Any]:
    """The settings that make recipe ``recipe_name`` run ``passes`` with exactly their recorded configurations.

    Args:
        recipe_name: the recipe that ran (``report.recipe.name``).
        passes: the recorded passes, in order.
        where: the report, for messages.

    Returns:
        ``{field: JSON value}`` for every field of every pass that the recipe does not pin.

    Raises:
        DfmpcError: the recipe is unknown, runs other passes than were recorded, pins a field to another value than
            the recorded one, or two passes recorded different values for one shared field.
    """
    recipe = get_recipe(recipe_name)
    now = [cls.name for cls, _ in recipe.passes]
    then = [p.name for p in passes]
    if now != then:
        raise DfmpcError(f"{where}: recipe {recipe_name} ran the passes {' -> '.join(then) or '(none)'}, this "
                         f"dfmpc-deploy's runs {' -> '.join(now)}: the same model cannot be rebuilt with this version")
    settings: dict[str, Any] = {}
    owner: dict[str, str] = {}
    for (_, pins), rec in zip(recipe.passes, passes):
        for k, v in rec.config.items():
            if k in pins:
                if json_value(pins[k]) != v:
                    raise DfmpcError(f"{where}: pass {rec.name} ran with {k}={v!r} but recipe {recipe_name} now pins "
                                     f"{json_value(pins[k])!r}: the same model cannot be rebuilt with this version")
                continue
            if k in settings and settings[k] != v:
                raise DfmpcError(f"{where}: passes {owner[k]} and {rec.name} recorded different values of {k} "
                                 f"({settings[k]!r}, {v!r}); one setting cannot give both")
            settings[k], owner[k] = v, rec.name
        if rec.name == "quantize" and "grid" not in rec.config:
            settings["grid"], owner["grid"] = "dorefa", rec.name  # recorded before --grid existed: DoReFa only
    return settings


def _option(f: dataclasses.Field, value: Any) -> Any:
    """A recorded option value checked as its flag checks it (the CLI's parser and choices); lists become tuples."""
    meta = f.metadata
    if value is None:
        return None
    if meta["action"] in ("store_true", "store_false"):
        if not isinstance(value, bool):
            raise ValueError("expected true or false")
        return value
    if isinstance(value, list):
        if meta["nargs"]:
            return tuple(value)  # checked by BuildConfig
        value = ",".join(map(str, value))
    if meta["parse"] is not None:
        value = meta["parse"](str(value))
    elif not isinstance(value, str):
        raise ValueError("expected a string")
    if meta["choices"] and value not in meta["choices"]:
        raise ValueError(f"not one of {', '.join(meta['choices'])}")
    return value


def _options(options: Mapping[str, Any], where: str) -> dict[str, Any]:
    fields = {f.name: f for f in options_of(BuildConfig) if f.name not in NOT_REPLAYED}
    unknown = sorted(set(options) - set(fields))
    if unknown:
        raise DfmpcError(f"{where}: the build used option(s) {', '.join(unknown)} that this dfmpc-deploy does not "
                         f"know; replay it with the version that wrote it")
    out = {}
    for k, v in options.items():
        try:
            out[k] = _option(fields[k], v)
        except (argparse.ArgumentTypeError, UsageError, ValueError) as err:
            raise DfmpcError(f"{where}: recorded option {flag_of(fields[k])} {str(v)[:60]!r} is invalid: {err}") \
                from None
    return out


def _check_weights(b: BuildSettings, where: str) -> str | None:
    if b.weights_sha256 is None:
        return None
    path = b.weights_path or b.options.get("weights", "")
    if not os.path.lexists(path):
        raise DfmpcError(f"{where}: the weights file '{path}' it was built from is gone; put it back (SHA-256 "
                         f"{b.weights_sha256})")
    digest = file_sha256(path)
    if digest != b.weights_sha256:
        raise DfmpcError(f"{where}: the weights file '{path}' changed since the build (SHA-256 {digest[:16]}..., the "
                         f"report records {b.weights_sha256[:16]}...): refusing to rebuild from other weights")
    return path


def config_from_report(report: str | os.PathLike, out: str | os.PathLike | None = None,
                       force: bool = False) -> tuple[BuildConfig, Report]:
    """The :class:`~dfmpc_deploy.build.BuildConfig` that rebuilds the model of ``report``, writing into ``out``.

    Args:
        report: a report.json (or the directory holding it).
        out, force: where to write (as ``--out`` / ``--force``; default: ``build``'s).

    Returns:
        ``(config, the report read)``.

    Raises:
        ReportError: unreadable or invalid report. DfmpcError: it records no build settings, it was built from a
            Python module, its weights file is missing or changed (checksum), or its recipe cannot be replayed by
            this version (one line each).
    """
    rep = read_report(report)
    where = str(report)
    if rep.build is None:
        raise DfmpcError(f"{where}: the report records no build settings (written by dfmpc-deploy 0.2.0 or older, or "
                         f"converted from format 1); rebuild with the flags it was built with")
    if rep.weights == "module":
        raise DfmpcError(f"{where}: built from an nn.Module given in Python, whose code a report cannot hold; "
                         f"rebuild it with dfmpc_deploy.build(module, ...)")
    options = _options(rep.build.options, where)
    weights = _check_weights(rep.build, where)
    if weights is not None:
        options["weights"] = weights
    settings = settings_from_passes(rep.recipe.name, rep.recipe.passes, where)
    try:
        validate_settings(settings)
    except (UsageError, TypeError, ValueError) as err:  # a pass refuses a recorded value (an edited report)
        raise DfmpcError(f"{where}: a recorded pass configuration is invalid: {err}") from None
    if rep.runtime is not None:  # what the passes ran with: float reductions depend on the thread count
        options["threads"], options["device"] = rep.runtime.threads, rep.runtime.device
        if rep.runtime.torch != torch.__version__:
            log.warning("warning: %s was built with torch %s, this is %s: the model may differ in the last bits",
                        where, rep.runtime.torch, torch.__version__)
    try:
        if out is not None:
            options["out"] = Path(out)
        cfg = BuildConfig(model=rep.model, **options, settings=settings, force=force)
    except TypeError as err:
        raise DfmpcError(f"{where}: its build options do not fit this dfmpc-deploy ({err})") from None
    return cfg, rep


def check_replayed(recorded: Report, rebuilt: Report) -> None:
    """The rebuilt report's recipe must be the recorded one, pass by pass and field by field.

    Raises:
        DfmpcError: naming the first pass or field that differs.
    """
    a, b = recorded.recipe, rebuilt.recipe
    if a.name != b.name or [p.name for p in a.passes] != [p.name for p in b.passes]:
        raise DfmpcError(f"the rebuild ran {b.name} ({' -> '.join(p.name for p in b.passes)}), the report records "
                         f"{a.name} ({' -> '.join(p.name for p in a.passes)})")
    for p, q in zip(a.passes, b.passes):
        for k in sorted(set(p.config) | set(q.config)):
            if p.config.get(k) != q.config.get(k):
                raise DfmpcError(f"the rebuild ran pass {p.name} with {k}={q.config.get(k)!r}, the report records "
                                 f"{p.config.get(k)!r}")


def replay(report: str | os.PathLike, out: str | os.PathLike | None = None, force: bool = False,
           progress: Any = None, warn: Callable[[str], None] | None = None) -> Report:
    """Rebuild the model of ``report`` into ``out`` (see the module docstring) and check the passes ran as recorded.

    Returns:
        The new build's report.

    Raises:
        DfmpcError: see :func:`config_from_report`; after the build, a pass that ran with another configuration
            (the output is written; the caller exits 1).
    """
    cfg, recorded = config_from_report(report, out, force)
    log.info("replaying %s: %s %s, %d passes", report, cfg.model, cfg.method, len(recorded.recipe.passes))
    rebuilt = run_build(cfg, progress=progress, warn=warn)
    check_replayed(recorded, rebuilt)
    return rebuilt
