
import numpy as np
import pytest
import torch
from torch import nn

from dfmpc_deploy.deploy.onnx_export import VARIANTS, export_onnx, export_variants
from dfmpc_deploy.errors import DfmpcError
from dfmpc_deploy.passes.recipes import compensate
from tests.conftest import example_inputs, make_tiny_net, trained_bn_statistics_

onnx = pytest.importorskip("onnx")
SHAPE = (3, 16, 16)


def quick_cfg(bits=(2, 6), **kw) -> dict:
    """Settings for a fast compensation: no statistics re-estimation, nearest rounding."""
    return {"bits": f"{bits[0]}/{bits[1]}", "recal": "none", "rounding": "nearest", **kw}


def _relu6_net(negative_gamma: bool = False) -> nn.Module:
    """Conv-BN-ReLU6-Conv-BN-ReLU6-GAP-Linear: ReLU6 is not homogeneous, so c lands in the high layer's in_scale."""
    torch.manual_seed(3)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU6(),
                        nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU6(),
                        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 5))
    return trained_bn_statistics_(net, gamma=(-1.5 if negative_gamma else 0.5, 1.5), beta=(0.0, 1.0))


@pytest.fixture(scope="module")
def tiny_exports(tmp_path_factory):
    mp = compensate(make_tiny_net(), SHAPE, **quick_cfg(c_mode="paper"))
    out = tmp_path_factory.mktemp("onnx")
    return mp, export_variants(mp, out, SHAPE, VARIANTS, opset=21, int4=True), out


def _inits(model):
    return {i.name: i for i in model.graph.initializer}


def test_every_variant_passes_the_checker_and_leaves_no_temp_files(tiny_exports):
    mp, res, out = tiny_exports
    assert list(res) == list(VARIANTS)
    for v, e in res.items():
        m = onnx.load(e.path)
        onnx.checker.check_model(m, full_check=True)
        assert {p.key: p.value for p in m.metadata_props}["dfmpc.variant"] == v
        assert e.size_bytes == e.path.stat().st_size
    assert sorted(p.name for p in out.iterdir()) == sorted(f"model_{v}.onnx" for v in VARIANTS)


def test_wdq_stores_integer_codes_with_symmetric_per_channel_dq(tiny_exports):
    mp, res, _ = tiny_exports
    m = onnx.load(res["wdq"].path)
    inits = _inits(m)
    dq = {n.output[0]: n for n in m.graph.node if n.op_type == "DequantizeLinear"}
    for fqn, q in mp.layers.items():
        node = dq[f"{fqn}.weight"]
        assert next(a.i for a in node.attribute if a.name == "axis") == 0
        codes = onnx.numpy_helper.to_array(inits[node.input[0]])
        expect_type = onnx.TensorProto.INT4 if q.bits == 2 else onnx.TensorProto.INT8
        assert inits[node.input[0]].data_type == expect_type, fqn
        assert np.array_equal(np.abs(codes), q.codes.abs().numpy()), f"{fqn}: codes changed"
        assert (onnx.numpy_helper.to_array(inits[node.input[1]]) > 0).all(), "TensorRT needs scales > 0"
        assert not onnx.numpy_helper.to_array(inits[node.input[2]]).any(), "zero-point must be 0"
        assert f"{fqn}.weight" not in inits  # no float copy left
    assert res["wdq"].size_bytes < res["fp32"].size_bytes / 2


def test_w8a8_puts_symmetric_int8_qdq_on_every_layer_input(tiny_exports):
    mp, res, _ = tiny_exports
    m = onnx.load(res["w8a8"].path)
    inits = _inits(m)
    q_nodes = [n for n in m.graph.node if n.op_type == "QuantizeLinear"]
    assert len(q_nodes) == len(mp.layers)  # stem, conv1, conv2, fc: four distinct input tensors
    for n in q_nodes:
        assert inits[n.input[2]].data_type == onnx.TensorProto.INT8
        assert onnx.numpy_helper.to_array(inits[n.input[2]]) == 0
    # w8a8 keeps INT8 weights even with int4=True (TensorRT wants equal integer types in a conv)
    assert all(i.data_type != onnx.TensorProto.INT4 for i in m.graph.initializer)
    assert any("int4 applies to wdq only" in n for n in res["w8a8"].notes)


def test_onnx_runtime_matches_pytorch(tiny_exports):
    ort = pytest.importorskip("onnxruntime")
    from dfmpc_deploy.deploy.ort import parity

    mp, res, _ = tiny_exports
    x = example_inputs(32)
    p = {v: parity(e.path, mp.module, x) for v, e in res.items()}
    for v in ("fp32", "wdq"):
        assert p[v]["max_abs_diff"] <= 1e-4 * p[v]["max_abs_ref"] + 1e-5, (v, p[v])
    assert p["fp16"]["max_abs_diff"] <= 2e-2 * p["fp16"]["max_abs_ref"], p["fp16"]
    with torch.no_grad():
        ref = mp.module(x).numpy()
    for v in ("w8a8", "w8a8_ort"):
        sess = ort.InferenceSession(str(res[v].path), providers=["CPUExecutionProvider"])
        y = sess.run(None, {"input": x.numpy()})[0]
        sqnr = 10 * np.log10((ref ** 2).sum() / ((y - ref) ** 2).sum())
        assert sqnr >= 20, f"{v}: SQNR {sqnr:.1f} dB too low"


