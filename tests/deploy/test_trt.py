"""TensorRT(-RTX) engines and the run_targets entry point.

Engines are really built here when ``tensorrt_rtx`` is installed (its builder works without a GPU); running them
needs CUDA and is skipped otherwise.
"""

import logging

import pytest
import torch
import torch.fx

from dfmpc_deploy.deploy import targets as targets_mod
from dfmpc_deploy.deploy import trt
from dfmpc_deploy.deploy.onnx_export import VARIANTS, export_variants
from dfmpc_deploy.errors import DfmpcError, MissingDependencyError, UsageError
from dfmpc_deploy.passes.recipes import compensate
from tests.conftest import example_inputs, make_tiny_net

pytest.importorskip("onnx")
SHAPE = (3, 16, 16)
no_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (engines only run on NVIDIA GPUs)")


def _cfg(bits=(2, 6)) -> dict:
    return {"bits": f"{bits[0]}/{bits[1]}", "recal": "none", "rounding": "nearest"}


def _onnx_weight_bytes(path) -> int:
    import onnx

    m = onnx.load(path)
    n = 0
    for i in m.graph.initializer:
        numel = 1
        for d in i.dims:
            numel *= d
        n += numel // 2 if i.data_type == onnx.TensorProto.INT4 else numel * onnx.helper.tensor_dtype_to_np_dtype(
            i.data_type).itemsize
    return n


def _need_builder():
    name = trt.backend_name()
    if name is None:
        pytest.skip("neither tensorrt nor tensorrt_rtx is installed")
    if name == "tensorrt" and not torch.cuda.is_available():
        pytest.skip("full TensorRT needs a GPU to build (TensorRT-RTX builds on the CPU)")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    mp = compensate(make_tiny_net(), SHAPE, **_cfg())
    out = tmp_path_factory.mktemp("trt")
    return mp, export_variants(mp, out, SHAPE), out


def test_missing_backend_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(trt, "available", lambda name: False)
    assert trt.backend_name() is None
    with pytest.raises(MissingDependencyError, match="tensorrt/tensorrt_rtx not installed"):
        trt.backend()


def test_run_targets_without_backend_keeps_the_onnx(tiny, tmp_path, monkeypatch):
    mp, _, _ = tiny
    monkeypatch.setattr(trt, "available", lambda name: False)
    rep = targets_mod.run_targets(mp, None, SHAPE, ["trt"], tmp_path)
    assert rep["engine"] == "skipped: tensorrt/tensorrt_rtx not installed"
    assert (tmp_path / "model_w8a8.onnx").is_file() and not list(tmp_path.glob("*.plan"))
    assert rep["size_bytes"]["onnx_wdq"] > 0 and "engine" not in rep["size_bytes"]


def test_run_targets_rejects_bad_requests(tiny, tmp_path):
    mp, _, _ = tiny
    with pytest.raises(UsageError, match="bad --target"):
        targets_mod.run_targets(mp, None, SHAPE, ["tflite"], tmp_path)
    if not torch.cuda.is_available():
        with pytest.raises(DfmpcError, match="no CUDA device"):
            targets_mod.run_targets(mp, None, SHAPE, ["onnx", "torch-cuda"], tmp_path)
        with pytest.raises(DfmpcError, match="no CUDA device"):
            targets_mod.torch_cuda_latency(mp.module, SHAPE, (1,))
    assert not list(tmp_path.iterdir())  # nothing written before the request was checked


class _Recorder:
    """Records what run_targets shows: say() messages and every task's (done, total) updates."""

    def __init__(self):
        self.said: list[str] = []
        self.updates: dict[str, list[tuple[float, int]]] = {}

    def say(self, message: str) -> None:
        self.said.append(message)

    def task(self, label: str):
        self.updates[label] = []
        return lambda done, total, *extra: self.updates[label].append((done, total))


