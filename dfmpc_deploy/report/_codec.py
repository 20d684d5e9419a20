"""Type-driven JSON codec of the report dataclasses: normalising checks, strict decoding, JSON Schema generation.

One description of each section serves three purposes, so they cannot drift apart:

* construction: ``__post_init__`` checks (and normalises) every field against its annotation: lists become tuples,
  numpy scalars become ``int`` / ``float``, NaN and infinity are refused (JSON has neither);
* decoding: :meth:`Section.from_dict` refuses unknown keys, missing keys, wrong types and out-of-range values with a
  one-line message naming the path (``Report.layers[3].bits: expected an integer, got 'x'``);
* the JSON Schema (draft 2020-12) is generated from the same annotations and field metadata (``schema.py``).

Supported annotations: ``int``, ``float``, ``str``, ``bool``, ``None``, ``Literal[...]``, unions (``X | None``),
``tuple[X, ...]``, ``tuple[X, Y, Z]``, ``dict[str, X]``, :data:`Json` (any JSON value), ``NewType`` strings registered
in :data:`PATTERNS`, and :class:`Section` dataclasses.

Field kinds (see :func:`req`, :func:`opt`):

* required: always written; ``X | None`` means the key is present and may be ``null``;
* omittable (``opt``): written only when not None, so a build without ``--data`` has no ``accuracy`` key at all
  (the shape report.json has always had); ``null`` is refused for these.
"""
from __future__ import annotations

import dataclasses
import json
import math
import numbers
import re
import types
import typing
from collections.abc import Callable, Mapping
from typing import Any, ClassVar, Literal, NewType, Union

from ..errors import DfmpcError

__all__ = ["Json", "JsonScalar", "BatchSize", "Sha256", "PATTERNS", "ReportError", "Invalid", "SectionError",
           "SectionTypeError", "Section", "req", "opt", "convert", "decoded", "field_from_json", "encode",
           "type_schema", "doc_line"]

#: Any JSON value (finite numbers only). Used for the exact configuration of a pass.
Json = Any
#: A JSON scalar.
JsonScalar = None | bool | int | float | str
#: A batch size written as a JSON object key (``"1"``, ``"8"``, ``"32"``).
BatchSize = NewType("BatchSize", str)
#: A SHA-256 digest as 64 lowercase hex digits.
Sha256 = NewType("Sha256", str)
#: NewType strings and the pattern their values must match.
#: (``(?![\s\S])`` is the end of the string in both ECMA-262 and Python regexes; ``$`` also matches before a final
#: newline in Python's.)
PATTERNS: dict[Any, str] = {BatchSize: r"^[1-9][0-9]*(?![\s\S])", Sha256: r"^[0-9a-f]{64}(?![\s\S])"}

DOC, OMIT, MIN, MAX = "doc", "omit", "minimum", "maximum"


class ReportError(DfmpcError, ValueError):
    """A report (file or dict) that this version cannot read: one line naming the key and what is wrong."""


class Invalid(Exception):
    """A value that does not fit its annotation; ``path`` is relative (``.layers[3].bits``)."""

    def __init__(self, path: str, msg: str, type_error: bool = True):
        super().__init__(f"{path}: {msg}")
        self.path, self.msg, self.type_error = path, msg, type_error


class SectionError(ValueError):
    """Raised by a section's constructor for a value out of range or inconsistent (a bug in the caller)."""

    def __init__(self, cls: str, path: str, msg: str):
        super().__init__(f"{cls}{path}: {msg}")
        self.path, self.msg = path, msg


class SectionTypeError(TypeError):
    """Raised by a section's constructor for a value of the wrong type (a bug in the caller)."""

    def __init__(self, cls: str, path: str, msg: str):
        super().__init__(f"{cls}{path}: {msg}")
        self.path, self.msg = path, msg


