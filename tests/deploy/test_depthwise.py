"""Depthwise convolutions and inverted residuals (MobileNetV2's blocks) through every stage: pairing, equalisation,
compensation, the packed file, the ONNX variants, ONNX Runtime and TensorRT(-RTX) engines - on a tiny
inverted-residual net (3x16x16 input) built from the zoo's own block, with and without BN statistics."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from dfmpc_deploy.core.graph import GraphAnalysis, Role
from dfmpc_deploy.io.container import load_packed, save_packed
from dfmpc_deploy.passes.equalize import cross_layer_equalize
from dfmpc_deploy.passes.recipes import compensate
from dfmpc_deploy.zoo.torchvision_arch import InvertedResidual
from tests.io.helpers import assert_same_model

SHAPE = (3, 16, 16)
DW = ("features.1.conv.0.0", "features.2.conv.1.0", "features.3.conv.1.0")  # the depthwise convs
PROJ = ("features.1.conv.1", "features.2.conv.2", "features.3.conv.2")  # the projections after them


class TinyIR(nn.Module):
    """Stem, three inverted residuals (t = 1, 8 -> 6 channels; t = 4, stride 2; t = 4 with a residual), a last 1x1
    conv and a classifier: MobileNetV2 in miniature, torchvision names. The first two blocks have no residual, so
    the first projection feeds the second expansion directly (a linear link, as between MobileNetV2's stages)."""

    def __init__(self, act: type[nn.Module] = nn.ReLU):
        super().__init__()
        self.features = nn.Sequential(
            nn.Sequential(nn.Conv2d(3, 8, 3, 1, 1, bias=False), nn.BatchNorm2d(8), act()),
            InvertedResidual(8, 6, 1, 1, act), InvertedResidual(6, 12, 2, 4, act), InvertedResidual(12, 12, 1, 4, act),
            nn.Sequential(nn.Conv2d(12, 32, 1, bias=False), nn.BatchNorm2d(32), act()))
        self.classifier = nn.Linear(32, 10)

    def forward(self, x):
        return self.classifier(self.features(x).mean(dim=(2, 3)))


def tiny_ir(act: type[nn.Module] = nn.ReLU, folded: bool = False, seed: int = 0) -> nn.Module:
    """Seeded :class:`TinyIR` whose depthwise filters spread over two decades (as MobileNetV2's do), with the BN
    population statistics of Gaussian inputs; ``folded``: BN folded into the convs before "publication", the BN
    layers left with identity statistics and the folded bias (as the real MobileNetV2 weights arrive)."""
    torch.manual_seed(seed)
    net = TinyIR(act)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.Conv2d):
                spread = 1.5 if m.groups > 1 else 0.5
                m.weight.mul_(torch.exp(spread * torch.randn(m.out_channels, 1, 1, 1)))
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0, 0.3)
                m.momentum = None
        net.train()
        net(torch.randn(256, *SHAPE, generator=torch.Generator().manual_seed(1)))
        net.eval()
        if folded:
            mods = dict(net.named_modules())
            for conv, bn in GraphAnalysis.of(net).bn_after.items():
                c, b = mods[conv], mods[bn]
                a = b.weight / torch.sqrt(b.running_var + b.eps)
                c.weight.mul_(a.reshape(-1, 1, 1, 1))
                b.bias.copy_(b.bias - a * b.running_mean)
                b.weight.fill_(1.0)
                b.running_mean.zero_()
                b.running_var.fill_(1.0 - b.eps)
    return net


def inputs(n: int = 32, seed: int = 7) -> torch.Tensor:
    return torch.randn(n, *SHAPE, generator=torch.Generator().manual_seed(seed))


def rel_err(model: nn.Module, ref: nn.Module, x: torch.Tensor) -> float:
    with torch.no_grad():
        y, r = model(x), ref(x)
    return float((y - r).pow(2).sum() / r.pow(2).sum())


pytestmark = pytest.mark.usefixtures("one_torch_thread")


# --- graph, equalisation, compensation --------------------------------------------------------------------------