def test_run_targets_onnx_and_ort_report(tmp_path, monkeypatch):
    """The whole onnx + ort flow from the FP32 model: one torch.fx trace, progress rows that finish, the report."""
    pytest.importorskip("onnxruntime")
    from dfmpc_deploy.zoo.data import Dataset

    traced = []
    real_trace = torch.fx.symbolic_trace
    monkeypatch.setattr(torch.fx, "symbolic_trace", lambda m, *a, **k: traced.append(type(m).__name__)
                        or real_trace(m, *a, **k))
    net = make_tiny_net()
    mp = compensate(net, SHAPE, **_cfg())
    x = example_inputs(24)
    data = Dataset("synthetic", x, torch.zeros(24, dtype=torch.int64))
    prog = _Recorder()
    rep = targets_mod.run_targets(mp, net, SHAPE, ["onnx", "ort"], tmp_path, dataset=data, progress=prog,
                                  batch_sizes=(1, 2), threads=1, min_iters=2, min_seconds=0.0)
    assert traced == ["TinyNet"], f"traced {len(traced)} times: {traced}"
    assert any(m.startswith("exporting ONNX") for m in prog.said)
    assert any(label.startswith("ONNX Runtime latency") for label in prog.updates)
    assert {"ONNX Runtime parity (24 inputs)", "top-1 torch fp32", "top-1 torch fake-quant",
            *(f"top-1 onnx {v}" for v in VARIANTS)} <= set(prog.updates)
    for label, ups in prog.updates.items():
        assert ups and ups[-1][0] == ups[-1][1], f"{label}: last update {ups[-1:]} is not done == total"
        assert all(a[0] <= b[0] for a, b in zip(ups, ups[1:])), f"{label}: progress went back {ups}"
    assert set(rep) >= {"size_bytes", "latency_ms", "accuracy", "parity", "engine", "notes", "speedup"}
    assert {f"onnx_{v}" for v in VARIANTS} <= set(rep["size_bytes"])
    assert set(rep["latency_ms"]["ort"]) == set(targets_mod.ORT_VARIANTS)
    assert set(rep["latency_ms"]["ort"]["w8a8_ort"]) == {"1", "2"}
    assert rep["threads"]["ort"] == 1
    assert rep["parity"]["onnx_wdq"]["ok"] is True and rep["parity"]["onnx_w8a8"]["ok"] is None
    assert rep["accuracy"]["onnx_wdq"]["top1"] == rep["accuracy"]["torch_fakequant"]["top1"]
    assert rep["engine"] == "not requested"


# --- real engine builds (CPU-only AOT with TensorRT-RTX) -------------------------------------------------------------

@pytest.mark.trt
@pytest.mark.parametrize("variant", targets_mod.TRT_VARIANTS)
def test_build_tiny_engines(tiny, variant):
    _need_builder()
    _, res, out = tiny
    art = trt.build_engine(res[variant].path, out / f"engine_{variant}.plan", variant, max_batch=8)
    assert art.path.is_file() and art.path.stat().st_size == art.size_bytes
    assert art.precision == variant and art.build_seconds > 0 and "tensorrt" in art.backend
    # a tiny net's plan is dominated by fixed overhead (hundreds of KB), never by its few KB of weights
    assert 10_000 < art.size_bytes < 20_000_000


@pytest.mark.trt
def test_trt_rejects_the_ort_form(tiny, tmp_path):
    _need_builder()
    _, res, _ = tiny
    with pytest.raises(DfmpcError, match="cannot parse"):
        trt.build_engine(res["w8a8_ort"].path, tmp_path / "x.plan")
    assert not (tmp_path / "x.plan").exists()


