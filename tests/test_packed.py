"""dfmpc_deploy.packed: ``export`` and ``eval`` from a packed file alone (CLI and Python), compared with ``build``."""
from __future__ import annotations

import dataclasses
import json
import socket
import urllib.request

import numpy as np
import onnx
import pytest
import torch

from dfmpc_deploy.build import BuildConfig, run_build
from dfmpc_deploy.cli import main
from dfmpc_deploy.core.config import InputSpec
from dfmpc_deploy.deploy import targets as targets_mod
from dfmpc_deploy.deploy.onnx_export import VARIANTS, _ranges
from dfmpc_deploy.errors import BadFileError, DfmpcError
from dfmpc_deploy.io.container import load_packed, save_packed
from dfmpc_deploy.packed import EvalConfig, ExportConfig, refit_check, refit_weights_from_packed, run_eval, run_export
from dfmpc_deploy.passes.recipes import compensate
from dfmpc_deploy.report.export import ExportReport
from dfmpc_deploy.zoo.models import file_sha256
from tests.conftest import make_images, make_tiny_net
from tests.deploy.test_trt import _need_builder
from tests.io.helpers import join, split

R20 = "resnet20_cifar10_optA"
FAST = {"synth_samples": 4, "synth_steps": 2}


def _run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """ResNet-20 (seeded random weights, a tiny synthesis budget) built with --target onnx and --data."""
    tmp = tmp_path_factory.mktemp("packed")
    images = make_images(tmp / "images")
    out = tmp / "build"
    rep = run_build(BuildConfig(model=R20, weights="random", targets=("onnx",), out=out, threads=1,
                                data=f"imagefolder:{images}", settings=FAST))
    return out, images, rep


def test_export_onnx_files_equal_builds_byte_for_byte(built, tmp_path):
    out, _, _ = built
    rep = run_export(ExportConfig(file=out / "model.dfmpc", targets=("onnx",), out=tmp_path / "e", threads=1))
    for v in VARIANTS:
        assert (tmp_path / "e" / f"model_{v}.onnx").read_bytes() == (out / f"model_{v}.onnx").read_bytes(), v
    assert rep.input_source == "file" and rep.input_shape == (3, 32, 32) and rep.arch == R20
    assert rep.packed_sha256 == file_sha256(out / "model.dfmpc") and rep.packed_format_version == 4
    assert rep.size_bytes.packed.packed == (out / "model.dfmpc").stat().st_size
    assert rep.size_bytes.onnx == {v: (out / f"model_{v}.onnx").stat().st_size for v in VARIANTS}
    assert all(rep.parity[f"onnx_{v}"].ok for v in ("fp32", "fp16", "wdq"))
    assert rep.parity["onnx_fp32"].max_abs_diff <= 1e-5 * max(1.0, rep.parity["onnx_fp32"].max_abs_ref)
    on_disk = json.loads((tmp_path / "e" / "report.json").read_text())
    assert ExportReport.from_dict(on_disk) == rep and on_disk["format_version"] == 1
    assert on_disk["artifacts"]["onnx_wdq"] == "model_wdq.onnx"  # relative to --out


def test_w8a8_ranges_from_the_file_equal_the_builds(tmp_path):
    mp = compensate(make_tiny_net(), (3, 16, 16), **FAST)
    mp.input = InputSpec((3, 16, 16), (0.5, 0.4, 0.3), (0.2, 0.25, 0.3))
    save_packed(mp, tmp_path / "m.dfmpc")
    back = load_packed(tmp_path / "m.dfmpc", model=make_tiny_net())
    notes: list[str] = []
    before, after = _ranges(mp, None, notes), _ranges(back, None, notes)
    for a, b in zip(before, after):
        assert list(a) == list(b) == ["stem", "conv1", "conv2", "fc"]
        for k in a:
            for f in ("lo", "hi", "mean", "std"):
                assert torch.equal(getattr(a[k], f), getattr(b[k], f)), f"{k}.{f} differs after packing"
    assert before[0]["stem"].hi.tolist() == pytest.approx([2.5, 2.4, 7 / 3])  # (1 - mean) / std as recorded
    assert not notes  # no "input normalisation unknown" note


def test_export_never_downloads(tmp_path, monkeypatch):
    """A pytorchcv architecture is rebuilt from its name without pretrained weights: no network access at all."""
    pytest.importorskip("pytorchcv")
    run_build(BuildConfig(model="resnet20_cifar10", weights="random", out=tmp_path / "b", threads=1,
                          settings={"recal": "none", "rounding": "nearest"}))

    def no_network(*a, **k):
        raise AssertionError("export tried to reach the network")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(urllib.request, "urlopen", no_network)
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", no_network)
    rep = run_export(ExportConfig(file=tmp_path / "b" / "model.dfmpc", out=tmp_path / "e", threads=1))
    assert rep.arch == "resnet20_cifar10" and (tmp_path / "e" / "model_wdq.onnx").is_file()


