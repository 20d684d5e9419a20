"""torchvision-layout architectures: published parameter counts, fx-traceable pairing, and checkpoint loading."""
import os
from pathlib import Path

import pytest
import torch
from torch import nn

from dfmpc_deploy.core.graph import GraphAnalysis
from dfmpc_deploy.errors import DfmpcError, UsageError
from dfmpc_deploy.zoo.data import load_dataset, parse_data_spec
from dfmpc_deploy.zoo.evaluate import accuracy
from dfmpc_deploy.zoo.models import detect_layout, get_spec, int8_dequantized, load_model, resolve_spec
from dfmpc_deploy.zoo.torchvision_arch import tv_mobilenet_v2, tv_resnet
from tests.conftest import SHARED_DATA

SHARED = Path(os.environ.get("DFMPC_SHARED_DATA", SHARED_DATA))
MBV2 = SHARED / "weights" / "mobilenet_v2_imagenet" / "mobilenet_v2_tvq_dequant_float.pth"
IMAGENET = SHARED / "imagenet_val_1300"
needs_mbv2 = pytest.mark.skipif(not (MBV2.is_file() and IMAGENET.is_dir()),
                                reason="shared MobileNetV2 weights / ImageNet images not present")

# torchvision's published parameter counts (its weights' meta "num_params")
TV_PARAMS = {18: 11_689_512, 34: 21_797_672, 50: 25_557_032, 101: 44_549_160, 152: 60_192_808}


@pytest.mark.parametrize("depth", sorted(TV_PARAMS))
def test_resnet_matches_torchvision_parameter_count(depth):
    m = tv_resnet(depth)
    assert sum(p.numel() for p in m.parameters()) == TV_PARAMS[depth]
    assert {"conv1.weight", "layer1.0.conv1.weight", "fc.weight", "fc.bias", "layer2.0.downsample.0.weight",
            "layer2.0.downsample.1.running_var"} <= set(m.state_dict())


def test_mobilenet_v2_matches_torchvision_parameter_count_and_keys():
    m = tv_mobilenet_v2()
    assert sum(p.numel() for p in m.parameters()) == 3_504_872
    keys = set(m.state_dict())
    assert {"features.0.0.weight", "features.1.conv.0.0.weight", "features.1.conv.1.weight",
            "features.2.conv.0.0.weight", "features.17.conv.3.running_var", "features.18.0.weight",
            "classifier.1.weight", "classifier.1.bias"} <= keys


@pytest.mark.parametrize("relu6", [True, False])
def test_mobilenet_v2_traces_and_pairs_depthwise_with_projection(relu6):
    m = tv_mobilenet_v2(relu6).eval()
    gm = torch.fx.symbolic_trace(m)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(gm(x), m(x))
    acts = {type(mod) for mod in m.modules() if isinstance(mod, (nn.ReLU, nn.ReLU6))}
    assert acts == {nn.ReLU6 if relu6 else nn.ReLU}
    pairs = {(p.low, p.high) for p in GraphAnalysis.of(m).pairs}
    for i in range(2, 17):  # paper Fig. 2: depthwise low, projection high (block 17 chains on into features.18)
        assert (f"features.{i}.conv.1.0", f"features.{i}.conv.2") in pairs


def test_resnet50_pairs_follow_the_bottleneck_rule():
    pairs = {(p.low, p.high) for p in GraphAnalysis.of(tv_resnet(50)).pairs}
    assert ("layer1.0.conv2", "layer1.0.conv3") in pairs and len(pairs) == 16


def test_layout_detection():
    assert detect_layout(tv_resnet(18).state_dict()) == "torchvision"
    assert detect_layout(tv_mobilenet_v2().state_dict()) == "torchvision"
    assert detect_layout(["features.init_block.conv.conv.weight", "output.weight"]) == "pytorchcv"
    assert detect_layout(["conv1.weight", "layer1.0.conv1.weight", "linear.weight"]) == "native"
    assert detect_layout(["encoder.weight"]) is None


def test_torchvision_resnet_file_loads_onto_the_torchvision_architecture(tmp_path):
    torch.manual_seed(0)
    src = tv_resnet(18).eval()
    f = tmp_path / "r18.pth"
    torch.save({"state_dict": {"module." + k: v for k, v in src.state_dict().items()}}, f)
    lm = load_model("resnet18", str(f))
    assert lm.arch == "resnet18_torchvision" and lm.extra["weights_format"] == "torchvision"
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(lm.module(x), src(x))
    assert get_spec(lm.arch).build(False).state_dict().keys() == src.state_dict().keys()  # rebuildable by name


def test_pytorchcv_file_still_loads_onto_pytorchcv(tmp_path):
    pytest.importorskip("pytorchcv")
    sd = load_model("resnet18", "random").module.state_dict()
    f = tmp_path / "cv.pth"
    torch.save(sd, f)
    assert load_model("resnet18", str(f)).arch == "resnet18"
    with pytest.raises(DfmpcError, match=r"do not fit.*look like the pytorchcv layout"):
        load_model("resnet18", str(f), weights_format="torchvision")


