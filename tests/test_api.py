"""dfmpc_deploy.api: the Python API, through exactly the README's example (a module that is in no model zoo)."""
from __future__ import annotations

import json

import pytest
import torch

import dfmpc_deploy
import dfmpc_deploy.api as dd
from dfmpc_deploy import api
from dfmpc_deploy.errors import DfmpcError, UsageError
from dfmpc_deploy.report.export import ExportReport
from dfmpc_deploy.report.files import read_report
from dfmpc_deploy.zoo.data import Dataset
from dfmpc_deploy.zoo.models import settle_bn_statistics_
from tests.conftest import ROOT, make_images, make_tiny_net

MARKER = "<!-- python-api-example"


def readme_example() -> str:
    """The code block after the marker in README.md, as it is printed there."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    start = text.index("```python\n", text.index(MARKER)) + len("```python\n")
    return text[start:text.index("```", start)]


def test_public_names_are_the_api():
    assert {"api", "compensate", "pack", "export", "evaluate", "InputSpec"} <= set(dfmpc_deploy.__all__)
    assert dfmpc_deploy.api is api and set(api.__all__) == {"build", "compensate", "pack", "export", "evaluate",
                                                           "replay", "InputSpec"}
    assert all(getattr(dfmpc_deploy, n) is getattr(api, n) for n in ("compensate", "pack", "export", "evaluate"))


@pytest.mark.slow
def test_readme_example_runs(tmp_path, monkeypatch, capsys):
    code = readme_example()
    definitions: dict = {}
    exec(compile(code.split("\nnet = SmallCNN()")[0], "README.md", "exec"), definitions)  # the class, to make weights
    torch.manual_seed(0)
    trained = definitions["SmallCNN"]()
    settle_bn_statistics_(trained, (3, 32, 32))  # "trained": BN statistics of image-like inputs
    torch.save(trained.state_dict(), tmp_path / "small_cnn.pth")
    make_images(tmp_path / "cifar10" / "test")
    monkeypatch.chdir(tmp_path)

    exec(compile(code, "README.md", "exec"), {"__name__": "readme"})

    printed = capsys.readouterr().out.splitlines()
    assert printed[0].startswith("2/6 ") and len(printed) == 3
    build = read_report(tmp_path / "small_cnn_build")
    assert build.model == "SmallCNN" and build.weights == "module" and build.accuracy.n == 20
    assert build.preprocessing.mean == (0.4914, 0.4822, 0.4465) and build.recipe.name == "dfmpc"
    deployed = ExportReport.from_dict(json.loads((tmp_path / "small_cnn_deploy" / "report.json").read_text()))
    assert deployed.input_source == "file" and deployed.arch == "SmallCNN"
    assert all(deployed.parity[f"onnx_{v}"].ok for v in ("fp32", "fp16", "wdq"))
    assert set(deployed.latency_ms["ort"]) == {"fp32", "wdq", "w8a8", "w8a8_ort"}
    assert eval(printed[2])["n"] == 20  # noqa: S307 - the dict evaluate() printed
    # the build's own packed file scores what the build measured
    again = dd.evaluate(tmp_path / "small_cnn_build" / "model.dfmpc", "imagefolder:cifar10/test",
                        model=definitions["SmallCNN"]())
    assert again == build.accuracy.results["dfmpc"].to_dict()


def test_build_needs_the_input_record_for_a_module(tmp_path):
    with pytest.raises(UsageError, match="needs input_shape=\\(C, H, W\\) and the mean and std"):
        dd.build(make_tiny_net(), input_shape=(3, 16, 16), out=tmp_path / "o")
    with pytest.raises(UsageError, match="model name or an nn.Module"):
        dd.build(42, out=tmp_path / "o")
    with pytest.raises(DfmpcError, match="forward pass on a zero input of shape \\(4, 16, 16\\) failed"):
        dd.build(make_tiny_net(), input_shape=(4, 16, 16), mean=(0, 0, 0), std=(1, 1, 1), out=tmp_path / "o",
                 recal="none", rounding="nearest")
    assert not (tmp_path / "o").exists()


def test_pack_records_the_input_and_evaluate_takes_a_dataset(tmp_path):
    net = make_tiny_net()
    mp = dd.compensate(net, (3, 16, 16), recal="none", rounding="nearest")
    with pytest.raises(UsageError, match="input_shape, mean and std together"):
        dd.pack(mp, tmp_path / "m.dfmpc", input_shape=(3, 16, 16))
    dd.pack(mp, tmp_path / "m.dfmpc", input_shape=(3, 16, 16), mean=(0.5,) * 3, std=(0.25,) * 3)
    assert mp.input is None  # the caller's model is not modified
    x = torch.randn(12, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        labels = mp.module(x).argmax(1)
    result = dd.evaluate(tmp_path / "m.dfmpc", Dataset("mine", x, labels), model=make_tiny_net())
    assert result == {"top1": 100.0, "top5": 100.0, "n": 12}