def test_version_2_file_uses_the_registry_and_says_so(built, tmp_path):
    _, images, _ = built
    out = tmp_path / "build"  # format 2 knows only DoReFa k-bit codes: a DoReFa build, written back as version 2
    run_build(BuildConfig(model=R20, weights="random", targets=("onnx",), out=out, threads=1,
                          data=f"imagefolder:{images}", settings={**FAST, "grid": "dorefa"}))
    h, payload = split((out / "model.dfmpc").read_bytes())
    (tmp_path / "v2.dfmpc").write_bytes(join(dataclasses.replace(h, version=2, input=None), payload))
    rep = run_export(ExportConfig(file=tmp_path / "v2.dfmpc", out=tmp_path / "e", threads=1))
    assert rep.input_source == "registry" and rep.packed_format_version == 2
    assert any("format-2 file without an input record" in n for n in rep.notes)
    assert (tmp_path / "e" / "model_w8a8.onnx").read_bytes() == (out / "model_w8a8.onnx").read_bytes()


def test_own_module_file_needs_its_architecture_and_input(tmp_path):
    mp = compensate(make_tiny_net(), (3, 16, 16), recal="none", rounding="nearest", arch="TinyNet")
    save_packed(mp, tmp_path / "m.dfmpc")
    with pytest.raises(DfmpcError, match="not a registered model name; pass the architecture"):
        run_export(ExportConfig(file=tmp_path / "m.dfmpc", out=tmp_path / "a"))
    with pytest.raises(DfmpcError, match="records no input shape and normalisation"):
        run_export(ExportConfig(file=tmp_path / "m.dfmpc", out=tmp_path / "b"), model=make_tiny_net())
    spec = InputSpec((3, 16, 16), (0.0, 0.0, 0.0), (1.0, 1.0, 1.0))
    rep = run_export(ExportConfig(file=tmp_path / "m.dfmpc", out=tmp_path / "c"), model=make_tiny_net(), input=spec)
    assert rep.input_source == "caller" and not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_refit_weights_come_from_the_packed_codes(built):
    """What a stripped engine_wdq.plan is refit with (on a GPU) equals model_wdq.onnx's initializers, from the file."""
    out, _, _ = built
    weights = refit_weights_from_packed(load_packed(out / "model.dfmpc"), (3, 32, 32))
    inits = {i.name: onnx.numpy_helper.to_array(i) for i in onnx.load(out / "model_wdq.onnx").graph.initializer}
    assert list(weights) == list(inits)
    assert all(weights[k].dtype == inits[k].dtype and np.array_equal(weights[k], inits[k]) for k in inits)
    assert any(a.dtype == np.int8 for a in weights.values())  # the integer codes themselves


def test_export_ort_target_latency_and_top1(built, tmp_path):
    pytest.importorskip("onnxruntime")
    out, images, rep_build = built
    rep = run_export(ExportConfig(file=out / "model.dfmpc", targets=("ort",), batch_sizes=(1,), out=tmp_path / "e",
                                  data=f"imagefolder:{images}", threads=1))
    assert set(rep.latency_ms["ort"]) == {"fp32", "wdq", "w8a8", "w8a8_ort"}
    assert rep.latency_ms["ort"]["fp32"]["1"].p50 > 0 and rep.threads == {"ort": 1}
    acc = rep.accuracy.results
    assert acc["torch_fakequant"] == rep_build.accuracy.results["dfmpc"]  # the packed model scores as it did in build
    assert {f"onnx_{v}" for v in VARIANTS} <= set(acc) and acc["onnx_wdq"].top1 == acc["torch_fakequant"].top1
    assert rep.parity["onnx_fp32"].n == 20  # parity on the --data images


def test_eval_cli_json_is_only_json(built, capsys):
    out, images, rep_build = built
    code, stdout, err = _run(capsys, "eval", str(out / "model.dfmpc"), "--data", f"imagefolder:{images}", "--json",
                             "--threads", "1")
    assert code == 0, err
    result = json.loads(stdout)
    assert list(result) == ["top1", "top5", "n"] and stdout.count("\n") == 1
    assert result == {k: v for k, v in rep_build.accuracy.results["dfmpc"].to_dict().items()}
    code, stdout, _ = _run(capsys, "eval", str(out / "model.dfmpc"), "--data", f"imagefolder:{images}", "--limit", "10")
    assert code == 0 and stdout.startswith("top-1 ") and "on 10 images" in stdout


def test_eval_ort_engine(built):
    pytest.importorskip("onnxruntime")
    out, images, _ = built
    cfg = EvalConfig(file=out / "model.dfmpc", data=f"imagefolder:{images}", engine="ort", threads=1)
    torch_cfg = dataclasses.replace(cfg, engine="torch")
    assert run_eval(cfg)["n"] == run_eval(torch_cfg)["n"] == 20