@pytest.mark.parametrize("act", [nn.ReLU, nn.ReLU6])
def test_pairs_are_depthwise_low_projection_high(act):
    g = GraphAnalysis.of(tiny_ir(act))
    assert [(p.low, p.high) for p in g.pairs] == list(zip(DW, PROJ))
    roles = {r.fqn: r.role for r in g.roles}
    # the stem, the expansions (they read the block's stream), the last 1x1 and the classifier stay high, unpaired
    for name in ("features.0.0", "features.2.conv.0.0", "features.3.conv.0.0", "features.4.0", "classifier"):
        assert roles[name] == Role.HIGH, name
    # the projection of the block without a residual feeds the next expansion with no activation between: a link
    # (CLE may use it) but a block boundary for the pairing
    assert any((lk.low, lk.high, lk.act) == ("features.1.conv.1", "features.2.conv.0.0", "identity") for lk in g.links)
    assert all(p.homogeneous == (act is nn.ReLU) for p in g.pairs)


def test_cle_equalises_depthwise_links_exactly():
    net = tiny_ir(nn.ReLU)
    eq, pre = cross_layer_equalize(net, GraphAnalysis.of(net))
    x = inputs()
    with torch.no_grad():
        assert torch.allclose(eq(x), net(x), rtol=1e-4, atol=1e-4), "CLE changed the function"
    before, after = dict(net.named_modules()), dict(eq.named_modules())
    for name in DW:
        spread = [float(r.max() / r.min()) for r in (m[name].weight.flatten(1).abs().amax(1) for m in (before, after))]
        assert spread[1] < spread[0] / 3, f"{name}: range spread {spread[0]:.1f} -> {spread[1]:.1f}"
    assert "features.2.conv.0.1" in pre and "features.2.conv.1.1" in pre  # expansion -> dw -> projection both folded


def test_dfq_bias_correction_handles_a_depthwise_consumer():
    mp = compensate(tiny_ir(nn.ReLU), SHAPE, "dfq", bits="4/6")  # a depthwise conv after a folded BN and ReLU
    assert mp.config.record("bias_correct").info["corrected_layers"] == 7
    assert rel_err(mp.module, tiny_ir(nn.ReLU), inputs()) < rel_err(compensate(tiny_ir(nn.ReLU), SHAPE, "rtn",
                                                                                bits="4/6").module, tiny_ir(), inputs())


@pytest.mark.parametrize("act", [nn.ReLU, nn.ReLU6])
def test_c_folds_into_bn_after_relu_and_into_projection_input_after_relu6(act):
    # the paper's method on the paper's grid: DoReFa has no zero level, so c can rescue a narrow depthwise channel
    # that a per-tensor int grid rounds to zero (measured: relative error 3.7 on the int grid)
    mp = compensate(tiny_ir(act), SHAPE, "dfmpc-paper", bits="3/6", grid="dorefa")
    for dw, proj in zip(DW, PROJ):
        assert mp.layers[dw].role == Role.LOW and mp.layers[dw].c_folded
        assert (mp.layers[proj].in_scale is not None) == (act is nn.ReLU6), proj
    assert rel_err(mp.module, tiny_ir(act), inputs()) < 1.0


# --- packed file ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("act,folded,method,bits,per_channel", [
    (nn.ReLU, False, "dfmpc-paper", "2/6", False),
    (nn.ReLU6, False, "dfmpc-paper", "3/6", True),
    (nn.ReLU, True, "dfmpc", "6", False),
    (nn.ReLU6, True, "dfmpc", "4", True),
])
def test_packed_round_trip_is_bit_exact(tmp_path, act, folded, method, bits, per_channel):
    net = tiny_ir(act, folded)
    mp = compensate(net, SHAPE, method, bits=bits, per_channel=per_channel, arch="tiny-ir")
    save_packed(mp, tmp_path / "m.dfmpc")
    back = load_packed(tmp_path / "m.dfmpc", model=tiny_ir(act, folded, seed=5))
    assert_same_model(mp, back, inputs(4))


