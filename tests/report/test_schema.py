"""report.schema.json: shipped, in step with the dataclasses, and describing exactly what to_dict produces."""
from __future__ import annotations

import copy
import functools
import json
import math
import subprocess
import sys
from pathlib import Path

import jsonschema
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dfmpc_deploy.report import FORMAT_VERSION, Report, ReportError, load_schema, report_schema, validate_report_json
from tests.report import fixtures
from tests.report.strategies import reports

SCHEMA_PATH = Path(__file__).resolve().parents[2] / "dfmpc_deploy" / "report" / "report.schema.json"
BUILDERS = [fixtures.full_report, fixtures.minimal_report, fixtures.rtn_random_report, fixtures.allocation_report,
            fixtures.deep_report]


def test_shipped_schema_is_generated_from_the_dataclasses():
    assert json.loads(SCHEMA_PATH.read_text()) == report_schema(), \
        "report.schema.json is out of date: run python -m dfmpc_deploy.report"
    assert load_schema() == report_schema()


def test_schema_is_draft_2020_12_and_versioned():
    schema = load_schema()
    assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    jsonschema.Draft202012Validator.check_schema(schema)
    assert schema["properties"]["format_version"]["const"] == FORMAT_VERSION
    assert "format_version" in schema["required"]


def test_schema_is_package_data():
    toml = (Path(__file__).resolve().parents[2] / "pyproject.toml").read_text()
    assert '[tool.setuptools.package-data]\n"dfmpc_deploy.report" = ["report.schema.json"]' in toml


@pytest.mark.parametrize("build", BUILDERS, ids=lambda f: f.__name__)
def test_fixtures_validate(build):
    d = build().to_dict()
    validate_report_json(d)
    jsonschema.validate(d, load_schema(), cls=jsonschema.Draft202012Validator)  # the stock validator agrees


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(r=reports)
def test_any_report_round_trips_and_validates(r):
    d = r.to_dict()
    validate_report_json(d)
    assert Report.from_dict(json.loads(json.dumps(d, allow_nan=False))) == r


@pytest.mark.parametrize("path", [("layers",), ("format_version",), ("size_bytes", "fp32"), ("layers", 0, "role"),
                                  ("recipe", "passes", 0, "config"), ("statistics", "synthesis"),
                                  ("accuracy", "dataset"), ("layers", 1, "c_min"), ("size_bytes", "metadata")])
def test_schema_rejects_a_missing_required_key(full_report, path):
    d = full_report.to_dict()
    parent = d
    for p in path[:-1]:
        parent = parent[p]
    del parent[path[-1]]
    with pytest.raises(ReportError):
        validate_report_json(d)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(d, load_schema(), cls=jsonschema.Draft202012Validator)


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_nan_is_rejected_everywhere(full_report, tmp_path, bad):
    d = full_report.to_dict()
    d["accuracy"]["fp32"]["top1"] = bad
    with pytest.raises(ReportError, match=r"^report\.accuracy\.fp32\.top1: "):
        validate_report_json(d)  # the schema, with JSON's (finite) numbers
    with pytest.raises(ValueError, match="not JSON compliant"):
        json.dumps(d, allow_nan=False)  # what report.json is written with
    with pytest.raises(ReportError, match=r"report\.accuracy\['fp32'\]\.top1: (nan|inf|-inf) is not allowed"):
        Report.from_dict(json.loads(json.dumps(d)))  # Python's json would parse NaN back: from_dict refuses it


def test_schema_rejects_unknown_keys_and_null_sections(full_report):
    for mutate in (lambda d: d.update(extra=1), lambda d: d["bits"].update(text="2/6"),
                   lambda d: d.update(accuracy=None), lambda d: d["size_bytes"].update(onnx_=1),
                   lambda d: d["latency_ms"]["ort"]["fp32"].update(one=d["latency_ms"]["ort"]["fp32"]["1"])):
        d = full_report.to_dict()
        mutate(d)
        with pytest.raises(ReportError):
            validate_report_json(d)


def _paths(obj, prefix=()):
    """Every (path, value) in a JSON document."""
    yield prefix, obj
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _paths(v, (*prefix, k))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from _paths(v, (*prefix, i))


# Relations between fields that a JSON Schema cannot state; from_dict checks them (the schema's descriptions say so).
RELATIONS = ("is below top1", "percentiles out of order", "does not hold", "is above high",
             "is above steps_max", "non-positive size", "is reserved", "timings_s")
_VALUES = ["x", 1.5, -1, 7, None, True, [], {}, {"p50": 1.0}, [3, 32, 32]]


@functools.cache
def _bases() -> tuple[dict, dict]:
    return fixtures.full_report().to_dict(), fixtures.allocation_report().to_dict()


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_schema_and_from_dict_agree_on_mutations(data):
    """Delete a key, add one, or replace a value anywhere in a real report: the schema accepts exactly what
    ``Report.from_dict`` accepts (up to the cross-field relations listed in RELATIONS)."""
    base = _bases()[data.draw(st.integers(0, 1))]
    paths = [p for p, _ in _paths(base) if p]
    path = data.draw(st.sampled_from(paths))
    d = copy.deepcopy(base)
    parent = d
    for p in path[:-1]:
        parent = parent[p]
    op = data.draw(st.sampled_from(["delete", "add", "replace"]))
    if op == "delete":
        del parent[path[-1]]
    elif op == "add" and isinstance(parent[path[-1]], dict):
        parent[path[-1]]["zz_extra"] = data.draw(st.sampled_from(_VALUES))
    else:
        parent[path[-1]] = data.draw(st.sampled_from(_VALUES))
    try:
        validate_report_json(d)
        schema_ok = True
    except ReportError:
        schema_ok = False
    try:
        Report.from_dict(d)
        model_ok, why = True, ""
    except ReportError as err:
        model_ok, why = False, str(err)
    if schema_ok and not model_ok and any(r in why for r in RELATIONS):
        return
    assert schema_ok == model_ok, (op, path, why)


def test_check_command(tmp_path):
    r = subprocess.run([sys.executable, "-m", "dfmpc_deploy.report", "--check"], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0 and "up to date" in r.stdout, r.stdout + r.stderr
