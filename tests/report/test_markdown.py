"""report.md: every section from the typed object, escaped, degrading to one line when a section is absent."""
from __future__ import annotations

import dataclasses

import pytest

from dfmpc_deploy.report import Pair, render_markdown
from dfmpc_deploy.report.markdown import md_text, visible
from tests.report import fixtures


def _table(md: str, header: str) -> list[list[str]]:
    """The rows of the Markdown table whose header line starts with ``header`` (cells split on unescaped |)."""
    lines = md.splitlines()
    i = next(k for k, line in enumerate(lines) if line.startswith(header))
    rows = []
    for line in lines[i + 2:]:
        if not line.startswith("|"):
            break
        cells = line.replace("\\|", "\0").strip("|").split("|")
        rows.append([c.strip().replace("\0", "|") for c in cells])
    return rows


def test_full_report(full_report):
    md = render_markdown(full_report)
    assert md.startswith("# dfmpc-deploy build: resnet20_cifar10_optA\n")
    for s in ("- bits: 2/6  (low = ternary, high = 6-bit DoReFa", "synthetic BN-statistics matching",
              "- synthesis: 32 samples at 32 px, 10/10 steps, loss 14.7 -> 2.91, 1.78 s",
              "- runtime: torch 2.13.0+cpu on cpu, 2 threads", "## Recipe: dfmpc", "**gptq_round** config: scope=low",
              "info: rounded_layers=9", "## Layer pairs", "## Accuracy on imagefolder:", "## Parity",
              "| onnx_w8a8 | 0.571 | 11.0 | 1.00 | 64 | by top-1 |", "## TensorRT engines", "Backend: tensorrt_rtx",
              "Packed: 6.02x smaller than FP32", "- targets: ort, trt", "## Notes"):
        assert s in md, s
    assert "RANDOM" not in md
    layers = _table(md, "| layer |")
    assert len(layers) == len(full_report.layers) and all(len(r) == 9 for r in layers)
    assert layers[1][:4] == ["layer1.0.conv1", "conv", "low", "2"] and layers[1][7] == "0.798 (0.4335..1.0942)"
    assert _table(md, "| low |")[0] == ["layer1.0.conv1", "layer1.0.conv2", "layer1.0.bn1", "relu"]
    acc = _table(md, "| model |")
    assert acc[0] == ["fp32", "84.00", "99.50", "200"] and len(acc) == len(full_report.accuracy.results)
    lat = _table(md, "| target |")
    assert ["ort", "w8a8_ort", "1", "0.418", "4.445", "12.401", "1.560", "98", "1.75x"] in lat
    assert len(lat) == 8


def test_minimal_report(minimal_report):
    md = render_markdown(minimal_report)
    for s in ("Not measured (no --data).", "Not measured (no latency targets).", "| fp32 | 3456 | 3.5 kB |"):
        assert s in md, s
    for s in ("## Layer pairs", "## Parity", "## Notes", "synthesis", "runtime"):
        assert s not in md, s


def test_random_weights_are_labelled():
    md = render_markdown(fixtures.rtn_random_report())
    assert "> **RANDOM weights: accuracy is meaningless.**" in md
    full = fixtures.full_report()
    md = render_markdown(dataclasses.replace(full, weights="random"))
    assert "Random weights: these accuracies are meaningless." in md


def test_allocation_is_described():
    md = render_markdown(fixtures.allocation_report())
    assert ("- bits: mixed 2..6 (4.43 bits/weight), chosen per layer by data-free sensitivity within 150000 bytes: "
            "6 layers at 2 bits, 3 layers at 4 bits, 11 layers at 6 bits (2 = ternary; activations FP32)") in md


def test_skipped_targets_and_no_pairs(full_report):
    r = dataclasses.replace(full_report, latency_ms={"ort": "skipped: onnxruntime not installed", "trt": {}},
                            engine="skipped: tensorrt/tensorrt_rtx not installed", pairs=())
    md = render_markdown(r)
    for s in ("- ort: skipped: onnxruntime not installed", "- trt: nothing measured",
              "skipped: tensorrt/tensorrt_rtx not installed", "No (low, high) pairs in this graph"):
        assert s in md, s


def test_every_string_is_escaped(full_report):
    bad = "<script>alert(1)</script> | x\n\x1b[31mred\x1b[0m"
    rows = (dataclasses.replace(full_report.layers[0], layer=bad, partner=bad), *full_report.layers[1:])
    r = dataclasses.replace(full_report, model=bad, layers=rows, notes=(bad,), pairs=(Pair(low=bad, high="h", bn=None,
                                                                                            act=bad),))
    md = render_markdown(r)
    assert "<script>" not in md and "\x1b" not in md
    assert "&lt;script&gt;alert(1)&lt;/script&gt; \\| x\\x0a\\x1b[31mred\\x1b[0m" in md
    layers = _table(md, "| layer |")
    assert len(layers) == len(rows) and all(len(x) == 9 for x in layers)  # the table is intact
    assert layers[0][0] == "&lt;script&gt;alert(1)&lt;/script&gt; | x\\x0a\\x1b[31mred\\x1b[0m"
    assert _table(md, "| low |")[0][2] == "-"


@pytest.mark.parametrize("s, want", [("a|b", "a\\|b"), ("<b>", "&lt;b&gt;"), ("tab\there", "tab\\x09here"),
                                     ("\x7f\x85\u2028", "\\x7f\\x85\\u2028"), ("ok é 中", "ok é 中")])
def test_md_text(s, want):
    assert md_text(s) == want
    assert visible("a\nb", keep=" \n") == "a\nb"