def test_missing_classifier_bias_is_refused(tmp_path):
    sd = tv_mobilenet_v2().state_dict()
    del sd["classifier.1.bias"]
    f = tmp_path / "nobias.pth"
    torch.save(sd, f)
    with pytest.raises(DfmpcError, match=r"1 missing \(e\.g\. classifier\.1\.bias\)"):
        load_model("mobilenet_v2", str(f))


def test_unknown_layout_names_both_layouts(tmp_path):
    f = tmp_path / "odd.pth"
    torch.save({"encoder.weight": torch.zeros(2, 2)}, f)
    with pytest.raises(DfmpcError, match="neither the pytorchcv layout .* nor the torchvision layout") as e:
        load_model("resnet18", str(f))
    assert "\n" not in str(e.value)


def test_format_resolution():
    assert resolve_spec("mobilenet_v2", "torchvision-quantized").name == "mobilenet_v2_relu"
    assert resolve_spec("mobilenet_v2_relu", "auto", keys=tv_mobilenet_v2().state_dict()).name == "mobilenet_v2_relu"
    assert resolve_spec("resnet50", "torchvision-quantized").name == "resnet50_torchvision"  # ReLU either way
    assert resolve_spec("resnet50_torchvision", "pytorchcv").name == "resnet50"
    with pytest.raises(DfmpcError, match="available in the torchvision, torchvision-quantized layout only"):
        resolve_spec("mobilenet_v2", "pytorchcv")
    with pytest.raises(DfmpcError, match="native layout only"):
        resolve_spec("resnet20_cifar10_optA", "auto", keys=tv_resnet(18).state_dict(), origin="f")
    with pytest.raises(UsageError, match="--weights-format"):
        resolve_spec("resnet18", "onnx")


def test_no_float_pretrained_for_the_quantizable_variant():
    with pytest.raises(DfmpcError, match="no float pretrained weights for 'mobilenet_v2_relu'"):
        load_model("mobilenet_v2", "pretrained", weights_format="torchvision-quantized")


@needs_mbv2
@pytest.mark.slow
def test_real_mobilenet_v2_loads_and_classifies_imagenet():
    lm6 = load_model("mobilenet_v2", str(MBV2), weights_format="torchvision")
    lm = load_model("mobilenet_v2", str(MBV2))  # auto: dequantized INT8 with folded BN -> the quantizable model
    assert (lm6.arch, lm.arch) == ("mobilenet_v2", "mobilenet_v2_relu")
    assert any("identity statistics" in n for n in lm.extra["notes"])  # BN folded before publication
    assert any("dequantized INT8" in n and "--weights-format torchvision" in n for n in lm.extra["notes"])
    s = lm.spec
    data = load_dataset(parse_data_spec(f"imagenet:{IMAGENET}"), s.input_size, s.resize, s.mean, s.std, limit=50,
                        num_classes=s.num_classes)
    acc = accuracy(lm.module, data)
    assert acc["n"] == 50 and acc["top1"] >= 66.0, f"top-1 {acc['top1']} on 50 ImageNet images is too low"


def _identity_bn(model: nn.Module) -> nn.Module:
    """``model`` as a BN-folding export leaves it: every BatchNorm with mean 0, variance 1, weight 1, bias 0."""
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.reset_parameters()
    return model


def _fake_int8_(model: nn.Module, per_channel: bool) -> nn.Module:
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                w = m.weight.flatten(1)
                step = (w.abs().amax(1, keepdim=True) if per_channel else w.abs().amax()) / 127
                m.weight.copy_(((w / step).round() * step).reshape(m.weight.shape))
    return model


@pytest.mark.parametrize("per_channel", [False, True])
def test_int8_dequantized_tells_integer_grids_from_float_weights(per_channel):
    torch.manual_seed(0)
    model = tv_mobilenet_v2()
    assert not int8_dequantized(model)  # float init: continuous values
    assert int8_dequantized(_fake_int8_(model, per_channel))
    with torch.no_grad():  # one filter in 4 off the grid: not a dequantized model any more
        for m in model.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                m.weight[::4].mul_(1.0 + 1e-2 * torch.rand_like(m.weight[::4]))
    assert not int8_dequantized(model)


@pytest.mark.parametrize("int8", [False, True])
def test_bn_folded_torchvision_mobilenet_v2_loads_with_the_activation_its_weights_need(tmp_path, int8):
    """Dequantized INT8 + folded BN is what torchvision's quantizable MobileNetV2 (ReLU) exports: auto picks it and
    says how to override; float weights with folded BN keep ReLU6 with a hint."""
    torch.manual_seed(1)
    model = _identity_bn(tv_mobilenet_v2())
    if int8:
        _fake_int8_(model, per_channel=True)
    f = tmp_path / "mbv2.pth"
    torch.save(model.state_dict(), f)
    lm = load_model("mobilenet_v2", str(f))
    assert lm.arch == ("mobilenet_v2_relu" if int8 else "mobilenet_v2")
    notes = " ".join(lm.extra["notes"])
    assert "identity statistics" in notes
    assert ("loaded as mobilenet_v2_relu" in notes) == int8
    assert ("pass --weights-format torchvision-quantized" in notes) == (not int8)
    assert load_model("mobilenet_v2", str(f), weights_format="torchvision").arch == "mobilenet_v2"
