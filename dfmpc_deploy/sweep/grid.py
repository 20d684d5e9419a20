"""The sweep's grid file: models x the cross product of ``[grid]`` x the shared ``[build]`` flags -> cells.

A grid file is TOML::

    [[model]]                      # one table per model: its name and its own build flags
    name = "resnet20_cifar10_optA"
    weights = "../shared/data/weights/akamaster_cifar10/resnet20-12fca82f.th"
    data = "imagefolder:../shared/data/cifar10-test-jpg/test"
    limit = 200
    [grid]                         # every key a list: the cells are their cross product
    method = ["rtn", "dfmpc"]
    bits = ["2/6", "4"]
    seed = [0, 1]
    [build]                        # flags shared by every cell
    synth_steps = 5

Keys are ``build`` flags without their dashes (``synth_steps`` for ``--synth-steps``, ``target`` for
``--target``, ``no_pack = true`` for ``--no-pack``); a switch takes ``true``/``false``. Each value goes through the
flag's own parser (the field metadata of :mod:`dfmpc_deploy.core.options`) and every cell's
:class:`~dfmpc_deploy.build.BuildConfig` is constructed while the file is read, so a bad grid is refused before
any cell runs, with one line naming the table, the key and the value. A ``[model]`` table may override a
``[build]`` key; a ``[grid]`` key may appear nowhere else. ``out`` and ``force`` are the sweep's (each cell writes
``DIR/cells/<cell id>/``). Relative paths (``weights``, the directory of ``data``) are read relative to the grid
file and stored absolute.

A cell's id is the first 12 hex digits of the SHA-256 of its settings as canonical JSON (sorted keys, no spaces):
the same settings give the same id in any order of the file, so a changed grid keeps its finished cells.
"""
from __future__ import annotations

import dataclasses
import difflib
import hashlib
import itertools
import json
import os
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..core.options import flag_of, options_of, split_values
from ..errors import DfmpcError, UsageError
from ..io.files import read_regular_file

__all__ = ["Cell", "Grid", "GridError", "load_grid", "parse_grid", "parse_value", "cell_id", "build_config",
           "flag_fields", "RESERVED_KEYS"]

#: Keys a grid may not set, and why.
RESERVED_KEYS = {"out": "each cell writes into DIR/cells/<cell id>/ under sweep --out DIR",
                 "force": "a cell's folder is the sweep's own and is replaced when the cell runs again",
                 "model": "the model is the 'name' of a [[model]] table"}
_TABLES = ("model", "grid", "build")
_PATH_WEIGHTS = ("random", "pretrained")


class GridError(DfmpcError):
    """A grid file that cannot be run: one line naming the table, the key and the value (exit status 1)."""


@dataclass(frozen=True)
class Cell:
    """One build of the sweep.

    Attributes:
        id: 12 hex digits, :func:`cell_id` of ``settings``.
        settings: ``{"model": name, flag key: value, ...}`` with TOML values (paths absolute).
        point: the ``[grid]`` keys and values of this cell (what tells it apart from its model's other cells).
    """

    id: str
    settings: Mapping[str, Any]
    point: Mapping[str, Any]

    @property
    def model(self) -> str:
        return str(self.settings["model"])

    @property
    def cpus(self) -> int:
        """CPUs the cell declares: its ``threads`` flag, 1 by default (torch runs on that many threads)."""
        return int(self.settings.get("threads", 1))

    @property
    def gpus(self) -> int:
        """GPUs the cell declares: 1 with ``device = "cuda"``, else 0."""
        return 1 if self.settings.get("device") == "cuda" else 0

    def label(self) -> str:
        """``method=rtn bits=2/6 seed=0``: the grid point, for terminal lines."""
        return " ".join(f"{k}={_show(v)}" for k, v in self.point.items()) or "(no grid keys)"


@dataclass(frozen=True)
class Grid:
    """A validated grid file.

    Attributes:
        path: the file.
        cells: every cell, models in file order, each model's cells in the order of the cross product.
        axes: the ``[grid]`` keys, in file order.
    """

    path: Path
    cells: tuple[Cell, ...]
    axes: tuple[str, ...]


def _show(v: Any) -> str:
    return ",".join(map(str, v)) if isinstance(v, list) else str(v)


def cell_id(settings: Mapping[str, Any]) -> str:
    """The stable id of a cell: SHA-256 of ``settings`` as canonical JSON, first 12 hex digits.

    Example::

        >>> cell_id({"model": "resnet20_cifar10_optA", "seed": 0})
        '38c5f727b02b'
        >>> cell_id({"seed": 0, "model": "resnet20_cifar10_optA"})  # the order of the keys does not matter
        '38c5f727b02b'
    """
    text = json.dumps(dict(settings), sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:12]


