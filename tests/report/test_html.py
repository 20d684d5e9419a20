"""report.html: self-contained, well-formed, escaped, bounded in size, and degrading when keys are missing."""
from __future__ import annotations

import copy
import json
import math
import shutil
import subprocess
from html.parser import HTMLParser

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dfmpc_deploy.report.html import render_html

VOID = {"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "source", "track", "wbr"}

# A trimmed copy of a real `dfmpc-deploy build` report (resnet20, --data, --targets ort trt, no CUDA).
FULL = {
    "format_version": 1, "model": "resnet20_cifar10_optA",
    "weights": "/work/shared/data/weights/akamaster_cifar10/resnet20-12fca82f.th", "bits": "2/6",
    "method": "dfmpc", "estimator": "synthetic BN-statistics matching (32 samples, 30 Adam steps; no data)",
    "config": {"lambda1": 0.5, "lambda2": 0.0, "compensation": False, "c_mode": "paper", "per_channel": False,
               "recal": "synthetic", "recal_scope": "low", "rounding": "gptq", "gptq_scope": "low",
               "grid_search": True, "synth_samples": 32, "synth_steps": 30, "synth_lr": 0.25, "seed": 0},
    "input_shape": [3, 32, 32],
    "preprocessing": {"mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225], "resize": None},
    "accuracy": {"dataset": "imagefolder:/work/shared/data/cifar10-test-jpg/test", "n": 300,
                 "fp32": {"top1": 84.0, "top5": 98.33, "n": 300},
                 "quantized_uncompensated": {"top1": 11.33, "top5": 68.0, "n": 300},
                 "dfmpc": {"top1": 78.33, "top5": 97.67, "n": 300},
                 "torch_fp32": {"top1": 84.0, "top5": 98.33, "n": 300},
                 "torch_fakequant": {"top1": 78.33, "top5": 97.67, "n": 300},
                 "onnx_fp32": {"top1": 78.33, "top5": 97.67, "n": 300},
                 "onnx_wdq": {"top1": 78.33, "top5": 97.67, "n": 300},
                 "onnx_w8a8_ort": {"top1": 78.0, "top5": 97.67, "n": 300}},
    "packed_file": "model.dfmpc",
    "packing": {"compression": 6.022, "weights": 268336, "bits_per_weight": 3.9978,
                "bits_per_weight_theoretical": 4.1797, "bits_per_weight_min": 3.9908},
    "size_bytes": {"fp32": 1084392, "packed": 180070, "low_bit_codes": 24426, "high_bit_codes": 109668,
                   "scales": 2792, "float_tensors": 11200, "metadata": 31984, "theoretical": 154188,
                   "theoretical_min": 147853, "onnx_fp32": 1088313, "onnx_fp16": 550351, "onnx_wdq": 291405,
                   "onnx_w8a8": 297679, "onnx_w8a8_ort": 311256,
                   "engine": {"fp16": 1270324, "wdq": 1949684, "w8a8": 3367604}},
    "latency_ms": {"ort": {
        "fp32": {"1": {"p50": 0.861, "p90": 5.223, "p99": 12.849, "mean": 2.053, "iters": 89},
                 "8": {"p50": 9.989, "p90": 13.845, "p99": 20.859, "mean": 11.114, "iters": 15}},
        "wdq": {"1": {"p50": 1.492, "p90": 9.482, "p99": 13.456, "mean": 3.487, "iters": 89},
                "8": {"p50": 26.318, "p90": 33.784, "p99": 34.652, "mean": 26.707, "iters": 15}},
        "w8a8_ort": {"1": {"p50": 0.466, "p90": 4.451, "p99": 8.967, "mean": 1.338, "iters": 89},
                     "8": {"p50": 6.457, "p90": 12.795, "p99": 14.558, "mean": 6.759, "iters": 15}}}},
    "speedup": {"ort": {"wdq": {"1": 0.577, "8": 0.38}, "w8a8_ort": {"1": 1.848, "8": 1.547}}},
    "threads": {"ort": 2},
    "parity": {"onnx_fp32": {"max_abs_diff": 9.5e-06, "max_abs_ref": 19.68, "top1_agreement": 1.0, "n": 64,
                             "ok": True},
               "onnx_w8a8": {"max_abs_diff": 2.47, "max_abs_ref": 19.68, "top1_agreement": 0.953, "n": 64,
                             "ok": None}},
    "engine": {"backend": "tensorrt_rtx 1.7.1.116",
               "builds": {"fp16": {"build_seconds": 0.139, "size_bytes": 1270324, "stripped": False,
                                   "path": "engine_fp16.plan"}}},
    "artifacts": {"onnx_fp32": "model_fp32.onnx", "engine_fp16": "engine_fp16.plan"},
    "timings_s": {"load": 0.051, "load_data": 0.262, "compensate": 45.721, "evaluate": 1.549, "pack": 0.105,
                  "targets": 6.477, "synth_seconds": 35.188, "rounding_seconds": 10.405, "total_seconds": 45.72},
    "diagnostics": {"synth_loss_initial": 14.66912, "synth_loss_final": 0.77528, "rounded_layers": 9},
    "layers": [
        {"layer": "conv1", "kind": "conv", "role": "high", "bits": 6, "format": "uniform", "shape": [16, 3, 3, 3],
         "params": 432, "partner": None},
        {"layer": "layer1.0.conv1", "kind": "conv", "role": "low", "bits": 2, "format": "ternary",
         "shape": [16, 16, 3, 3], "params": 2304, "partner": "layer1.0.conv2", "c_folded": False,
         "c_min": 0.5238, "c_mean": 0.7852, "c_max": 1.0475, "zero_fraction": 0.6489},
        {"layer": "layer1.0.conv2", "kind": "conv", "role": "high-compensating", "bits": 6, "format": "uniform",
         "shape": [16, 16, 3, 3], "params": 2304, "partner": "layer1.0.conv1"},
        {"layer": "linear", "kind": "linear", "role": "high", "bits": 6, "format": "uniform", "shape": [10, 64],
         "params": 640, "partner": None}],
    "notes": ["ort: CPUExecutionProvider, 2 intra-op threads, ORT_ENABLE_ALL",
              "trt: engines built (CPU AOT) but not run: no CUDA device here"],
}

# `--method rtn` with random weights, no --data, no --targets (the shape of a quick smoke build).
RTN_RANDOM = {
    "format_version": 1, "model": "resnet20_cifar10_optA", "weights": "random", "bits": "2/6", "method": "rtn",
    "estimator": "none (round-to-nearest)", "config": {"compensation": False, "recal": "none"},
    "input_shape": [3, 32, 32], "size_bytes": {"fp32": 1084392},
    "timings_s": {"load": 0.2, "compensate": 0.05, "quantize_seconds": 0.04},
    "diagnostics": {}, "layers": [
        {"layer": "conv1", "kind": "conv", "role": "high", "bits": 6, "format": "uniform", "shape": [16, 3, 3, 3],
         "params": 432, "partner": None},
        {"layer": "layer1.0.conv1", "kind": "conv", "role": "low", "bits": 2, "format": "ternary",
         "shape": [16, 16, 3, 3], "params": 2304, "partner": "layer1.0.conv2", "zero_fraction": 0.41}],
    "notes": ["Built with seeded RANDOM weights: sizes, latency and export are real, accuracy is not."],
}


def resnet50_shaped() -> dict:
    """A report the size of a ResNet-50 build: 54 layers with long pytorchcv names, three batch sizes, two targets."""
    layers = [{"layer": "features.init_block.conv.conv", "kind": "conv", "role": "high", "bits": 6,
               "format": "uniform", "shape": [64, 3, 7, 7], "params": 9408, "partner": None}]
    i = 0
    for s, units in enumerate((3, 4, 6, 3), start=1):
        for u in range(1, units + 1):
            names = [f"features.stage{s}.unit{u}.body.conv{k}.conv" for k in (1, 2, 3)]
            if u == 1:
                names.append(f"features.stage{s}.unit{u}.identity_conv.conv")
            for n in names:
                low = i % 2 == 0
                row = {"layer": n, "kind": "conv", "role": "low" if low else "high-compensating",
                       "bits": 2 if low else 6, "format": "ternary" if low else "uniform",
                       "shape": [256 * s, 64 * s, 3, 3], "params": 147456 * s * s, "partner": "x." + n}
                if low:
                    row.update(c_folded=True, c_min=0.41 + i / 1000, c_mean=0.8, c_max=1.2, zero_fraction=0.55)
                layers.append(row)
                i += 1
    layers.append({"layer": "output", "kind": "linear", "role": "high", "bits": 6, "format": "uniform",
                   "shape": [1000, 2048], "params": 2048000, "partner": None})
    assert len(layers) == 54
    rep = copy.deepcopy(FULL)
    rep.update(model="resnet50", layers=layers)
    st = {"p50": 3.2, "p90": 3.5, "p99": 4.0, "mean": 3.3, "iters": 100}
    per_b = {b: dict(st) for b in ("1", "8", "32")}
    rep["latency_ms"] = {"ort": {v: copy.deepcopy(per_b) for v in ("fp32", "fp16", "wdq", "w8a8", "w8a8_ort")},
                         "trt": {v: copy.deepcopy(per_b) for v in ("fp16", "wdq", "w8a8")}}
    rep["notes"] = [f"note {k}: " + "x" * 200 for k in range(20)]
    return rep


class _Checker(HTMLParser):
    """Records tag balance problems, section ids, and anything that would load an external resource."""

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.stack: list[str] = []
        self.errors: list[str] = []
        self.sections: list[str] = []
        self.tags: dict[str, int] = {}
        self.external: list[str] = []
        self.text: list[str] = []

    def handle_starttag(self, tag, attrs):
        self.tags[tag] = self.tags.get(tag, 0) + 1
        if tag == "title" and self.stack == ["html", "head"]:
            self.tags["head title"] = self.tags.get("head title", 0) + 1
        a = dict(attrs)
        if tag == "section":
            self.sections.append(a.get("id"))
        for k in ("src", "href", "xlink:href"):
            if k in a:
                self.external.append(f"{tag} {k}={a[k]}")
        if tag not in VOID:
            self.stack.append(tag)

    def handle_startendtag(self, tag, attrs):
        self.tags[tag] = self.tags.get(tag, 0) + 1

    def handle_endtag(self, tag):
        if tag in VOID:
            return
        if not self.stack or self.stack[-1] != tag:
            self.errors.append(f"</{tag}> closes {self.stack[-1] if self.stack else 'nothing'}")
            return
        self.stack.pop()

    def handle_data(self, data):
        self.text.append(data)


def check(page: str, strict: bool = True) -> _Checker:
    assert page.startswith("<!DOCTYPE html>")
    p = _Checker()
    p.feed(page)
    p.close()
    assert p.errors == [], p.errors[:5]
    assert p.stack == [], p.stack
    for t in ("html", "head", "body", "head title", "main"):
        assert p.tags.get(t) == 1, t
    assert "script" not in p.tags and "link" not in p.tags and "img" not in p.tags and "iframe" not in p.tags
    assert p.external == []
    assert len(p.sections) == len(set(p.sections))
    low = page.lower()
    assert "url(" not in low and "@import" not in low
    if strict:  # our fixtures hold no URLs: the only one is the SVG namespace
        assert low.count("http") == low.count('xmlns="http://www.w3.org/2000/svg"')
    return p


def test_minimal_dict():
    for rep in ({}, {"model": "tiny", "bits": "2/6", "method": "rtn", "estimator": "none", "weights": "random"}):
        page = render_html(rep)
        p = check(page)
        assert {"size", "accuracy", "latency", "layers", "timings", "notes"} <= set(p.sections)
        assert "No accuracy measured" in page and "No latency measured" in page
    assert "RANDOM WEIGHTS" in render_html({"weights": "random"})
    assert "RANDOM WEIGHTS" not in render_html({"weights": "pretrained"})


def test_full_report():
    page = render_html(FULL)
    p = check(page)
    assert {"size", "accuracy", "latency", "layers", "parity", "timings", "notes", "config"} <= set(p.sections)
    assert p.tags["svg"] >= 6  # size, accuracy, 2 latency panels, layers, 2 timings
    text = " ".join(p.text)
    for s in ("resnet20_cifar10_optA", "2/6", "dfmpc", "synthetic BN-statistics matching", "ONNX w8a8_ort",
              "TensorRT engine w8a8", "1.08 MB", "0.180 MB", "84.00 %", "78.33 %", "0.466 ms", "1.85",
              "layer1.0.conv1", "high-compensating", "0.7852 (0.5238..1.0475)", "0.649", "n = 300",
              "imagefolder:/work/shared/data/cifar10-test-jpg/test", "no CUDA device here", "tensorrt_rtx"):
        assert s in text, s
    assert "RANDOM WEIGHTS" not in page
    assert "<line" in page  # p90 whiskers, grid, dashed references
    json.dumps(FULL)  # the fixture is JSON-shaped (what report.json holds)


def test_rtn_random_no_data_no_targets():
    page = render_html(RTN_RANDOM)
    p = check(page)
    text = " ".join(p.text)
    assert "RANDOM WEIGHTS" in text and "No accuracy measured" in text and "No latency measured" in text
    assert "parity" not in p.sections
    assert "1.08 MB" in text and "0.41" in text


def test_odd_values_degrade():
    rep = copy.deepcopy(FULL)
    rep["latency_ms"] = {"ort": "skipped: onnxruntime not installed", "trt": {},
                         "torch-cuda": {"eager_fp16": {"1": {"p50": math.nan, "p90": None}}}}
    rep["engine"] = "skipped: tensorrt/tensorrt_rtx not installed"
    rep["size_bytes"]["engine"] = {}
    rep["size_bytes"]["packed"] = "n/a"
    rep["accuracy"]["weird"] = {"top1": None}
    rep["accuracy"]["fp32"]["top5"] = math.inf
    rep["speedup"] = None
    rep["layers"] = [{"layer": "x"}, {"bits": 4, "role": "mystery", "shape": "?"}, "not a row"]
    rep["timings_s"] = {"load": "fast"}
    rep["notes"] = "a single note"
    page = render_html(rep)
    check(page)
    assert "skipped: onnxruntime not installed" in page and "a single note" in page


def test_escaping():
    rep = copy.deepcopy(FULL)
    evil = "<script>alert('x')</script>"
    rep["model"] = 'res<b>net"&' + evil
    rep["notes"] = [evil, "a & b < c"]
    rep["weights"] = "/tmp/<img src=x onerror=alert(1)>.th"
    rep["accuracy"]["dataset"] = "imagefolder:/data/" + evil
    rep["accuracy"][evil] = {"top1": 50.0}
    rep["latency_ms"]["ort"][evil] = {"1": {"p50": 1.0, "p90": 2.0}}
    rep["layers"][0]["layer"] = "conv1" + evil
    rep["layers"][1]["role"] = evil
    rep["config"][evil] = evil
    page = render_html(rep)
    p = check(page)  # no <script>, <img> or stray <b> parsed as tags
    assert "<script" not in page.lower() and "<img" not in page.lower() and "<b>" not in page
    assert "&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt;" in page
    assert "a &amp; b &lt; c" in page
    assert evil in " ".join(p.text)  # the text survives, escaped, for the reader


def test_size_bound_resnet50():
    rep = resnet50_shaped()
    page = render_html(rep)
    p = check(page)
    assert len(page.encode("utf-8")) < 300_000, len(page.encode("utf-8"))
    text = " ".join(p.text)
    assert "features.stage4.unit3.body.conv3.conv" in text and "output" in text
    assert p.tags["tr"] >= 54


def _chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.skipif(_chromium() is None, reason="chromium / chromium-browser not installed (headless render check)")
def test_renders_in_headless_chromium(tmp_path):
    from PIL import Image

    page = tmp_path / "report.html"
    page.write_text(render_html(FULL), encoding="utf-8")
    shot = tmp_path / "shot.png"
    cmd = [_chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           f"--user-data-dir={tmp_path / 'profile'}", f"--screenshot={shot}", "--window-size=1200,1800",
           page.as_uri()]
    try:
        subprocess.run(cmd, capture_output=True, timeout=120, check=False)
    except subprocess.TimeoutExpired:
        pytest.fail("headless chromium did not finish within 120 s")
    assert shot.is_file(), "chromium wrote no screenshot"
    assert shot.stat().st_size > 10_000
    with Image.open(shot) as im:
        im = im.convert("RGB")
        assert im.size == (1200, 1800)
        colours = im.getcolors(maxcolors=1 << 16)
        assert colours is None or len(colours) > 50  # not a blank page
        lo, hi = zip(*im.getextrema())
        assert min(lo) < 60 and max(hi) > 200  # dark text on a light page


_json = st.recursive(st.none() | st.booleans() | st.integers(-10**12, 10**12) | st.floats() | st.text(max_size=12),
                     lambda kids: st.lists(kids, max_size=4) | st.dictionaries(st.text(max_size=8), kids, max_size=4),
                     max_leaves=12)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(key=st.sampled_from(sorted(FULL)), value=_json, inner=st.booleans())
def test_any_value_in_any_key_renders(key, value, inner):
    """A report with one key (or one entry inside it) replaced by arbitrary JSON still renders well-formed."""
    rep = copy.deepcopy(FULL)
    if inner and isinstance(rep[key], dict) and rep[key]:
        rep[key][sorted(rep[key])[0]] = value
    elif inner and isinstance(rep[key], list) and rep[key]:
        rep[key][0] = value
    else:
        rep[key] = value
    check(render_html(rep), strict=False)