@pytest.mark.parametrize("argv, code, msg", [
    (("eval", "{file}"), 2, "eval needs --data"),
    (("eval", "{file}", "--data", "imagefolder:{images}", "--engine", "tvm"), 2, "invalid choice: 'tvm'"),
    (("eval", "{bad}", "--data", "imagefolder:{images}", "--json"), 1, "not a .dfmpc file"),
    (("export", "{bad}", "--out", "{tmp}/o"), 1, "not a .dfmpc file"),
    (("export", "{file}", "--target", "torch", "--out", "{tmp}/o"), 2, "bad --target torch"),
    (("export", "{file}", "--batch-sizes", "0", "--out", "{tmp}/o"), 2, "bad --batch-sizes 0"),
    (("export", "{file}", "--out", "{images}"), 1, "--force"),
])
def test_bad_input_is_one_line(built, tmp_path, capsys, argv, code, msg):
    out, images, _ = built
    (tmp_path / "bad.dfmpc").write_bytes(b"not a packed model at all")
    values = {"file": out / "model.dfmpc", "images": images, "bad": tmp_path / "bad.dfmpc", "tmp": tmp_path}
    got, stdout, err = _run(capsys, *[a.format(**values) for a in argv])
    assert got == code and msg in err and "Traceback" not in err, err
    assert stdout == "" and not (tmp_path / "o").exists()
    assert len([ln for ln in err.splitlines() if "error:" in ln]) == 1


def test_export_json_and_parity_failure_exit_code(built, tmp_path, capsys, monkeypatch):
    out, _, _ = built
    code, stdout, err = _run(capsys, "export", str(out / "model.dfmpc"), "--out", str(tmp_path / "e"), "--json")
    assert code == 0, err
    assert ExportReport.from_dict(json.loads(stdout)).arch == R20
    monkeypatch.setitem(targets_mod.PARITY_TOL, "fp32", (0.0, 0.0))
    code, _, err = _run(capsys, "export", str(out / "model.dfmpc"), "--out", str(tmp_path / "f"), "-q")
    assert code == 1 and "parity check FAILED for onnx_fp32" in err and (tmp_path / "f" / "report.json").is_file()


@pytest.mark.trt
@pytest.mark.slow
def test_export_builds_the_engines_build_makes(built, tmp_path):
    _need_builder()
    out, _, _ = built
    rep = run_export(ExportConfig(file=out / "model.dfmpc", targets=("trt",), batch_sizes=(1, 8), out=tmp_path / "e"))
    assert set(rep.engine.builds) == {"fp16", "wdq", "w8a8"}
    assert all((tmp_path / "e" / f"engine_{v}.plan").stat().st_size > 0 for v in ("fp16", "wdq", "w8a8"))
    if not torch.cuda.is_available():  # TensorRT-RTX 1.7.1 cannot strip without a GPU: full plan, and it says so
        assert not rep.engine.builds["wdq"].stripped
        assert any("weight-stripped build" in n and "full (non-stripped) plan instead" in n for n in rep.notes)


@pytest.mark.gpu
@pytest.mark.trt
@pytest.mark.skipif(not torch.cuda.is_available(),
                    reason="refitting a weight-stripped engine needs a CUDA GPU (TensorRT-RTX 1.7.1 cannot even build "
                           "one without a GPU); scripts/gpu_check.sh runs this test")
def test_stripped_engine_is_refit_from_the_packed_codes(built, tmp_path):
    _need_builder()
    out, _, _ = built
    rep = run_export(ExportConfig(file=out / "model.dfmpc", targets=("trt",), batch_sizes=(1, 8), out=tmp_path / "e"))
    if not rep.engine.builds["wdq"].stripped:
        pytest.skip(f"this TensorRT build made no weight-stripped plan here: {rep.notes}")
    check = rep.parity["trt_wdq_refit_dfmpc"]
    assert check.ok and check.top1_agreement >= 0.95, check
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    again = refit_check(tmp_path / "e" / "engine_wdq.plan", load_packed(out / "model.dfmpc"), (3, 32, 32), x)
    assert again["ok"], again


def test_corrupt_file_is_refused_before_any_output(built, tmp_path):
    out, _, _ = built
    data = bytearray((out / "model.dfmpc").read_bytes())
    data[-1] ^= 0xFF
    (tmp_path / "c.dfmpc").write_bytes(bytes(data))
    with pytest.raises(BadFileError, match="checksum mismatch"):
        run_export(ExportConfig(file=tmp_path / "c.dfmpc", out=tmp_path / "e"))
    assert not (tmp_path / "e").exists() and [p.name for p in tmp_path.iterdir()] == ["c.dfmpc"]
