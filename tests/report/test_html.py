"""report.html: self-contained, well-formed, escaped, bounded in size, legible for deep models, degrading gracefully."""
from __future__ import annotations

import dataclasses
import re
import shutil
import subprocess
from html.parser import HTMLParser

import pytest
from hypothesis import HealthCheck, given, settings

from dfmpc_deploy.report import Engine, EngineBuild, LayerRow, Pair, PassRecord, Report, Statistics, render_html
from tests.report import fixtures
from tests.report.strategies import reports

VOID = {"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "source", "track", "wbr"}
EVIL = "<script>alert('x')</script>"
ANSI = "\x1b[31mred\x1b[0m\x07"


class _Checker(HTMLParser):
    """Records tag balance problems, section ids, svg sizes, and anything that would load an external resource."""

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.stack: list[str] = []
        self.errors: list[str] = []
        self.sections: list[str] = []
        self.tags: dict[str, int] = {}
        self.external: list[str] = []
        self.text: list[str] = []
        self.svgs: list[dict] = []
        self.font_sizes: list[float] = []

    def handle_starttag(self, tag, attrs):
        self.tags[tag] = self.tags.get(tag, 0) + 1
        if tag == "title" and self.stack == ["html", "head"]:
            self.tags["head title"] = self.tags.get("head title", 0) + 1
        a = dict(attrs)
        if tag == "section":
            self.sections.append(a.get("id"))
        if tag == "svg":
            self.svgs.append(a)
        if tag == "text" and "font-size" in a:
            self.font_sizes.append(float(a["font-size"]))
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
    assert not re.search(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]", page), "raw control character in the page"
    if strict:  # our fixtures hold no URLs: the only one is the SVG namespace
        assert low.count("http") == low.count('xmlns="http://www.w3.org/2000/svg"')
    return p


SECTIONS = {"size", "accuracy", "latency", "recipe", "statistics", "pairs", "layers", "timings", "notes", "config",
            "raw"}


def test_minimal_report(minimal_report):
    page = render_html(minimal_report)
    p = check(page)
    assert SECTIONS <= set(p.sections) and "parity" not in p.sections
    text = " ".join(p.text)
    for s in ("No accuracy measured", "No latency measured", "Layer pairs were not recorded", "No notes.",
              "BN statistics: not recorded (report converted from format 1).", "Runtime: not recorded"):
        assert s in text, s
    assert "RANDOM WEIGHTS" not in page


def test_full_report(full_report):
    page = render_html(full_report)
    p = check(page)
    assert SECTIONS | {"parity"} <= set(p.sections)
    assert p.tags["svg"] >= 7  # size, accuracy, 2 latency panels, recipe, layers, timings
    text = " ".join(p.text)
    for s in ("resnet20_cifar10_optA", "2/6", "low = ternary", "dfmpc", "synthetic BN-statistics matching",
              "ONNX w8a8_ort", "TensorRT engine w8a8", "1.08 MB", "0.180 MB", "84.00 %", "29.00 %", "0.418 ms",
              "1.75", "layer1.0.conv1", "high-compensating", "0.798 (0.4335..1.0942)", "0.640", "n = 200",
              "imagefolder:/work/shared/data/cifar10-test-jpg/test", "no CUDA device here", "tensorrt_rtx",
              # format-2 sections: recipe passes with config and times, runtime, statistics, synthesis, pairs
              "Recipe: dfmpc (5 passes)", "gptq_round", "grid_search", "1.18 s", "rounded_layers",
              "torch 2.13.0+cpu, cpu, 2 threads", "model carries real statistics", "10 of 10", "14.7 \u2192 2.91",
              "Layer pairs (9)", "layer3.2.bn1", "relu"):
        assert s in text, s
    assert "RANDOM WEIGHTS" not in page
    assert '{"low": 2, "high": 6}' in page.replace("&quot;", '"')  # a pass's config value, as JSON


def test_random_weights_no_data_no_targets():
    r = fixtures.rtn_random_report()
    page = render_html(r)
    p = check(page)
    text = " ".join(p.text)
    assert "RANDOM WEIGHTS" in text and "No accuracy measured" in text and "No latency measured" in text
    assert "(RANDOM WEIGHTS)" in page.split("</title>")[0]
    assert "parity" not in p.sections and "not requested" in text and "No inputs were synthesised." in text
    assert "c is solved" not in text and "1.08 MB" in text


def test_skipped_and_empty_targets_degrade(full_report):
    r = dataclasses.replace(
        full_report, latency_ms={"ort": "skipped: onnxruntime not installed", "trt": {}}, speedup={},
        engine="skipped: tensorrt/tensorrt_rtx not installed", parity={}, pairs=(),
        size_bytes=dataclasses.replace(full_report.size_bytes, engine={}),
        statistics=Statistics(bn="absent", estimator="none", synthesis=None))
    page = render_html(r)
    text = " ".join(check(page).text)
    for s in ("skipped: onnxruntime not installed", "nothing measured", "skipped: tensorrt/tensorrt_rtx not installed",
              "No (low, high) pairs in this graph", "model carries absent statistics"):
        assert s in text, s


def test_every_string_is_escaped(full_report):
    bad = EVIL + ANSI + " | a & b"
    rows = (dataclasses.replace(full_report.layers[0], layer="conv1" + bad),
            dataclasses.replace(full_report.layers[1], partner=bad), *full_report.layers[2:])
    r = dataclasses.replace(
        full_report, model='res<b>net"&' + bad, weights="/tmp/<img src=x onerror=alert(1)>.th", notes=(bad, "a < c"),
        layers=rows, pairs=(Pair(low=bad, high=bad, bn=bad, act=bad),), targets=(bad,),
        accuracy=dataclasses.replace(full_report.accuracy, dataset="imagefolder:/data/" + bad,
                                     results={**full_report.accuracy.results, bad: full_report.accuracy.results["fp32"]
                                              }),
        recipe=dataclasses.replace(full_report.recipe, passes=(PassRecord(name=bad, config={bad: bad, "n": [bad]},
                                                                          seconds=1.0, info={bad: {bad: bad}}),)),
        statistics=dataclasses.replace(full_report.statistics, estimator=bad),
        latency_ms={"ort": {bad: full_report.latency_ms["ort"]["fp32"]}, bad: "skipped: " + bad},
        parity={bad: full_report.parity["onnx_fp32"]}, artifacts={bad: bad},
        engine=Engine(backend=bad, builds={bad: EngineBuild(build_seconds=1.0, size_bytes=5, stripped=True, path=bad)}),
        timings_s={bad: 1.0})
    page = render_html(r)
    p = check(page)  # no <script>, <img> or stray <b> parsed as tags, no raw control characters
    low = page.lower()
    assert "<script" not in low and "<img" not in low and "<b>" not in page
    assert "&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt;" in page
    assert "\\x1b[31mred\\x1b[0m\\x07" in " ".join(p.text)  # terminal escapes shown, not interpreted
    assert "a &amp; b" in page


def test_deep_model_layer_chart_stays_legible(deep_report):
    """ResNet-152 (156 layers): one chart row per layer at >= 14 px, labels >= 10 px, drawn at natural size."""
    page = render_html(deep_report)
    p = check(page)
    assert len(page.encode("utf-8")) < 600_000, len(page.encode("utf-8"))
    chart = next(s for s in p.svgs if s.get("class") == "layers")
    width, height = float(chart["width"]), float(chart["height"])
    n = len(deep_report.layers)
    assert n == 156
    assert width <= 1090, "wider than the page's content box: the browser would shrink its text"
    assert (height - 64) / n >= 14, "rows closer than 14 px"
    svg_text = page[page.index('class="layers"'):]
    svg_text = svg_text[:svg_text.index("</svg>")]
    sizes = [float(x) for x in re.findall(r'<text [^>]*font-size="([0-9.]+)"', svg_text)]
    assert min(sizes) >= 10, min(sizes)
    for r in deep_report.layers:  # every layer is labelled, with its full name on hover
        assert f"<title>{r.layer}</title>" in svg_text, r.layer
    assert "features.stage3.unit36.body.conv2.conv" in " ".join(p.text)
    assert p.tags["tr"] >= n


def _chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.skipif(_chromium() is None, reason="chromium / chromium-browser not installed (headless render check)")
@pytest.mark.parametrize("build", [fixtures.full_report, fixtures.deep_report], ids=lambda f: f.__name__)
def test_renders_in_headless_chromium(tmp_path, build):
    from PIL import Image

    page = tmp_path / "report.html"
    page.write_text(render_html(build()), encoding="utf-8")
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


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(r=reports)
def test_any_report_renders(r: Report):
    """Any valid report (random strings with markup and control characters included) renders a well-formed page."""
    check(render_html(r), strict=False)


def test_rejects_a_dict():
    with pytest.raises(TypeError, match="expected a Report, got dict"):
        render_html({"model": "x"})  # type: ignore[arg-type]


def test_layer_row_with_every_optional_field_missing(full_report):
    rows = tuple(LayerRow(layer=f"l{i}", kind="linear", role="high", bits=8, format="uniform", shape=(2, 2), params=4,
                          partner=None) for i in range(3))
    text = " ".join(check(render_html(dataclasses.replace(full_report, layers=rows))).text)
    assert "c mean" not in text and "zero frac." not in text
