"""Configuration fields that declare their own command-line flag, so each flag is spelled exactly once.

A pass's config (or the build's) is a frozen dataclass; a field made with :func:`option` carries its flag, help text,
choices and parser in ``field.metadata``. The CLI builds its arguments from those fields (:func:`add_arguments`),
with ``argparse.SUPPRESS`` defaults, so the parsed namespace holds exactly the flags the user gave: nothing has to
re-read ``argv`` to learn which flags were set, and the default lives only on the field.

Flags that take several values accept ``1 32`` and ``1,32`` alike (:func:`split_values`).
"""
from __future__ import annotations

import argparse
import dataclasses
import math
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from ..errors import UsageError

__all__ = ["option", "option_like", "flag_of", "options_of", "add_arguments", "split_values",
           "finite_float", "float32_problem", "positive_int", "nonnegative_int", "positive_float", "int_in",
           "float_in", "require_finite"]


def option(default: Any = dataclasses.MISSING, *, flag: str | None = None, help: str = "",
           parse: Callable[[str], Any] | None = None, choices: Sequence[str] | None = None, nargs: str | None = None,
           metavar: str | None = None, action: str | None = None, default_factory: Any = dataclasses.MISSING,
           show_default: bool = True) -> Any:
    """A dataclass field with CLI metadata.

    Args:
        default, default_factory: as for :func:`dataclasses.field`.
        flag: ``--kebab-case`` flag that sets this field (None: not settable from the command line).
        help: one-line help; the default is appended unless ``show_default`` is False.
        parse: ``str -> value`` (raise ``argparse.ArgumentTypeError`` or ``UsageError`` with the fix).
        choices, nargs, metavar, action: as for ``argparse.add_argument`` (``action="store_true"`` for switches).
    """
    meta = {"flag": flag, "help": help, "parse": parse, "choices": tuple(choices) if choices else None,
            "nargs": nargs, "metavar": metavar, "action": action, "show_default": show_default}
    if default_factory is not dataclasses.MISSING:
        return dataclasses.field(default_factory=default_factory, metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def option_like(cls: type, name: str, **changes: Any) -> Any:
    """A new field declaring the same flag, help, parser and default as field ``name`` of dataclass ``cls``, with
    ``changes`` to the metadata or ``default``: one flag spelled once for several configs (``build`` and ``export``
    share ``--target``, ``--batch-sizes``, ``--out``, ...)."""
    f = next(f for f in dataclasses.fields(cls) if f.name == name)
    default = changes.pop("default", f.default)
    meta = {**f.metadata, **changes}
    if default is dataclasses.MISSING and f.default_factory is not dataclasses.MISSING:
        return dataclasses.field(default_factory=f.default_factory, metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def flag_of(f: dataclasses.Field) -> str | None:
    """The flag a field declares, or None."""
    return f.metadata.get("flag")


def options_of(cls: type) -> list[dataclasses.Field]:
    """The fields of dataclass ``cls`` that declare a flag."""
    return [f for f in dataclasses.fields(cls) if flag_of(f)]


def _default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return None


def _show(v: Any) -> str:
    if isinstance(v, bool):
        return "on" if v else "off"
    if isinstance(v, (tuple, list)):
        return " ".join(map(str, v))
    return str(v)


def add_arguments(parser: argparse.ArgumentParser | Any, fields: Iterable[dataclasses.Field], seen: set[str]) -> None:
    """Add one argument per field not yet in ``seen`` (flags shared by several configs are added once).

    Every argument's default is ``argparse.SUPPRESS``: the namespace holds only what the user gave, under the field
    name.
    """
    for f in fields:
        flag = flag_of(f)
        if flag is None or flag in seen:
            continue
        seen.add(flag)
        m = f.metadata
        help_text = m["help"]
        d = _default(f)
        if m["show_default"] and d not in (None, False) and m["action"] is None:
            help_text += f" (default: {_show(d)})"
        kw: dict[str, Any] = {"dest": f.name, "default": argparse.SUPPRESS, "help": help_text}
        if m["action"]:
            kw["action"] = m["action"]
        else:
            if m["parse"]:
                kw["type"] = _for_argparse(m["parse"])
            if m["choices"]:
                kw["choices"] = list(m["choices"])
            if m["nargs"]:
                kw["nargs"] = m["nargs"]
            if m["metavar"]:
                kw["metavar"] = m["metavar"]
        parser.add_argument(flag, **kw)


def _for_argparse(parse: Callable[[str], Any]) -> Callable[[str], Any]:
    """``parse`` with UsageError turned into argparse's own error (exit 2 with the usage line)."""
    def wrapped(text: str) -> Any:
        try:
            return parse(text)
        except UsageError as err:
            raise argparse.ArgumentTypeError(str(err)) from None
    wrapped.__name__ = getattr(parse, "__name__", "value")
    return wrapped


def split_values(values: Sequence[str] | str, what: str = "value") -> list[str]:
    """``["1", "32"]``, ``["1,32"]`` and ``"1,32"`` all give ``["1", "32"]``; empty items are refused.

    Args:
        values: what argparse collected (``nargs="+"``) or one string.
        what: the flag, for the error message.
    """
    items = [values] if isinstance(values, str) else [str(v) for v in values]
    out = [v.strip() for item in items for v in item.split(",")]
    if any(not v for v in out):
        raise UsageError(f"bad {what} {' '.join(items)!r}: empty value; give values separated by spaces or commas, "
                         f"e.g. 1,8,32")
    return out


#: float32's largest finite value and smallest normal one: a flag's value is used in float32 arithmetic, where a value
#: finite in float64 (1e39) is infinite and a tiny one (1e-45) is denormal or 0 (dividing by it gives infinity)
F32_MAX = 3.4028234663852886e38
F32_TINY = 1.1754943508222875e-38


def float32_problem(v: float) -> str | None:
    """Why ``v`` is no usable float32 value (NaN, infinite, beyond float32's range, or non-zero below its smallest
    normal value), or None."""
    if not math.isfinite(v):
        return "is not a finite number"
    if abs(v) > F32_MAX:
        return f"is beyond float32's range (|x| <= {F32_MAX:.4g}), where it would be infinite"
    if v != 0 and abs(v) < F32_TINY:
        return f"is below float32's smallest normal value ({F32_TINY:.4g}), where it is denormal or 0"
    return None


def finite_float(text: str) -> float:
    """A float that is finite in float32 (see :func:`float32_problem`)."""
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not a number") from None
    why = float32_problem(v)
    if why:
        raise argparse.ArgumentTypeError(f"'{text}' {why}")
    return v


def positive_float(text: str) -> float:
    """A finite float > 0."""
    v = finite_float(text)
    if v <= 0:
        raise argparse.ArgumentTypeError(f"'{text}' is not a positive number")
    return v


def _int(text: str) -> int:
    try:
        return int(str(text).strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not an integer") from None


def positive_int(text: str) -> int:
    """An integer >= 1 (at most 2^31 - 1, so nothing downstream overflows)."""
    v = _int(text)
    if not 1 <= v < 2 ** 31:
        raise argparse.ArgumentTypeError(f"'{text}' is not a positive integer below 2^31")
    return v


def nonnegative_int(text: str) -> int:
    """An integer >= 0 (at most 2^31 - 1)."""
    v = _int(text)
    if not 0 <= v < 2 ** 31:
        raise argparse.ArgumentTypeError(f"'{text}' is not an integer in [0, 2^31)")
    return v


def int_in(lo: int, hi: int) -> Callable[[str], int]:
    """A parser for integers in ``[lo, hi]``."""
    def parse(text: str) -> int:
        v = _int(text)
        if not lo <= v <= hi:
            raise argparse.ArgumentTypeError(f"'{text}' is not an integer in [{lo}, {hi}]")
        return v
    return parse


def float_in(lo: float, hi: float) -> Callable[[str], float]:
    """A parser for finite floats in ``[lo, hi]``."""
    def parse(text: str) -> float:
        v = finite_float(text)
        if not lo <= v <= hi:
            raise argparse.ArgumentTypeError(f"'{text}' is not in [{lo}, {hi}]")
        return v
    return parse


def require_finite(name: str, value: float, lo: float | None = None, hi: float | None = None) -> None:
    """Raise UsageError unless ``value`` is a finite number within ``[lo, hi]`` (config ``__post_init__`` checks)."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and float32_problem(float(value)) is None
    ok = ok and (lo is None or value >= lo) and (hi is None or value <= hi)
    if not ok:
        rng = f" in [{lo if lo is not None else '-inf'}, {hi if hi is not None else 'inf'}]"
        raise UsageError(f"bad {name} {value!r}: need a finite number{rng if (lo, hi) != (None, None) else ''}")
