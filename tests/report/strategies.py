"""Hypothesis strategies for any valid typed report, derived from the dataclass annotations (like the codec)."""
from __future__ import annotations

import dataclasses
import typing
from typing import Any, Literal, Union

from hypothesis import strategies as st

from dfmpc_deploy.report import model as M
from dfmpc_deploy.report._codec import OMIT, PATTERNS, Section, Sha256

_TEXT = st.text(alphabet=st.characters(codec="utf-8"), max_size=10)  # anything: '<', '|', control characters


def _json() -> st.SearchStrategy:
    scalars = (st.none() | st.booleans() | st.integers(-10**9, 10**9)
               | st.floats(allow_nan=False, allow_infinity=False) | _TEXT)
    return st.recursive(scalars, lambda kids: st.lists(kids, max_size=3) | st.dictionaries(_TEXT, kids, max_size=3),
                        max_leaves=6)


def _number(tp: type, lo: float | None, hi: float | None) -> st.SearchStrategy:
    if tp is int:
        return st.integers(int(lo) if lo is not None else -10**6, int(hi) if hi is not None else 10**6)
    return st.floats(lo if lo is not None else -1e6, hi if hi is not None else 1e6, allow_nan=False)


def for_type(tp: Any, lo: float | None = None, hi: float | None = None) -> st.SearchStrategy:
    """A strategy for annotation ``tp`` (``lo``/``hi``: the field's range, for numbers)."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is Any:
        return _json()
    if isinstance(tp, type) and issubclass(tp, Section):
        return st.deferred(lambda: for_section(tp))
    if tp is type(None):
        return st.none()
    if tp is bool:
        return st.booleans()
    if tp in (int, float):
        return _number(tp, lo, hi)
    if tp is str:
        return _TEXT
    if tp is Sha256:
        return st.binary(min_size=32, max_size=32).map(bytes.hex)
    if tp in PATTERNS:
        return st.integers(1, 512).map(str)
    if origin is Literal:
        return st.sampled_from(args)
    if origin is Union or origin is typing.get_origin(int | None):
        return st.one_of([for_type(a, lo, hi) for a in args])
    if origin is tuple:
        if len(args) == 2 and args[1] is Ellipsis:
            return st.lists(for_type(args[0]), max_size=3).map(tuple)
        return st.tuples(*(for_type(a) for a in args))
    if origin is dict:
        return st.dictionaries(for_type(args[0]), for_type(args[1], lo, hi), max_size=3)
    raise TypeError(f"no strategy for {tp!r}")


def _sorted(kw: dict, names: tuple[str, ...]) -> None:
    vals = sorted(kw[n] for n in names)
    kw.update(zip(names, vals))


def _fix(cls: type, kw: dict) -> dict:
    """Make the cross-field relations hold (the codec checks them in ``_check``)."""
    if cls is M.Bits:
        _sorted(kw, ("low", "high"))
    elif cls is M.TopK:
        _sorted(kw, ("top1", "top5"))
    elif cls is M.LatencyStats:
        _sorted(kw, ("p50", "p90", "p99"))
    elif cls is M.Synthesis:
        kw["steps_run"] = min(kw["steps_run"], kw["steps_max"])
    elif cls is M.LayerRow:
        c = ("c_min", "c_mean", "c_max")
        if any(kw[n] is None for n in (*c, "c_folded")):
            kw.update(dict.fromkeys((*c, "c_folded")))
        else:
            _sorted(kw, c)
    elif cls is M.Accuracy:
        kw["results"] = {k: v for k, v in kw["results"].items() if k not in ("dataset", "n")}
    elif cls is M.Sizes:
        kw["onnx"] = {k: abs(v) for k, v in kw["onnx"].items() if k}
        if kw["engine"] is not None:
            kw["engine"] = {k: abs(v) for k, v in kw["engine"].items()}
    elif cls is M.Report:
        kw["method"] = kw["recipe"].name
        kw["input_shape"] = tuple(abs(d) + 1 for d in kw["input_shape"])
        kw["timings_s"] = {k: abs(v) for k, v in kw["timings_s"].items()}
    return kw


def for_section(cls: type) -> st.SearchStrategy:
    """Any valid instance of report section ``cls`` (omittable fields None or filled)."""
    strats = {}
    for f in dataclasses.fields(cls):
        tp = cls._hints[f.name] if "_hints" in cls.__dict__ else typing.get_type_hints(cls)[f.name]
        s = for_type(tp, f.metadata.get("minimum"), f.metadata.get("maximum"))
        strats[f.name] = (st.none() | s) if f.metadata.get(OMIT) else s
    return st.fixed_dictionaries(strats).map(lambda kw: cls(**_fix(cls, kw)))


reports = for_section(M.Report)
