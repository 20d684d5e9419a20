"""Writing and reading the report files: report.json (atomic, ``allow_nan=False``), report.md and report.html."""
from __future__ import annotations

import json
import os
from pathlib import Path

from ..errors import DfmpcError
from ..io.atomic import atomic_write_text
from ..io.files import read_regular_file
from . import html, markdown
from .model import Report, ReportError

__all__ = ["write_report", "read_report", "report_json"]


def report_json(report: Report) -> str:
    """report.json's text: ``report.to_dict()``, 2-space indent, trailing newline, no NaN or infinity."""
    return report.to_json()


def write_report(out_dir: str | os.PathLike, report: Report) -> None:
    """Write ``report.json``, ``report.md`` and the self-contained ``report.html`` into ``out_dir``.

    All three are rendered before the first is written, and each is written atomically (temp file + rename), so
    a failure leaves the directory as it was.

    Args:
        out_dir: an existing directory.
        report: the typed report.

    Raises:
        TypeError: ``report`` is not a :class:`Report`.
        DfmpcError: ``out_dir`` is not a directory, or a file cannot be written (permissions, full disk).
    """
    if not isinstance(report, Report):
        raise TypeError(f"write_report: expected a Report, got {type(report).__name__}")
    out = Path(out_dir)
    if not out.is_dir():
        raise DfmpcError(f"cannot write the report: '{out}' is not a directory")
    texts = {"report.json": report_json(report), "report.md": markdown.render_markdown(report),
             "report.html": html.render_html(report)}
    for name, text in texts.items():
        atomic_write_text(out / name, text)


def _no_constant(name: str):
    raise ValueError(f"{name} is not valid JSON")


#: a report.json is tens of KB; the bound keeps a hostile one (build --from-report) from costing memory
MAX_REPORT_BYTES = 16 << 20


def read_report(path: str | os.PathLike) -> Report:
    """Read a format-2 report.json (a directory means its ``report.json``).

    Raises:
        ReportError: the file is missing, not JSON (NaN / Infinity included), or not a valid format-2 report.
    """
    p = Path(path)
    if p.is_dir():
        p = p / "report.json"

    try:
        raw = read_regular_file(p, MAX_REPORT_BYTES, "report")
    except DfmpcError as err:
        raise ReportError(str(err)) from None
    try:
        data = json.loads(raw.decode("utf-8"), parse_constant=_no_constant)
    except UnicodeDecodeError as err:
        raise ReportError(f"{p}: cannot read it ({err})") from None
    except (ValueError, RecursionError) as err:
        raise ReportError(f"{p}: not valid JSON ({err})") from None
    try:
        return Report.from_dict(data)
    except ReportError as err:
        raise ReportError(f"{p}: {err}") from None