@pytest.mark.trt
@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only fallback of TensorRT-RTX 1.7.1")
def test_stripped_build_falls_back_to_a_full_plan_on_cpu(tiny, tmp_path, capfd, caplog):
    """The fallback is in the notes; TensorRT's own messages (also those its native code prints on descriptor 2)
    reach the dfmpc_deploy logger at INFO, never the terminal."""
    _need_builder()
    _, res, _ = tiny
    capfd.readouterr()
    with caplog.at_level(logging.INFO, logger="dfmpc_deploy"):
        art = trt.build_engine(res["wdq"].path, tmp_path / "s.plan", strip_weights=True, max_batch=4)
    terminal = capfd.readouterr()
    assert "Myelin" not in terminal.err + terminal.out and "Error" not in terminal.err, terminal.err
    assert art.path.is_file()
    if not art.stripped:  # TensorRT-RTX 1.7.1 needs CUDA for STRIP_PLAN/REFIT builds
        assert any("weight-stripped build" in n and "full (non-stripped) plan" in n for n in art.notes), art.notes
        logged = [r for r in caplog.records if r.getMessage().startswith("tensorrt")]
        assert any("MyelinCheckException" in r.getMessage() for r in logged), [r.getMessage() for r in logged]
        assert all(r.levelno == logging.INFO for r in logged)
        assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


@pytest.mark.trt
@pytest.mark.slow
def test_resnet18_2_6_engines_have_sane_sizes(tmp_path):
    _need_builder()
    from dfmpc_deploy.zoo.models import load_model

    lm = load_model("resnet18", "random")
    mp = compensate(lm.module, (3, 224, 224), arch="resnet18", **_cfg())
    e = export_variants(mp, tmp_path, (3, 224, 224), ("wdq",), opset=21, int4=True)["wdq"]  # ternary as INT4
    art = trt.build_engine(e.path, tmp_path / "engine_wdq.plan", "wdq", max_batch=32)
    w = _onnx_weight_bytes(e.path)
    # measured: plan = 1.25 x the ONNX weight bytes (INT8/INT4 kept in the plan, plus per-layer overhead);
    # an FP32 ResNet-18 plan would be ~46 MB
    assert 0.8 * w < art.size_bytes < 2.0 * w + 2_000_000, (art.size_bytes, w)
    assert art.size_bytes < 20_000_000
    assert art.build_seconds < 120


@pytest.mark.trt
def test_run_targets_builds_engines(tiny, tmp_path):
    _need_builder()
    mp, _, _ = tiny
    rep = targets_mod.run_targets(mp, None, SHAPE, ["trt"], tmp_path, batch_sizes=(1, 4), strip_weights=False)
    assert set(rep["engine"]["builds"]) == set(targets_mod.TRT_VARIANTS)
    assert rep["engine"]["backend"].startswith("tensorrt")
    for v in targets_mod.TRT_VARIANTS:
        assert (tmp_path / f"engine_{v}.plan").stat().st_size == rep["size_bytes"]["engine"][v]
    if not torch.cuda.is_available():
        assert any("not run: no CUDA device" in n for n in rep["notes"])


# --- GPU only -----------------------------------------------------------------------------------------------------

@pytest.mark.gpu
@no_cuda
def test_torch_cuda_latency():
    lat = targets_mod.torch_cuda_latency(make_tiny_net(), SHAPE, (1, 4), cuda_graph=True, min_seconds=0.1)
    assert set(lat) == {"1", "4"} and all(v["p50"] > 0 for v in lat.values())


@pytest.mark.gpu
@pytest.mark.trt
@no_cuda
def test_engine_runs_and_matches_torch(tiny):
    _need_builder()
    mp, res, out = tiny
    art = trt.build_engine(res["wdq"].path, out / "gpu_wdq.plan", "wdq", max_batch=8)
    x = example_inputs(8)
    try:
        with trt.TrtRunner(art.path) as r:
            y = r.infer(x.cuda()).float().cpu()
            lat = r.latency_ms((1, 8), SHAPE, min_seconds=0.2)
    except DfmpcError as err:  # TensorRT-RTX plans are refused on unsupported GPUs (e.g. Hopper)
        pytest.skip(f"engine cannot run on this GPU: {err}")
    with torch.no_grad():
        ref = mp.module(x)
    assert (y - ref).abs().max() <= 1e-2 * ref.abs().max() + 1e-3
    assert set(lat) == {"1", "8"}