# --- ONNX, ONNX Runtime, TensorRT -------------------------------------------------------------------------------

@pytest.fixture(scope="module", params=[nn.ReLU, nn.ReLU6], ids=["relu", "relu6"])
def exported(request, tmp_path_factory):
    pytest.importorskip("onnx")
    from dfmpc_deploy.deploy.onnx_export import VARIANTS, export_variants

    mp = compensate(tiny_ir(request.param), SHAPE, "dfmpc-paper", bits="3/6", arch="tiny-ir")
    out = tmp_path_factory.mktemp("dw_onnx")
    return mp, export_variants(mp, out, SHAPE, VARIANTS, opset=21, int4=True), out


def test_onnx_variants_keep_depthwise_groups_and_integer_codes(exported):
    import onnx

    mp, res, _ = exported
    m = onnx.load(res["wdq"].path)
    groups = [next((a.i for a in n.attribute if a.name == "group"), 1) for n in m.graph.node if n.op_type == "Conv"]
    assert sorted(g for g in groups if g > 1) == [8, 24, 48]
    dq = {n.output[0] for n in m.graph.node if n.op_type == "DequantizeLinear"}
    assert all(f"{fqn}.weight" in dq for fqn in mp.layers)


def test_ort_matches_torch_for_fp32_and_wdq_and_w8a8_agrees(exported):
    pytest.importorskip("onnxruntime")
    from dfmpc_deploy.deploy import ort

    mp, res, _ = exported
    x = inputs(64)
    for v in ("fp32", "wdq"):
        p = ort.parity(res[v].path, mp.module, x, threads=1)
        assert p["max_abs_diff"] <= 1e-4 * p["max_abs_ref"] + 1e-4, (v, p)
    with torch.no_grad():
        ref = mp.module(x)
    for v in ("w8a8", "w8a8_ort"):  # a different (activation-quantized) model: judged by its SQNR
        y = torch.from_numpy(ort.run_session(res[v].path, x, threads=1))
        sqnr = 10 * math.log10(float(ref.pow(2).sum() / (y - ref).pow(2).sum()))
        assert sqnr >= 20, f"{v}: SQNR {sqnr:.1f} dB too low"


@pytest.mark.trt
@pytest.mark.parametrize("variant", ["wdq", "w8a8"])
def test_tensorrt_engine_builds(exported, variant):
    from dfmpc_deploy.deploy import trt

    name = trt.backend_name()
    if name is None or (name == "tensorrt" and not torch.cuda.is_available()):
        pytest.skip("needs tensorrt_rtx (builds on the CPU) or tensorrt with a GPU")
    _, res, out = exported
    art = trt.build_engine(res[variant].path, out / f"engine_{variant}.plan", variant, max_batch=4)
    assert art.path.is_file() and art.size_bytes == art.path.stat().st_size > 10_000


def test_w8a8_of_a_model_without_statistics_takes_its_ranges_from_the_weights(tmp_path):
    pytest.importorskip("onnxruntime")
    from dfmpc_deploy.deploy import ort
    from dfmpc_deploy.deploy.onnx_export import export_variants

    mp = compensate(tiny_ir(nn.ReLU, folded=True), SHAPE, "dfmpc", bits="6", arch="tiny-ir")
    res = export_variants(mp, tmp_path, SHAPE, ("w8a8", "w8a8_ort"))
    g = torch.Generator().manual_seed(3)  # smooth standardised inputs, like images
    x = nn.functional.interpolate(torch.randn(64, 3, 4, 4, generator=g), scale_factor=4, mode="nearest")
    x = (x - x.mean()) / x.std()
    with torch.no_grad():
        ref = mp.module(x)
    for v, e in res.items():
        assert any("ranges propagated from the weights" in n for n in e.notes), e.notes
        y = torch.from_numpy(ort.run_session(e.path, x, threads=1))
        sqnr = 10 * math.log10(float(ref.pow(2).sum() / (y - ref).pow(2).sum()))
        assert sqnr >= 20, f"{v}: SQNR {sqnr:.1f} dB too low"