def flag_fields() -> dict[str, tuple[dataclasses.Field, bool]]:
    """``{key: (field, is a BuildConfig field)}`` for every ``build`` flag; key = flag without dashes, ``_`` for
    ``-`` (the pass fields come from the same registry the CLI reads)."""
    from ..build import BuildConfig  # lazy: build imports torch; the sweep package (grids, store, pages) does not
    from ..passes.recipes import PASS_CLASSES  # lazy: as build (the passes import torch)

    table: dict[str, tuple[dataclasses.Field, bool]] = {}
    classes: list[type] = [BuildConfig, *PASS_CLASSES]
    for cls in classes:
        for f in options_of(cls):
            key = str(flag_of(f)).lstrip("-").replace("-", "_")
            table.setdefault(key, (f, cls is BuildConfig))
    return table


def _bad(where: str, key: str, value: Any, why: str) -> GridError:
    return GridError(f"{where} {key} = {_toml(value)}: {why}")


def _toml(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False) if isinstance(value, (str, list, bool)) else str(value)


def _parse_text(f: dataclasses.Field, text: str) -> Any:
    """One value through the flag's own choices and parser (what argparse would do with it)."""
    import argparse

    m = f.metadata
    if m["choices"] and text not in m["choices"]:
        raise ValueError(f"choose one of {', '.join(m['choices'])}")
    if m["parse"] is None:
        return text
    try:
        return m["parse"](text)
    except (argparse.ArgumentTypeError, UsageError) as err:
        raise ValueError(str(err)) from None


def parse_value(key: str, value: Any, where: str = "grid") -> tuple[str, Any]:
    """A grid value as the parsed value of its field.

    Args:
        key: the flag without dashes, e.g. ``synth_steps``.
        value: the TOML value (a switch: bool; a flag with several values: a list or ``"a,b"``; else a scalar).
        where: for the message, e.g. ``"grid.toml [grid]"``.

    Returns:
        ``(field name, parsed value)``, e.g. ``("synth_steps", 5)``, ``("pack", False)`` for ``no_pack = true``.

    Raises:
        GridError: unknown key, reserved key, or a value its flag refuses (the message names key and value).
    """
    if key in RESERVED_KEYS:
        raise GridError(f"{where} {key}: not a grid key ({RESERVED_KEYS[key]})")
    fields = flag_fields()
    if key not in fields:
        close = difflib.get_close_matches(key, list(fields), n=3)
        hint = f"did you mean {' or '.join(close)}? " if close else ""
        raise GridError(f"{where} {key}: unknown build flag; {hint}keys are the flags of 'dfmpc-deploy build' "
                         "without their dashes, e.g. synth_steps for --synth-steps")
    f, _ = fields[key]
    m = f.metadata
    if m["action"] in ("store_true", "store_false"):
        if not isinstance(value, bool):
            raise _bad(where, key, value, "is a switch: give true or false")
        return f.name, value if m["action"] == "store_true" else not value
    items = value if isinstance(value, list) and m["nargs"] else [value]
    if not items or any(isinstance(v, (bool, list, dict)) or not isinstance(v, (str, int, float)) for v in items):
        shape = "a value or a list of values" if m["nargs"] else "one string or number"
        raise _bad(where, key, value, f"expected {shape}")
    try:
        if m["nargs"]:
            return f.name, tuple(_parse_text(f, t) for t in split_values([str(v) for v in items], key))
        return f.name, _parse_text(f, str(value))
    except (ValueError, UsageError) as err:
        raise _bad(where, key, value, str(err)) from None


def build_config(settings: Mapping[str, Any], out: str | os.PathLike, threads: int | None = None) -> Any:
    """The :class:`~dfmpc_deploy.build.BuildConfig` of a cell, as ``build`` would make it from the same flags.

    Args:
        settings: the cell's settings (``model`` + flag keys).
        out: the cell's output folder (replaced when the cell runs: ``force``).
        threads: torch threads when ``settings`` has no ``threads`` (the CPUs the engine gave the cell).

    Raises:
        UsageError, DfmpcError: as ``build`` would for the same flags.
    """
    from ..build import BuildConfig  # lazy: build imports torch; the sweep package (grids, store, pages) does not

    fields = flag_fields()
    given: dict[str, Any] = {}
    passes: dict[str, Any] = {}
    for key, value in settings.items():
        if key == "model":
            continue
        name, parsed = parse_value(key, value)
        (given if fields[key][1] else passes)[name] = parsed
    if threads is not None:
        given.setdefault("threads", threads)
    return BuildConfig(model=str(settings["model"]), out=Path(out), force=True, settings=passes, **given)