def test_in_scale_mul_negative_bn_gamma_and_requantised_8bit(tmp_path):
    pytest.importorskip("onnxruntime")
    from dfmpc_deploy.deploy.ort import parity

    mp = compensate(_relu6_net(negative_gamma=True), SHAPE, **quick_cfg((2, 8), c_mode="paper", grid="dorefa"))
    assert any(q.in_scale is not None for q in mp.layers.values())
    res = export_variants(mp, tmp_path, SHAPE, ("fp32", "wdq", "w8a8"))
    m = onnx.load(res["wdq"].path)
    assert any(n.op_type == "Mul" and n.input[1].endswith(".in_scale") for n in m.graph.node)
    assert any("do not fit INT8; 8 of 8 channels requantised" in n for n in res["wdq"].notes)
    assert not any("requantised" in n for n in res["fp32"].notes)
    x = example_inputs(16)
    p32, pq = parity(res["fp32"].path, mp.module, x), parity(res["wdq"].path, mp.module, x)
    assert p32["max_abs_diff"] <= 1e-4 * p32["max_abs_ref"] + 1e-6, p32  # fp32 keeps the exact 8-bit weights
    assert pq["max_abs_diff"] <= 2e-2 * pq["max_abs_ref"], pq  # INT8 requantisation of 8-bit codes: small change
    for i in onnx.load(res["w8a8"].path).graph.initializer:
        if i.name.endswith(".weight_scale"):
            assert (onnx.numpy_helper.to_array(i) > 0).all()


def test_export_onnx_single_file_and_errors(tmp_path):
    mp = compensate(make_tiny_net(), SHAPE, **quick_cfg())
    p = export_onnx(mp, tmp_path / "x.onnx", SHAPE, "w8a8")
    assert p == tmp_path / "x.onnx" and p.is_file()
    with pytest.raises(DfmpcError, match="unknown ONNX variant"):
        export_onnx(mp, tmp_path / "y.onnx", SHAPE, "int3")
    with pytest.raises(DfmpcError, match="opset >= 21"):
        export_onnx(mp, tmp_path / "z.onnx", SHAPE, "wdq", opset=17, int4=True)
    assert sorted(f.name for f in tmp_path.iterdir()) == ["x.onnx"]


def test_symbolic_batch_dimension(tiny_exports):
    ort = pytest.importorskip("onnxruntime")
    _, res, _ = tiny_exports
    sess = ort.InferenceSession(str(res["wdq"].path), providers=["CPUExecutionProvider"])
    assert sess.get_inputs()[0].shape[0] == "batch"
    for n in (1, 5):
        assert sess.run(None, {"input": example_inputs(n).numpy()})[0].shape == (n, 10)


def _lattice_net(negative_gamma: bool) -> nn.Module:
    """_relu6_net with every conv/linear weight on an int8 lattice that uses -128 in every output channel."""
    net = _relu6_net(negative_gamma)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                g = torch.Generator().manual_seed(m.weight.numel())
                q = torch.randint(-127, 128, m.weight.shape, generator=g)
                q.view(q.shape[0], -1)[:, 0] = -128
                m.weight.copy_(q.float() * torch.tensor(0.004, dtype=torch.float32))
    return net


@pytest.mark.parametrize("bits", [(4, 8), (8, 8)])
def test_int_grid_exports_its_codes_as_they_are_and_matches_torch(tmp_path, bits):
    """int-grid codes go to INT8 unchanged (-128 included) and, where they fit [-8, 7], to INT4."""
    pytest.importorskip("onnxruntime")
    from dfmpc_deploy.deploy.ort import parity

    mp = compensate(_lattice_net(False), SHAPE, **quick_cfg(bits, grid="int"))
    res = export_variants(mp, tmp_path, SHAPE, ("fp32", "wdq"), opset=21, int4=True)
    assert not any("requantised" in n for n in res["wdq"].notes), res["wdq"].notes
    m = onnx.load(res["wdq"].path)
    inits = _inits(m)
    dq = {n.output[0]: n for n in m.graph.node if n.op_type == "DequantizeLinear"}
    saw_min = False
    for fqn, q in mp.layers.items():
        t = inits[dq[f"{fqn}.weight"].input[0]]
        codes = onnx.numpy_helper.to_array(t).astype(np.int16)
        assert np.array_equal(codes, q.codes.numpy()), f"{fqn}: codes changed"  # BN gamma > 0: no sign flip
        fits4 = int(q.codes.min()) >= -8 and int(q.codes.max()) <= 7
        assert t.data_type == (onnx.TensorProto.INT4 if fits4 else onnx.TensorProto.INT8), fqn
        saw_min = saw_min or int(q.codes.min()) == -(2 ** (q.bits - 1))
    assert saw_min, "the test should exercise the lattice's most negative code"
    x = example_inputs(16)
    for v in ("fp32", "wdq"):
        p = parity(res[v].path, mp.module, x)
        assert p["max_abs_diff"] <= 1e-4 * p["max_abs_ref"] + 1e-5, (v, p)


def test_int_minus_128_under_a_negative_folded_scale_requantises_only_those_channels(tmp_path):
    pytest.importorskip("onnxruntime")
    from dfmpc_deploy.deploy.ort import parity

    net = _lattice_net(True)
    mp = compensate(net, SHAPE, **quick_cfg((8, 8), grid="int"))
    assert int(mp.layers["0"].codes.min()) == -128
    negative = int((net[1].weight < 0).sum())
    assert 0 < negative < 8
    res = export_variants(mp, tmp_path, SHAPE, ("fp32", "wdq"))
    assert any("'0': int codes of -128" in n and f"{negative} of 8 channels requantised" in n
               for n in res["wdq"].notes), res["wdq"].notes
    x = example_inputs(16)
    pq = parity(res["wdq"].path, mp.module, x)
    assert pq["max_abs_diff"] <= 2e-2 * pq["max_abs_ref"], pq
