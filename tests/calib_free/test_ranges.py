import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from calib_free.ranges import (
    estimate_act_ranges,
    estimate_output_ranges,
    gaussian_clip_k,
    gaussian_clip_mse,
    input_range_from_normalization,
)
from tests.conftest import CIFAR_TEST, R20_WEIGHTS, make_tiny_net, needs_shared


def _bn(c, gamma, beta):
    bn = nn.BatchNorm2d(c)
    with torch.no_grad():
        bn.weight.copy_(torch.as_tensor(gamma, dtype=torch.float32))
        bn.bias.copy_(torch.as_tensor(beta, dtype=torch.float32))
    return bn


def test_k_minimises_the_gaussian_clipping_mse():
    k8 = gaussian_clip_k(8)
    assert 3.8 < k8 < 4.05, k8
    for dk in (-0.05, 0.05, -0.5, 0.5):
        assert gaussian_clip_mse(k8 + dk, 8) > gaussian_clip_mse(k8, 8)
    assert gaussian_clip_k(4) < gaussian_clip_k(6) < k8  # fewer levels -> clip harder


def test_bn_relu_rule_and_input_range_from_normalisation():
    gamma, beta = [1.0, -2.0, 0.5], [0.5, 1.0, -3.0]
    net = nn.Sequential(nn.Conv2d(3, 3, 3), _bn(3, gamma, beta), nn.ReLU(), nn.Conv2d(3, 4, 1)).eval()
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    r = estimate_act_ranges(net, k=4.0, input_range=input_range_from_normalization(mean, std))
    first = r["0"]
    assert torch.allclose(first.lo, torch.tensor([-m / s for m, s in zip(mean, std)], dtype=torch.float64))
    assert torch.allclose(first.hi, torch.tensor([(1 - m) / s for m, s in zip(mean, std)], dtype=torch.float64))
    second = r["3"]
    g, b = torch.tensor(gamma, dtype=torch.float64), torch.tensor(beta, dtype=torch.float64)
    assert torch.allclose(second.lo, torch.zeros(3, dtype=torch.float64))  # clipped at 0 after ReLU
    assert torch.allclose(second.hi, (b + 4.0 * g.abs()).clamp(min=0), atol=1e-6)
    assert second.amax == pytest.approx(float((b + 4 * g.abs()).max()))
    assert second.scale(8) == pytest.approx(second.amax / 127)


def test_relu6_clips_at_six():
    net = nn.Sequential(nn.Conv2d(3, 2, 1), _bn(2, [2.0, 0.1], [5.0, 0.2]), nn.ReLU6(), nn.Conv2d(2, 2, 1)).eval()
    r = estimate_act_ranges(net)["3"]
    assert r.hi[0] == pytest.approx(6.0) and r.lo.min() >= 0
    assert r.hi[1] == pytest.approx(0.2 + gaussian_clip_k(8) * 0.1, rel=1e-3)


class _Residual(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(4, 4, 3, padding=1), _bn(4, [1.0] * 4, [0.0] * 4)
        self.conv2, self.bn2 = nn.Conv2d(4, 4, 3, padding=1), _bn(4, [2.0] * 4, [1.0] * 4)
        self.pool = nn.MaxPool2d(2)
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        a = F.relu(self.bn1(self.conv1(x)))
        y = F.relu(self.bn2(self.conv2(a)) + a)
        y = self.pool(y)
        return self.fc(F.adaptive_avg_pool2d(y, 1).flatten(1))


def test_residual_add_adds_half_widths_in_quadrature_within_the_sum_of_ranges():
    k = 4.0
    r = estimate_act_ranges(_Residual().eval(), k=k)
    a = r["conv2"]  # relu(N(0, 1)) clipped to [0, k]
    y = r["fc"]  # relu(N(1, 4) + a) through max pool, GAP and flatten (unchanged)
    assert float(a.hi.max()) == pytest.approx(k)
    mean_a = 1 / (2 * torch.pi) ** 0.5  # E relu(N(0, 1))
    assert float(a.mean.max()) == pytest.approx(mean_a, rel=1e-4)
    expect = 1 + mean_a + ((k - mean_a) ** 2 + (2 * k) ** 2) ** 0.5
    assert float(y.hi.max()) == pytest.approx(expect, rel=1e-4)
    assert float(y.hi.max()) < 1.0 + 2.0 * k + k  # below the sum of the ranges
    assert y.source.startswith("add")


def test_every_layer_of_an_option_a_resnet_gets_a_range():
    from dfmpc_deploy.zoo.cifar_resnet import CifarResNet

    model = CifarResNet(20).eval()
    r = estimate_act_ranges(model, input_range=(-2.0, 2.5))
    layers = [n for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    assert sorted(r) == sorted(layers)
    # the padded shortcut (zero channels) meets the 32-channel residual stream
    assert r["layer2.1.conv1"].lo.numel() == 32 and (r["layer2.1.conv1"].lo >= 0).all()
    outs = estimate_output_ranges(model, input_range=(-2.0, 2.5))
    assert outs["layer1.0.conv1"].source == "bn+act" and outs["layer1.0.conv2"].source == "bn"
    assert outs["linear"].source == "moments"


def test_tiny_net_and_unsupported_ops_are_left_out():
    r = estimate_act_ranges(make_tiny_net(), input_range=(-3.0, 3.0))
    assert set(r) == {"stem", "conv1", "conv2", "fc"}

    class Odd(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Conv2d(3, 3, 1), nn.Conv2d(3, 3, 1)

        def forward(self, x):
            y = self.a(x)
            return self.b(y * y)  # tensor * tensor: no rule

    r = estimate_act_ranges(Odd().eval())
    assert "a" in r and "b" not in r


def test_calib_free_does_not_import_dfmpc_deploy():
    code = ("import sys, calib_free.ranges; "
            "bad = [m for m in sys.modules if m.startswith('dfmpc_deploy')]; assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


@needs_shared
def test_ranges_match_real_activations_of_resnet20():
    """Estimated bounds against activations of 200 real CIFAR-10 images (a check, not a fit: k is fixed at 3.92)."""
    from dfmpc_deploy.zoo.data import load_dataset, parse_data_spec
    from dfmpc_deploy.zoo.models import load_model

    lm = load_model("resnet20_cifar10_optA", str(R20_WEIGHTS))
    s = lm.spec
    data = load_dataset(parse_data_spec(f"imagefolder:{CIFAR_TEST}"), s.input_size, s.resize, s.mean, s.std, limit=200)
    est = estimate_act_ranges(lm.module, input_range=input_range_from_normalization(s.mean, s.std))
    seen = {}
    hooks = [m.register_forward_pre_hook(lambda mod, inp, n=n: seen.__setitem__(n, inp[0].abs().flatten()))
             for n, m in lm.module.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    with torch.no_grad():
        lm.module(data.images)
    for h in hooks:
        h.remove()
    for name, r in est.items():
        x = seen[name]
        p9999 = float(x.kthvalue(int(0.9999 * x.numel())).values)
        assert 0.5 * p9999 <= r.amax <= 3.0 * p9999, f"{name}: amax {r.amax:.2f} vs p99.99 {p9999:.2f}"
        clipped = float((x > r.amax).float().mean())
        assert clipped < 2e-3, f"{name}: {100 * clipped:.3f}% of the values clipped"
