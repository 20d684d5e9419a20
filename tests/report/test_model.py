"""The typed report: construction checks, strict from_dict, exact round trips, and rows from a real model."""
from __future__ import annotations

import dataclasses
import json
import math

import numpy as np
import pytest
import torch

from dfmpc_deploy.errors import DfmpcError
from dfmpc_deploy.report import (
    FORMAT_VERSION,
    Accuracy,
    Bits,
    LatencyStats,
    LayerRow,
    Pair,
    PassRecord,
    Report,
    ReportError,
    Sizes,
    TopK,
    json_config,
    layer_rows,
    report_json,
)
from tests.report import fixtures

BUILDERS = [fixtures.full_report, fixtures.minimal_report, fixtures.rtn_random_report, fixtures.allocation_report,
            fixtures.deep_report]


@pytest.mark.parametrize("build", BUILDERS, ids=lambda f: f.__name__)
def test_round_trip(build):
    r = build()
    d = r.to_dict()
    assert Report.from_dict(d) == r
    assert Report.from_dict(json.loads(report_json(r))) == r  # through the JSON text too
    assert d["format_version"] == FORMAT_VERSION and list(d)[0] == "format_version"
    assert Report.from_dict(d).to_dict() == d


def test_optional_sections_are_left_out_not_null(minimal_report):
    d = minimal_report.to_dict()
    for k in ("runtime", "statistics", "pairs", "accuracy", "allocation", "packed_file", "packing", "latency_ms",
              "speedup", "threads", "parity", "engine", "artifacts"):
        assert k not in d, k
    assert d["size_bytes"] == {"fp32": 3456}
    assert "c_mean" not in d["layers"][0] and d["layers"][0]["partner"] is None  # nullable keys stay
    assert None not in d.values()


def test_external_keys_keep_their_format1_shapes(full_report):
    """accuracy, size_bytes and latency_ms are read by checks outside this project: byte-for-byte format-1 shapes."""
    v1, d = fixtures.v1_resnet20(), full_report.to_dict()
    for k in ("accuracy", "size_bytes", "latency_ms", "speedup", "threads", "parity", "engine", "artifacts",
              "layers", "packing", "preprocessing", "notes", "model", "weights", "method", "input_shape"):
        assert d[k] == v1[k], k
    assert list(d["size_bytes"]) == list(v1["size_bytes"])  # key order too
    assert list(d["accuracy"]) == list(v1["accuracy"])


def test_full_report_has_every_section(full_report):
    missing = [f.name for f in dataclasses.fields(Report) if getattr(full_report, f.name) is None]
    assert missing == ["allocation"], missing  # a fixed pairing has no allocation (allocation_report has one)
    assert fixtures.allocation_report().allocation is not None


def _one_line(err: pytest.ExceptionInfo) -> str:
    msg = str(err.value)
    assert "\n" not in msg and len(msg) < 300, msg
    return msg