def req(doc: str, *, default: Any = dataclasses.MISSING, minimum: float | None = None,
        maximum: float | None = None) -> Any:
    """A field that is always written (``default`` only spares the constructor argument)."""
    meta = {DOC: doc, MIN: minimum, MAX: maximum}
    if isinstance(default, (dict, list)):
        return dataclasses.field(default_factory=lambda: type(default)(default), metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def opt(doc: str, *, minimum: float | None = None, maximum: float | None = None) -> Any:
    """An optional section: default None, key left out of the JSON when None."""
    return dataclasses.field(default=None, metadata={DOC: doc, OMIT: True, MIN: minimum, MAX: maximum})


def _show(v: Any) -> str:
    s = repr(v)
    return s if len(s) <= 60 else s[:57] + "..."


def _is_section(tp: Any) -> bool:
    return isinstance(tp, type) and issubclass(tp, Section)


def _number(v: Any, path: str, json: bool, integer: bool) -> int | float:
    if isinstance(v, bool) or not isinstance(v, (int, float) if json else numbers.Real):
        raise Invalid(path, f"expected {'an integer' if integer else 'a number'}, got {_show(v)}")
    if integer:
        if json and isinstance(v, float) and v.is_integer():  # JSON Schema's "integer": 2.0 is the integer 2
            return int(v)
        if not isinstance(v, int if json else numbers.Integral):
            raise Invalid(path, f"expected an integer, got {_show(v)}")
        return int(v)
    v = float(v)
    if not math.isfinite(v):
        raise Invalid(path, f"{v} is not allowed (JSON has no NaN or infinity)", type_error=False)
    return v


def _json_value(v: Any, path: str) -> Any:
    if v is None or isinstance(v, (bool, str)):
        return v
    if isinstance(v, numbers.Integral):
        return int(v)
    if isinstance(v, numbers.Real):
        return _number(v, path, False, False)
    if isinstance(v, (list, tuple)):
        return [_json_value(x, f"{path}[{i}]") for i, x in enumerate(v)]
    if isinstance(v, Mapping):
        for k in v:
            if not isinstance(k, str):
                raise Invalid(path, f"object keys must be strings, got {_show(k)}")
        return {k: _json_value(x, f"{path}[{k!r}]") for k, x in v.items()}
    raise Invalid(path, f"{type(v).__name__} {_show(v)} is not a JSON value")


def convert(tp: Any, v: Any, path: str, json: bool) -> Any:
    """Check ``v`` against annotation ``tp`` and return it normalised.

    Args:
        tp: the annotation (resolved, not a string).
        v: the value.
        path: where ``v`` sits, for messages.
        json: True when ``v`` comes from parsed JSON (sections are built from dicts, only ``int``/``float`` count as
            numbers); False for constructor arguments (sections must be instances, numpy scalars are accepted).

    Raises:
        Invalid: ``v`` does not fit.
    """
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is Any:
        return _json_value(v, path)
    if _is_section(tp):
        if json:
            if not isinstance(v, Mapping):
                raise Invalid(path, f"expected an object ({tp.__name__}), got {_show(v)}")
            return tp._decode(v, path)
        if not isinstance(v, tp):
            raise Invalid(path, f"expected a {tp.__name__}, got {type(v).__name__} {_show(v)}")
        return v
    if tp is type(None):
        if v is not None:
            raise Invalid(path, f"expected null, got {_show(v)}")
        return None
    if tp is bool:
        if not isinstance(v, bool):
            raise Invalid(path, f"expected true or false, got {_show(v)}")
        return v
    if tp is int or tp is float:
        return _number(v, path, json, tp is int)
    if tp is str or tp in PATTERNS:
        if not isinstance(v, str):
            raise Invalid(path, f"expected a string, got {_show(v)}")
        if tp in PATTERNS and not re.search(PATTERNS[tp], v):  # as JSON Schema's "pattern" does
            raise Invalid(path, f"{v!r} does not match {PATTERNS[tp]}", type_error=False)
        return v
    if origin is Literal:
        if not any(v == a and type(v) is type(a) for a in args):
            raise Invalid(path, f"expected one of {', '.join(map(repr, args))}, got {_show(v)}", type_error=False)
        return v
    if origin is Union or origin is types.UnionType:
        if v is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return convert(a, v, path, json)
            except Invalid as err:
                errors.append(err)
        deepest = max(errors, key=lambda e: len(e.path))
        if deepest.path != path or len(errors) == 1:  # right shape for one branch, wrong inside it
            raise deepest
        raise Invalid(path, f"expected {' or '.join(_name(a) for a in args)}, got {_show(v)}")
    if origin is tuple:
        if not isinstance(v, (list, tuple)):
            raise Invalid(path, f"expected an array, got {_show(v)}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(convert(args[0], x, f"{path}[{i}]", json) for i, x in enumerate(v))
        if len(v) != len(args):
            raise Invalid(path, f"expected {len(args)} items, got {len(v)}", type_error=False)
        return tuple(convert(a, x, f"{path}[{i}]", json) for i, (a, x) in enumerate(zip(args, v)))
    if origin is dict:
        if not isinstance(v, Mapping):
            raise Invalid(path, f"expected an object, got {_show(v)}")
        kt, vt = args
        out = {}
        for k, x in v.items():
            key = convert(kt, k, f"{path} key", json)
            out[key] = convert(vt, x, f"{path}[{k!r}]", json)
        return out
    raise TypeError(f"report codec: unsupported annotation {tp!r} at {path}")


def _name(tp: Any) -> str:
    if _is_section(tp):
        return tp.__name__
    if typing.get_origin(tp) is dict:
        return "an object"
    return {str: "a string", int: "an integer", float: "a number", bool: "a boolean",
            type(None): "null"}.get(tp, str(tp))


def _range(v: Any, f: dataclasses.Field, path: str) -> None:
    lo, hi = f.metadata.get(MIN), f.metadata.get(MAX)
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        if lo is not None and v < lo:
            raise Invalid(path, f"{v} is below the minimum {lo}", type_error=False)
        if hi is not None and v > hi:
            raise Invalid(path, f"{v} is above the maximum {hi}", type_error=False)


class Section:
    """Base of the report dataclasses (frozen, keyword-only): checked at construction, ``to_dict`` / ``from_dict``."""

    _hints: ClassVar[dict[str, Any]]

    @classmethod
    def _fields(cls) -> list[tuple[dataclasses.Field, Any]]:
        if "_hints" not in cls.__dict__:
            cls._hints = typing.get_type_hints(cls)
        return [(f, cls._hints[f.name]) for f in dataclasses.fields(cls)]  # type: ignore[arg-type]

    def __post_init__(self) -> None:
        name = type(self).__name__
        try:
            for f, tp in self._fields():
                v = getattr(self, f.name)
                if v is None and f.metadata.get(OMIT):
                    continue
                v = convert(tp, v, f".{f.name}", json=False)
                _range(v, f, f".{f.name}")
                object.__setattr__(self, f.name, v)
            self._check()
        except Invalid as err:
            raise (SectionTypeError if err.type_error else SectionError)(name, err.path, err.msg) from None

    def _check(self) -> None:
        """Relations between fields (override); raise :class:`Invalid` with a relative path."""

    # ---- JSON
    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Any:
        """Read this section back from its ``to_dict()`` form.

        Raises:
            ReportError: unknown or missing key, wrong type, NaN or out-of-range value (one line with the path).
        """
        return decoded(cls, data, cls.__name__)

    def to_dict(self) -> dict[str, Any]:
        """The JSON-ready dict (omittable fields left out when None)."""
        return self._encode()

    def to_json(self) -> str:
        """The file's text: ``to_dict()``, 2-space indent, trailing newline, no NaN or infinity."""
        return json.dumps(self.to_dict(), indent=2, ensure_ascii=False, allow_nan=False) + "\n"

    def _encode(self) -> dict[str, Any]:
        out = {}
        for f, _ in self._fields():
            v = getattr(self, f.name)
            if v is None and f.metadata.get(OMIT):
                continue
            out[f.name] = encode(v)
        return out

    @classmethod
    def _decode(cls, data: Mapping[str, Any], path: str) -> Section:
        fields = cls._fields()
        names = {f.name for f, _ in fields}
        unknown = [k for k in data if k not in names]
        if unknown:
            known = (f"a {cls.__name__} has {', '.join(sorted(names))}" if len(names) <= 10 else
                     f"the keys of a {cls.__name__} are in report.schema.json")
            raise Invalid(path, f"unknown key{'s' if len(unknown) > 1 else ''} {', '.join(map(repr, unknown[:5]))} "
                                f"({known})")
        kw = {}
        for f, tp in fields:
            p = f"{path}.{f.name}"
            if f.name not in data:
                if f.metadata.get(OMIT):
                    continue
                raise Invalid(p, "missing required key")
            if data[f.name] is None and f.metadata.get(OMIT):
                raise Invalid(p, "null is not allowed here (leave the key out instead)")
            kw[f.name] = convert(tp, data[f.name], p, json=True)
        return cls._build(kw, path)

    @classmethod
    def _build(cls, kw: dict[str, Any], path: str) -> Section:
        try:
            return cls(**kw)
        except (SectionError, SectionTypeError) as err:
            raise Invalid(path + err.path, err.msg, type_error=isinstance(err, TypeError)) from None

    @classmethod
    def _json_schema(cls, sub: Callable[[Any], dict]) -> dict[str, Any]:
        """This section's schema (``sub(tp)`` gives the schema of an annotation, registering sections in $defs)."""
        props, required = {}, []
        for f, tp in cls._fields():
            omit = bool(f.metadata.get(OMIT))
            if omit:
                tp = _strip_none(tp)
            s = dict(sub(tp))
            for k in (MIN, MAX):
                if f.metadata.get(k) is not None:
                    s[k] = f.metadata[k]
            if f.metadata.get(DOC):
                s = {"description": f.metadata[DOC], **s}
            props[f.name] = s
            if not omit:
                required.append(f.name)
        return {"type": "object", "description": doc_line(cls), "properties": props,
                "required": required, "additionalProperties": False}


def field_from_json(cls: type[Section], name: str, value: Any, where: str) -> Any:
    """Field ``name`` of section ``cls`` decoded from its JSON form; :class:`Invalid` becomes a :class:`ReportError`.

    Raises:
        ReportError: ``name`` is not a field of ``cls``, or ``value`` does not fit it (one line, ``where.name...``).
    """
    hints = dict((f.name, tp) for f, tp in cls._fields())
    if name not in hints:
        raise ReportError(f"{where}: no section {name!r}")
    try:
        return convert(hints[name], value, f"{where}.{name}", json=True)
    except Invalid as err:
        raise ReportError(f"{err.path}: {err.msg}") from None


def decoded(cls: type[Section], data: Any, where: str) -> Any:
    """``cls`` decoded from JSON-shaped ``data``; :class:`Invalid` becomes a one-line :class:`ReportError`."""
    try:
        return cls._decode(data, "") if isinstance(data, Mapping) else convert(cls, data, "", json=True)
    except Invalid as err:
        raise ReportError(f"{where}{err.path}: {err.msg}") from None


def doc_line(cls: type) -> str:
    """The first paragraph of ``cls``'s docstring, on one line (schema descriptions)."""
    return (cls.__doc__ or "").strip().split("\n\n")[0].replace("\n", " ")


def _strip_none(tp: Any) -> Any:
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    return args[0] if len(args) == 1 else Union[tuple(args)]  # noqa: UP007 (runtime union of a tuple)


def encode(v: Any) -> Any:
    """JSON-ready form of a normalised field value."""
    if isinstance(v, Section):
        return v.to_dict()
    if isinstance(v, tuple | list):
        return [encode(x) for x in v]
    if isinstance(v, dict):
        return {k: encode(x) for k, x in v.items()}
    return v


_SIMPLE = {str: "string", int: "integer", float: "number", bool: "boolean", type(None): "null"}


def type_schema(tp: Any, defs: dict[str, Any]) -> dict[str, Any]:
    """JSON Schema of annotation ``tp``; :class:`Section` types go to ``defs`` and are referenced."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is Any:
        return {"description": "any JSON value"}
    if _is_section(tp):
        if tp.__name__ not in defs:
            defs[tp.__name__] = {}  # placeholder against recursion
            defs[tp.__name__] = tp._json_schema(lambda t: type_schema(t, defs))
        return {"$ref": f"#/$defs/{tp.__name__}"}
    if tp in _SIMPLE:
        return {"type": _SIMPLE[tp]}
    if tp in PATTERNS:
        return {"type": "string", "pattern": PATTERNS[tp]}
    if origin is Literal:
        return {"const": args[0]} if len(args) == 1 else {"enum": list(args)}
    if origin is Union or origin is types.UnionType:
        if all(a in _SIMPLE for a in args):
            return {"type": [_SIMPLE[a] for a in args]}
        return {"anyOf": [type_schema(a, defs) for a in args]}
    if origin is tuple:
        if len(args) == 2 and args[1] is Ellipsis:
            return {"type": "array", "items": type_schema(args[0], defs)}
        return {"type": "array", "prefixItems": [type_schema(a, defs) for a in args], "items": False,
                "minItems": len(args)}
    if origin is dict:
        s = {"type": "object", "additionalProperties": type_schema(args[1], defs)}
        if args[0] in PATTERNS:
            s["propertyNames"] = {"pattern": PATTERNS[args[0]]}
        return s
    raise TypeError(f"report schema: unsupported annotation {tp!r}")
