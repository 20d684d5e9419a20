"""JSON Schema (draft 2020-12) of report.json, generated from the dataclasses of model.py.

The schema ships as ``dfmpc_deploy/report/report.schema.json`` (package data); regenerate it after changing a
section with::

    python -m dfmpc_deploy.report            # rewrites report.schema.json
    python -m dfmpc_deploy.report --check    # exit 1 when the file is out of date

``validate_report_json`` checks a parsed report.json against the shipped schema with the JSON data model's
numbers (finite: a NaN or infinity that Python's ``json`` module let through is refused, as ``allow_nan=False``
refuses to write one). It needs ``jsonschema`` (``pip install 'dfmpc-deploy[test]'``).
"""
from __future__ import annotations

import argparse
import json
import math
from importlib import resources
from typing import Any

from .._deps import require
from ..io.atomic import atomic_write_text
from ._codec import type_schema
from .model import FORMAT_VERSION, Report, ReportError

__all__ = ["SCHEMA_FILE", "report_schema", "load_schema", "validate_report_json"]

SCHEMA_FILE = "report.schema.json"
_DIALECT = "https://json-schema.org/draft/2020-12/schema"


def report_schema() -> dict[str, Any]:
    """The schema of ``Report.to_dict()``, generated from the dataclasses (what report.schema.json holds)."""
    defs: dict[str, Any] = {}
    root = Report._json_schema(lambda t: type_schema(t, defs))
    return {"$schema": _DIALECT, "$id": f"urn:dfmpc-deploy:report:{FORMAT_VERSION}",
            "title": "dfmpc-deploy build report (report.json)", **root, "$defs": dict(sorted(defs.items()))}


def schema_text() -> str:
    """report.schema.json as written (2-space indent, trailing newline)."""
    return json.dumps(report_schema(), indent=2, ensure_ascii=False) + "\n"


def load_schema() -> dict[str, Any]:
    """The shipped report.schema.json."""
    return json.loads(resources.files(__package__).joinpath(SCHEMA_FILE).read_text(encoding="utf-8"))


def validate_report_json(obj: Any, schema: dict[str, Any] | None = None) -> None:
    """Validate a parsed report.json against the schema; numbers must be finite (the JSON data model).

    Args:
        obj: the parsed document.
        schema: defaults to :func:`load_schema`.

    Raises:
        ReportError: the first violation, one line with its JSON path.
        MissingDependencyError: jsonschema is not installed.
    """
    jsonschema = require("jsonschema", "test")
    base = jsonschema.Draft202012Validator
    finite = base.TYPE_CHECKER.redefine(
        "number", lambda checker, x: isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x))
    validator = jsonschema.validators.extend(base, type_checker=finite)(schema or load_schema())
    err = jsonschema.exceptions.best_match(validator.iter_errors(obj))
    if err is not None:
        where = "report" + "".join(f"[{p!r}]" if isinstance(p, int) else f".{p}" for p in err.absolute_path)
        msg = err.message if len(err.message) <= 200 else err.message[:197] + "..."
        raise ReportError(f"{where}: {msg}")


def main(argv: list[str] | None = None) -> int:
    """Write (or ``--check``) report.schema.json next to this module."""
    ap = argparse.ArgumentParser(prog="python -m dfmpc_deploy.report", description=__doc__.split("\n")[0])
    ap.add_argument("--check", action="store_true", help="exit 1 when the file differs from the dataclasses")
    args = ap.parse_args(argv)
    path = resources.files(__package__).joinpath(SCHEMA_FILE)
    text = schema_text()
    if args.check:
        same = path.is_file() and path.read_text(encoding="utf-8") == text
        print(f"{path}: {'up to date' if same else 'OUT OF DATE (run python -m dfmpc_deploy.report)'}")
        return 0 if same else 1
    atomic_write_text(str(path), text)
    print(f"wrote {path}")
    return 0