@pytest.mark.parametrize("mutate, expect", [
    (lambda d: d.update(extra=1), "report: unknown key 'extra'"),
    (lambda d: d["layers"][1].update(colour="red"), "report.layers[1]: unknown key 'colour'"),
    (lambda d: d.pop("layers"), "report.layers: missing required key"),
    (lambda d: d["recipe"]["passes"][0].pop("seconds"), "report.recipe.passes[0].seconds: missing required key"),
    (lambda d: d["layers"][3].update(bits="2"), "report.layers[3].bits: expected an integer, got '2'"),
    (lambda d: d["layers"][3].update(bits=2.5), "report.layers[3].bits: expected an integer, got 2.5"),
    (lambda d: d["layers"][3].update(bits=True), "report.layers[3].bits: expected an integer, got True"),
    (lambda d: d.update(bits="2/6"), "report.bits: expected an object (Bits), got '2/6'"),
    (lambda d: d["accuracy"]["fp32"].update(top1=math.nan), "report.accuracy['fp32'].top1: nan is not allowed"),
    (lambda d: d["size_bytes"].update(fp32=math.inf), "report.size_bytes.fp32: expected an integer, got inf"),
    (lambda d: d["latency_ms"]["ort"]["fp32"]["1"].update(p50=-math.inf), "report.latency_ms['ort']['fp32']['1']"),
    (lambda d: d["latency_ms"]["ort"]["fp32"].update(one={}), "report.latency_ms['ort']['fp32'] key: 'one' does not"),
    (lambda d: d["latency_ms"].update(ort=3), "report.latency_ms['ort']: expected an object or a string, got 3"),
    (lambda d: d.update(accuracy=None), "report.accuracy: null is not allowed here (leave the key out instead)"),
    (lambda d: d["size_bytes"].pop("scales"), "report.size_bytes.scales: missing required key (the packed file's"),
    (lambda d: d["size_bytes"].update(onnx_=5), "report.size_bytes: unknown key 'onnx_'"),
    (lambda d: d["accuracy"].pop("dataset"), "report.accuracy.dataset: missing required key"),
    (lambda d: d["accuracy"]["fp32"].update(top1=101.0), "report.accuracy['fp32'].top1: 101.0 is above the maximum"),
    (lambda d: d["accuracy"]["fp32"].update(top5=1.0), "report.accuracy['fp32'].top5: 1.0 is below top1 = 84.0"),
    (lambda d: d["statistics"].update(bn="folded"), "report.statistics.bn: expected one of 'real', 'identity'"),
    (lambda d: d["statistics"].pop("synthesis"), "report.statistics.synthesis: missing required key"),
    (lambda d: d["recipe"]["passes"][0]["config"].update(x=math.nan), "report.recipe.passes[0].config['x']: nan"),
    (lambda d: d["recipe"]["passes"][0]["info"].update(x=[1]), "report.recipe.passes[0].info['x']: expected"),
    (lambda d: d["layers"][1].pop("c_min"), "report.layers[1].c_mean: c_folded, c_min, c_mean and c_max come"),
    (lambda d: d["input_shape"].append(4), "report.input_shape: expected 3 items, got 4"),
    (lambda d: d["engine"]["builds"]["fp16"].update(stripped="no"), "report.engine.builds['fp16'].stripped"),
    (lambda d: d["parity"]["onnx_fp32"].update(ok="yes"), "report.parity['onnx_fp32'].ok: expected"),
])
def test_from_dict_is_strict(full_report, mutate, expect):
    d = full_report.to_dict()
    mutate(d)
    with pytest.raises(ReportError) as err:
        Report.from_dict(d)
    assert _one_line(err).startswith(expect), str(err.value)
    assert isinstance(err.value, DfmpcError) and isinstance(err.value, ValueError)


@pytest.mark.parametrize("version, hint", [(1, "report_from_v1"), (3, "this version reads 2"), (True, "reads 2"),
                                           ("2", "reads 2"), (None, "reads 2")])
def test_wrong_format_version(full_report, version, hint):
    d = full_report.to_dict()
    d["format_version"] = version
    with pytest.raises(ReportError) as err:
        Report.from_dict(d)
    assert _one_line(err).startswith("report.format_version:") and hint in str(err.value)
    del d["format_version"]
    with pytest.raises(ReportError, match="report.format_version: missing required key"):
        Report.from_dict(d)


def test_integral_floats_are_integers_as_in_json_schema(full_report):
    d = full_report.to_dict()
    d["layers"][3]["bits"] = 2.0
    assert Report.from_dict(d).layers[3].bits == 2 and type(Report.from_dict(d).layers[3].bits) is int


def test_not_an_object():
    with pytest.raises(ReportError, match="expected a JSON object, got list"):
        Report.from_dict([])  # type: ignore[arg-type]


