"""Format-1 reports (the untyped dict of dfmpc-deploy <= 0.1) read into a typed :class:`Report`.

Why this module is kept: nothing in the package calls it any more (build writes format 2 since 0.2), but
report.json files written by dfmpc-deploy <= 0.1 exist outside this repository, :func:`read_report` refuses them
with a hint naming :func:`report_from_v1` (report/model.py), and this converter is the only way to read one with
this version (``dfmpc_deploy.report.report_from_v1``, public). It goes when format 1 is no longer supported: delete
it with its export in ``report/__init__.py``, that hint and tests/report/test_legacy.py.

Format 1 did not record the runtime, the BN-statistics source, the synthesis details or the layer pairs: the
converted report leaves those sections out (they are optional for exactly this reason) and says so in its notes.
Its flat ``config``, ``diagnostics``, ``estimator`` and the passes' inner timings become one recipe pass named after
the method.
"""
from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from .model import (
    BUILD_STAGES,
    Accuracy,
    Allocation,
    Bits,
    Packing,
    PassRecord,
    Preprocessing,
    Recipe,
    Report,
    ReportError,
    Sizes,
)

__all__ = ["report_from_v1", "V1_NOTE"]

V1_NOTE = ("converted from report format 1: runtime, BN-statistics source, synthesis details and layer pairs were "
           "not recorded")

_V1_KEYS = {"format_version", "model", "weights", "bits", "method", "estimator", "config", "input_shape",
            "preprocessing", "accuracy", "packed_file", "packing", "size_bytes", "latency_ms", "speedup", "threads",
            "parity", "engine", "artifacts", "timings_s", "diagnostics", "layers", "notes", "allocation", "targets"}
_FIXED = re.compile(r"\s*(\d+)\s*/\s*(\d+)\s*")
_MIXED = re.compile(r"\s*mixed\s+(\d+)\.\.(\d+)\b.*")


def _bits(text: Any) -> tuple[int, int, bool]:
    m = _FIXED.fullmatch(str(text)) or _MIXED.fullmatch(str(text))
    if m is None:
        raise ReportError(f"report.bits: {text!r} is neither 'LOW/HIGH' nor 'mixed LOW..HIGH (...)' (format 1)")
    return int(m.group(1)), int(m.group(2)), m.re is _MIXED


def report_from_v1(rep: Mapping[str, Any]) -> Report:
    """Read a format-1 report dict (``format_version`` 1 or absent, as build.py <= 0.1 passed it around).

    Args:
        rep: the parsed format-1 report.json.

    Returns:
        The typed report (``runtime``, ``statistics`` and ``pairs`` left out; see the module docstring).

    Raises:
        ReportError: not a format-1 report, or a section that does not fit its format-2 type (one line).
    """
    from ..passes.recipes import RECIPES  # lazy: recipes import torch, and the report package reads without it

    if not isinstance(rep, Mapping):
        raise ReportError(f"report: expected a JSON object, got {type(rep).__name__}")
    version = rep.get("format_version", 1)
    if version != 1:
        raise ReportError(f"report.format_version: {version!r} is not format 1")
    unknown = sorted(set(rep) - _V1_KEYS)
    if unknown:
        raise ReportError(f"report: unknown format-1 key{'s' if len(unknown) > 1 else ''} {', '.join(unknown[:5])}")
    for k in ("model", "weights", "bits", "method", "layers", "size_bytes"):
        if k not in rep:
            raise ReportError(f"report.{k}: missing required key (format 1)")
    method = rep["method"]
    if method not in RECIPES:
        raise ReportError(f"report.method: unknown method {method!r} (format 1 knows {', '.join(RECIPES)})")
    spec = RECIPES[method]

    def section(name: str, value: Any) -> Any:
        return Report.section_from_dict(name, value)

    layers = tuple(section("layers", rep["layers"]))
    low, high, mixed = _bits(rep["bits"])
    timings = dict(rep.get("timings_s") or {})
    stages = {k: v for k, v in timings.items() if k in BUILD_STAGES}
    diagnostics = {k: v for k, v in (rep.get("diagnostics") or {}).items() if k != "allocation"}  # typed below
    info = {**diagnostics, **{k: v for k, v in timings.items() if k not in BUILD_STAGES}}
    if "estimator" in rep:
        info["estimator"] = rep["estimator"]
    seconds = timings.get("compensate", info.get("total_seconds", 0.0))
    recipe = Recipe(name=method, description=spec.description,
                    data_used=spec.data_used,
                    fine_tuning=spec.fine_tuning,
                    passes=(_record(method, rep.get("config") or {}, seconds, info),))
    pre = rep.get("preprocessing") or {}
    kw: dict[str, Any] = dict(
        model=rep["model"], weights=rep["weights"], method=method, bits=Bits.from_rows(layers, low=low, high=high,
                                                                                      mixed=mixed),
        recipe=recipe, input_shape=section("input_shape", rep.get("input_shape")),
        preprocessing=_decoded(Preprocessing, {"mean": pre.get("mean"), "std": pre.get("std"),
                                               "resize": pre.get("resize")}, "report.preprocessing"),
        size_bytes=_decoded(Sizes, rep["size_bytes"], "report.size_bytes"), timings_s=section("timings_s", stages),
        layers=layers, notes=(*section("notes", rep.get("notes") or ()), V1_NOTE),
        targets=section("targets", rep.get("targets") or ()))
    for name, cls in (("accuracy", Accuracy), ("allocation", Allocation), ("packing", Packing)):
        if rep.get(name):
            kw[name] = _decoded(cls, rep[name], f"report.{name}")
    for name in ("packed_file", "latency_ms", "speedup", "threads", "parity", "engine", "artifacts"):
        if rep.get(name):
            kw[name] = section(name, rep[name])
    try:
        return Report(**kw)
    except (TypeError, ValueError) as err:
        raise ReportError(f"report: {err}") from None


def _decoded(cls, data, where):
    if not isinstance(data, Mapping):
        raise ReportError(f"{where}: expected an object, got {type(data).__name__}")
    try:
        return cls.from_dict(data)
    except ReportError as err:
        raise ReportError(where + str(err).removeprefix(cls.__name__)) from None


def _record(name: str, config: Mapping[str, Any], seconds: float, info: dict[str, Any]) -> PassRecord:
    try:
        return PassRecord.from_dict({"name": name, "config": dict(config), "seconds": seconds, "info": info})
    except ReportError as err:
        raise ReportError(f"report (config, diagnostics or timings_s): {str(err).removeprefix('PassRecord')}") from None
