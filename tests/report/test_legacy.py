"""Format-1 reports (dfmpc-deploy <= 0.1) read into the typed report without losing what they recorded."""
from __future__ import annotations

import pytest

from dfmpc_deploy.report import BUILD_STAGES, Report, ReportError, report_from_v1, validate_report_json
from dfmpc_deploy.report.legacy import V1_NOTE
from tests.report import fixtures


def test_real_v1_report_converts_losslessly():
    v1 = fixtures.v1_resnet20()
    r = report_from_v1(v1)
    d = r.to_dict()
    validate_report_json(d)
    assert Report.from_dict(d) == r
    for k in ("model", "weights", "method", "input_shape", "preprocessing", "accuracy", "packed_file", "packing",
              "size_bytes", "latency_ms", "speedup", "threads", "parity", "engine", "artifacts", "layers"):
        assert d[k] == v1[k], k  # the keys outside checks read: unchanged
    assert d["notes"] == [*v1["notes"], V1_NOTE]
    assert r.bits.display() == v1["bits"] == "2/6"
    assert d["timings_s"] == {k: v for k, v in v1["timings_s"].items() if k in BUILD_STAGES}
    (p,) = r.recipe.passes
    assert p.name == "dfmpc" and p.config == v1["config"] and p.seconds == v1["timings_s"]["compensate"]
    assert p.info["estimator"] == v1["estimator"] and p.info["rounded_layers"] == 9
    assert p.info["synth_seconds"] == v1["timings_s"]["synth_seconds"]
    assert r.recipe.data_used == "synthetic" and r.runtime is None and r.statistics is None and r.pairs is None


def test_mixed_bits_and_allocation():
    v1 = fixtures.v1_resnet20()
    v1["bits"] = "mixed 2..6 (3.97 bits/weight)"
    v1["method"] = "dfmpc-alloc"
    v1["allocation"] = {"bits_histogram": {"2": 9, "6": 11}, "code_bytes": 134094, "budget_bytes": 180142,
                        "avg_code_bits": 3.9978, "predicted_kl": 0.01, "seconds": 1.2}
    v1["diagnostics"]["allocation"] = v1["allocation"]  # build.py <= 0.1 put it in both places
    r = report_from_v1(v1)
    assert (r.bits.low, r.bits.high, r.bits.mixed) == (2, 6, True) and r.allocation.budget_bytes == 180142
    assert "allocation" not in r.recipe.passes[0].info


@pytest.mark.parametrize("mutate, msg", [
    (lambda d: d.update(format_version=2), "report.format_version: 2 is not format 1"),
    (lambda d: d.update(bits="two/six"), "report.bits: 'two/six' is neither"),
    (lambda d: d.update(method="magic"), "report.method: unknown method 'magic'"),
    (lambda d: d.update(colour=1), "report: unknown format-1 key colour"),
    (lambda d: d.pop("layers"), "report.layers: missing required key (format 1)"),
    (lambda d: d["layers"][0].update(bits="6"), "report.layers[0].bits: expected an integer, got '6'"),
    (lambda d: d["accuracy"].pop("n"), "report.accuracy.n: missing required key"),
    (lambda d: d["size_bytes"].update(bogus=1), "report.size_bytes: unknown key 'bogus'"),
    (lambda d: d["diagnostics"].update(x=[1, 2]), "report (config, diagnostics or timings_s): .info['x']"),
])
def test_bad_v1_reports(mutate, msg):
    v1 = fixtures.v1_resnet20()
    mutate(v1)
    with pytest.raises(ReportError) as err:
        report_from_v1(v1)
    assert str(err.value).startswith(msg), str(err.value)
    assert "\n" not in str(err.value)