def test_constructor_checks_types_and_values(full_report):
    with pytest.raises(TypeError, match=r"^LayerRow\.bits: expected an integer, got '2'$"):
        LayerRow(layer="a", kind="conv", role="low", bits="2", format="ternary", shape=(1,), params=1, partner=None)
    with pytest.raises(ValueError, match=r"^LayerRow\.role: expected one of 'low', 'high-compensating', 'high'"):
        LayerRow(layer="a", kind="conv", role="lo", bits=2, format="ternary", shape=(1,), params=1, partner=None)
    with pytest.raises(ValueError, match=r"^TopK\.top1: nan is not allowed \(JSON has no NaN or infinity\)$"):
        TopK(top1=float("nan"), top5=1.0, n=1)
    with pytest.raises(ValueError, match=r"^Bits\.low: 6 is above high = 2$"):
        Bits(low=6, high=2, mixed=False, avg_code_bits=3.0)
    with pytest.raises(ValueError, match=r"LatencyStats\.p90: percentiles out of order"):
        LatencyStats(p50=2.0, p90=1.0, p99=3.0, mean=1.0, iters=3)
    with pytest.raises(TypeError, match=r"^Report\.layers\[0\]: expected a LayerRow, got dict"):
        dataclasses.replace(full_report, layers=[{"layer": "x"}])
    with pytest.raises(TypeError, match=r"^PassRecord\.config\['bits'\]: BitsSpec BitsSpec\(low=2, high=6\) is not a "
                                        r"JSON value$"):
        from dfmpc_deploy.core.config import BitsSpec
        PassRecord(name="q", config={"bits": BitsSpec(2, 6)}, seconds=0.0)
    with pytest.raises(ValueError, match=r"^Accuracy\.results\['n'\]: 'n' is reserved"):
        Accuracy(dataset="d", n=1, results={"n": TopK(top1=1.0, top5=2.0, n=1)})
    with pytest.raises(ValueError, match=r"^Report\.input_shape: \[3, 0, 32\] has a non-positive size$"):
        dataclasses.replace(full_report, input_shape=(3, 0, 32))


def test_constructor_normalises(full_report):
    row = LayerRow(layer="a", kind="conv", role="low", bits=np.int64(2), format="ternary", shape=[4, np.int32(3)],
                   params=12, partner="b", c_folded=False, c_min=np.float32(0.5), c_mean=0.75, c_max=1,
                   zero_fraction=np.float64(0.25))
    assert type(row.bits) is int and row.shape == (4, 3) and type(row.c_min) is float and type(row.c_max) is float
    assert LayerRow.from_dict(json.loads(json.dumps(row.to_dict()))) == row
    r = dataclasses.replace(full_report, notes=["a", "b"], targets=["ort"])
    assert r.notes == ("a", "b") and r.targets == ("ort",)
    with pytest.raises(dataclasses.FrozenInstanceError):
        r.model = "x"  # type: ignore[misc]
    with pytest.raises(TypeError, match=r"^LayerRow\.bits: expected an integer, got tensor"):
        dataclasses.replace(row, bits=torch.tensor(2))


def test_sizes_flat_form():
    s = Sizes(fp32=100, onnx={"fp32": 90, "w8a8_ort": 30}, engine={"fp16": 70})
    assert s.to_dict() == {"fp32": 100, "onnx_fp32": 90, "onnx_w8a8_ort": 30, "engine": {"fp16": 70}}
    assert Sizes.from_dict(s.to_dict()) == s
    assert Sizes(fp32=1).to_dict() == {"fp32": 1}
    assert Sizes.from_dict({"fp32": 1, "engine": {}}) == Sizes(fp32=1, engine={})  # engines requested, none built


def test_bits_display_and_from_rows(full_report):
    assert Bits(low=2, high=6, mixed=False, avg_code_bits=3.9).display() == "2/6"
    assert str(Bits(low=2, high=6, mixed=True, avg_code_bits=3.9712)) == "mixed 2..6 (3.97 bits/weight)"
    assert Bits(low=3, high=6, mixed=False, avg_code_bits=5.0).low_name == "3-bit DoReFa"  # no grid: before --grid
    # the real ResNet-20 file: 24426 + 109668 code bytes for 268336 weights
    assert full_report.bits.avg_code_bits == round(8 * (24426 + 109668) / 268336, 4)