def _absolute(key: str, value: Any, base: Path) -> Any:
    """``weights`` and ``data`` paths relative to the grid file, made absolute (``random``/``pretrained`` kept)."""
    if not isinstance(value, str):
        return value
    if key == "weights" and value not in _PATH_WEIGHTS:
        return os.path.abspath(base / os.path.expanduser(value))
    if key == "data":
        kind, sep, path = value.partition(":")
        if sep and path:
            return f"{kind}:{os.path.abspath(base / os.path.expanduser(path))}"
    return value


def _check_keys(table: Mapping[str, Any], where: str, skip: str = "") -> None:
    for key, value in table.items():
        if key == skip:
            continue
        if isinstance(value, dict):
            raise GridError(f"{where} {key}: a table is not a flag value")
        parse_value(key, value, where)


def parse_grid(doc: Mapping[str, Any], path: Path) -> Grid:
    """Validate a parsed grid document and expand it into cells (see the module docstring).

    Raises:
        GridError: the first problem, one line naming the table, key and value.
    """
    name = path.name
    extra = [k for k in doc if k not in _TABLES]
    if extra:
        raise GridError(f"{name}: unknown table or key '{extra[0]}'; a grid has [[model]] tables, [grid] and "
                         "[build]")
    models = doc.get("model")
    if not isinstance(models, list) or not models or not all(isinstance(m, dict) for m in models):
        raise GridError(f"{name}: no [[model]] table; add one per model, e.g. [[model]] name = "
                         "\"resnet20_cifar10_optA\"")
    grid, shared = doc.get("grid", {}), doc.get("build", {})
    for table, what in ((grid, "[grid]"), (shared, "[build]")):
        if not isinstance(table, dict):
            raise GridError(f"{name}: {what} must be a table")
    _check_keys(shared, f"{name} [build]")
    for key, values in grid.items():
        where = f"{name} [grid]"
        if not isinstance(values, list):
            raise _bad(where, key, values, f"an axis is a list, e.g. {key} = [{_toml(values)}]; a value shared by "
                                           "every cell goes in [build]")
        if not values:
            raise _bad(where, key, values, "empty axis: give at least one value")
        seen: list[Any] = []
        for v in values:
            parse_value(key, v, where)
            if v in seen:
                raise _bad(where, key, values, f"{_toml(v)} is listed twice")
            seen.append(v)
        if key in shared:
            raise GridError(f"{where} {key}: also set in [build]; set it in one table")
    base = path.parent
    cells: list[Cell] = []
    for i, model in enumerate(models):
        where = f"{name} [[model]] #{i + 1}"
        if not isinstance(model.get("name"), str) or not model["name"]:
            raise GridError(f"{where}: no name; give the model name, e.g. name = \"resnet20_cifar10_optA\"")
        _check_keys(model, where, skip="name")
        both = [k for k in model if k in grid]
        if both:
            raise GridError(f"{where} {both[0]}: also a [grid] axis; set it in one table")
        fixed = {"model": model["name"], **{k: v for k, v in shared.items() if k not in model},
                 **{k: v for k, v in model.items() if k != "name"}}
        for combo in itertools.product(*grid.values()):
            point = dict(zip(grid, combo))
            settings = {k: _absolute(k, v, base) for k, v in {**fixed, **point}.items()}
            cells.append(Cell(cell_id(settings), settings, point))
    ids = [c.id for c in cells]
    dup = next((c for c in cells if ids.count(c.id) > 1), None)
    if dup is not None:
        raise GridError(f"{name}: two cells have the same settings (model {dup.model} {dup.label()}); "
                         "remove the repeated [[model]] table")
    for c in cells:
        try:
            build_config(c.settings, base / "cell")
        except DfmpcError as err:
            raise GridError(f"{name}: model {c.model} {c.label()}: {err}") from None
    return Grid(path=path, cells=tuple(cells), axes=tuple(grid))


#: a grid file is a few hundred bytes of TOML; the bound keeps a hostile one from costing memory
MAX_GRID_BYTES = 1 << 20


def load_grid(path: str | os.PathLike) -> Grid:
    """Read and validate a grid file.

    Raises:
        DfmpcError: the file is missing or unreadable, or not TOML; GridError: see :func:`parse_grid`.
    """
    if sys.version_info >= (3, 11):
        import tomllib
    else:  # Python 3.10: the same parser, published as tomli
        import tomli as tomllib

    p = Path(path)
    raw = read_regular_file(p, MAX_GRID_BYTES, "grid file")
    try:
        doc = tomllib.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        raise DfmpcError(f"grid file '{p}' is not UTF-8 text") from None
    except tomllib.TOMLDecodeError as err:
        raise DfmpcError(f"grid file '{p}' is not valid TOML: {err}") from None
    return parse_grid(doc, p.absolute())
