
import pytest
import torch

from dfmpc_deploy.deploy.onnx_export import export_variants
from dfmpc_deploy.errors import DfmpcError
from dfmpc_deploy.passes.recipes import compensate
from dfmpc_deploy.zoo.data import Dataset
from dfmpc_deploy.zoo.evaluate import accuracy as torch_accuracy
from tests.conftest import CIFAR_TEST, R20_WEIGHTS, example_inputs, make_tiny_net, needs_shared

pytest.importorskip("onnxruntime")
pytest.importorskip("onnx")
from dfmpc_deploy.deploy import ort  # noqa: E402

SHAPE = (3, 16, 16)


def _cfg(bits=(2, 6), **kw) -> dict:
    return {"bits": f"{bits[0]}/{bits[1]}", "rounding": "nearest", **kw}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    mp = compensate(make_tiny_net(), SHAPE, **_cfg(recal="none"))
    return mp, export_variants(mp, tmp_path_factory.mktemp("ort"), SHAPE, ("fp32", "w8a8_ort"))


def test_compare_latency_structure(tiny):
    _, res = tiny
    lat = ort.compare_latency({v: e.path for v, e in res.items()}, SHAPE, (1, 4), threads=1, warmup_s=0.0,
                              min_iters=3, min_seconds=0.0)
    assert lat["threads"] == 1
    for v in res:
        assert set(lat[v]) == {"1", "4"}
        for st in lat[v].values():
            assert st["iters"] >= 3
            assert 0 < st["p50"] <= st["p90"] <= st["p99"]
    single = ort.latency_ms(res["fp32"].path, SHAPE, (2,), threads=1, warmup_s=0.0, min_iters=2, min_seconds=0.0)
    assert set(single) == {"2"}


def test_accuracy_and_parity_agree_with_torch(tiny):
    mp, res = tiny
    x = example_inputs(40)
    with torch.no_grad():
        labels = mp.module(x).argmax(1)
    labels[::4] = (labels[::4] + 1) % 10  # 75 % correct by construction
    data = Dataset("synthetic", x, labels)
    got = ort.accuracy(res["fp32"].path, data, batch_size=16)
    assert got == torch_accuracy(mp.module, data)
    assert got["top1"] == 75.0
    p = ort.parity(res["fp32"].path, mp.module, x)
    assert p["top1_agreement"] == 1.0 and p["n"] == 40


def test_bad_file_is_a_user_error(tmp_path):
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not a model")
    with pytest.raises(DfmpcError, match="cannot load"):
        ort.ort_session(bad)
    with pytest.raises(DfmpcError, match="optimisation level"):
        ort.ort_session(bad, opt_level="max")


@needs_shared
def test_top1_of_every_variant_on_real_cifar(tmp_path):
    """ResNet-20 (real weights) at 4/8 on 200 real CIFAR-10 test images: the integer-weight exports compute the
    fake-quant model exactly; the data-free INT8 activation quantization costs at most 2 points."""
    from dfmpc_deploy.zoo.data import load_dataset, parse_data_spec
    from dfmpc_deploy.zoo.models import load_model

    lm = load_model("resnet20_cifar10_optA", str(R20_WEIGHTS))
    s = lm.spec
    data = load_dataset(parse_data_spec(f"imagefolder:{CIFAR_TEST}"), s.input_size, s.resize, s.mean, s.std, limit=200)
    mp = compensate(lm.module, (3, 32, 32), arch=lm.spec.name, real_inputs=data.images, **_cfg((4, 8), recal="real"))
    ref = torch_accuracy(mp.module, data)["top1"]
    assert ref >= 70, f"fake-quant reference top-1 {ref} unexpectedly low"
    res = export_variants(mp, tmp_path, (3, 32, 32))
    top1 = {v: ort.accuracy(e.path, data)["top1"] for v, e in res.items()}
    assert abs(top1["fp32"] - ref) <= 0.5 and abs(top1["wdq"] - ref) <= 0.5, (ref, top1)
    assert abs(top1["fp16"] - ref) <= 1.0, (ref, top1)
    assert abs(top1["w8a8"] - ref) <= 2.0 and abs(top1["w8a8_ort"] - ref) <= 2.0, (ref, top1)