@pytest.mark.parametrize("grid,name", [("int", "int"), ("dorefa", "DoReFa")])
def test_bits_name_the_grid(grid, name):
    b = Bits(low=2, high=6, mixed=False, avg_code_bits=3.9, grid=grid)
    assert (b.display(), b.low_name, b.high_name) == (f"2/6 {name}", "ternary", f"6-bit {name}")
    assert Bits.from_dict(b.to_dict()) == b and b.to_dict()["grid"] == grid
    assert "grid" not in Bits(low=2, high=6, mixed=False, avg_code_bits=3.9).to_dict()  # old reports still read
    assert str(Bits(low=3, high=8, mixed=True, avg_code_bits=4.5, grid=grid)) == f"mixed 3..8 {name} (4.50 bits/weight)"
    assert Bits(low=2, high=2, mixed=False, avg_code_bits=1.6, grid=grid).display() == "2/2"  # ternary only


def test_section_from_dict():
    lat = Report.section_from_dict("latency_ms", {"ort": "skipped: onnxruntime not installed", "trt": {}})
    assert lat == {"ort": "skipped: onnxruntime not installed", "trt": {}}
    with pytest.raises(ReportError, match=r"^report\.latency_ms\['ort'\]\['fp32'\]\['1'\]\.iters: missing"):
        Report.section_from_dict("latency_ms", {"ort": {"fp32": {"1": {"p50": 1, "p90": 1, "p99": 1, "mean": 1}}}})
    with pytest.raises(ReportError, match="no section 'latency'"):
        Report.section_from_dict("latency", {})


def test_json_config_of_a_pass_config():
    from dfmpc_deploy.passes.quantize import Quantize

    cfg = json_config(Quantize())
    assert cfg["bits"] == {"low": 2, "high": 6} and cfg["per_channel"] is False
    assert json.loads(json.dumps(cfg)) == cfg
    assert PassRecord(name="compensate", config=cfg, seconds=1.5).config == cfg
    with pytest.raises(ValueError, match="cannot be written to JSON"):
        json_config({"x": float("inf")})


def test_layer_rows_and_pairs_from_a_real_model():
    from dfmpc_deploy.io.container import avg_code_bits
    from dfmpc_deploy.passes.recipes import compensate
    from tests.conftest import TinyNet

    torch.manual_seed(0)
    net = TinyNet().eval()
    mp = compensate(net, (3, 16, 16), recal="none", rounding="nearest")
    rows = layer_rows(mp)
    assert [r.layer for r in rows] == list(mp.layers) == ["stem", "conv1", "conv2", "fc"]
    for r, q in zip(rows, mp.layers.values()):
        assert (r.role, r.bits, r.params, r.shape, r.partner) == (q.role, q.bits, q.numel, tuple(q.codes.shape),
                                                                 q.partner)
        assert r.has_c == (q.c is not None)
        if q.c is not None:
            assert r.c_min <= r.c_mean <= r.c_max and r.c_folded == q.c_folded
            assert r.c_mean == round(float(q.c.mean()), 4)
        assert (r.zero_fraction is not None) == (q.bits == 2)
        if q.bits == 2:
            assert r.zero_fraction == round(float((q.codes == 0).sum()) / q.numel, 4)
    assert {r.role for r in rows} == {"low", "high-compensating", "high"}
    bits = Bits.from_rows(rows, low=2, high=6)
    assert bits.avg_code_bits == round(avg_code_bits(mp.layers.values()), 4)
    pairs = [Pair.from_link(lk) for lk in mp.analysis().pairs]
    assert pairs == [Pair(low="conv1", high="conv2", bn="bn1", act="relu")]
    rows_d = [r.to_dict() for r in rows]
    assert [LayerRow.from_dict(d) for d in rows_d] == rows
