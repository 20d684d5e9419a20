"""write_report / read_report: three files, atomic, no NaN, strict reading, and the format-1 shim build.py uses."""
from __future__ import annotations

import json

import pytest

from dfmpc_deploy.errors import DfmpcError
from dfmpc_deploy.report import Report, ReportError, read_report, write_report
from dfmpc_deploy.report import html as html_mod
from dfmpc_deploy.report import markdown as md_mod


def test_write_then_read(tmp_path, full_report):
    write_report(tmp_path, full_report)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.html", "report.json", "report.md"]
    text = (tmp_path / "report.json").read_text()
    assert json.loads(text) == full_report.to_dict() and text.endswith("}\n")
    assert read_report(tmp_path) == read_report(tmp_path / "report.json") == full_report
    assert (tmp_path / "report.md").read_text() == md_mod.render_markdown(full_report)
    assert (tmp_path / "report.html").read_text(encoding="utf-8") == html_mod.render_html(full_report)


def test_a_failed_render_writes_nothing(tmp_path, full_report, monkeypatch):
    def boom(rep):
        raise RuntimeError("render failed")

    monkeypatch.setattr(html_mod, "render_html", boom)
    with pytest.raises(RuntimeError, match="render failed"):
        write_report(tmp_path, full_report)
    assert list(tmp_path.iterdir()) == []  # report.json was not written before the page failed


def test_write_errors(tmp_path, full_report):
    with pytest.raises(DfmpcError, match="is not a directory"):
        write_report(tmp_path / "missing", full_report)
    with pytest.raises(TypeError, match="expected a Report, got dict"):
        write_report(tmp_path, full_report.to_dict())  # type: ignore[arg-type]


@pytest.mark.parametrize("content, msg", [
    ("{", "not valid JSON"),
    ('{"format_version": 2, "x": NaN}', "not valid JSON (NaN is not valid JSON)"),
    ("[1]", "report: expected a JSON object, got list"),
    ('{"format_version": 1}', "report_from_v1"),
])
def test_read_errors(tmp_path, content, msg):
    p = tmp_path / "report.json"
    p.write_text(content)
    with pytest.raises(ReportError) as err:
        read_report(p)
    assert msg in str(err.value) and "\n" not in str(err.value) and str(p) in str(err.value)
    with pytest.raises(ReportError, match="does not exist"):
        read_report(tmp_path / "none.json")


def test_report_json_refuses_nan(full_report):
    d = full_report.to_dict()
    d["timings_s"]["load"] = float("nan")
    with pytest.raises(ReportError):
        Report.from_dict(d)
