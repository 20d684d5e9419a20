"""ResNet-18/34/50/101/152 and MobileNetV2 with torchvision's module names, so torchvision checkpoints load as-is.

Written from the published architectures (He et al. 2016 with the stride on the 3x3 conv of the bottleneck, the
"v1.5" variant torchvision ships; Sandler et al. 2018 for MobileNetV2), in plain torch: torchvision is never imported.
Only the *names* and shapes of the parameters have to match torchvision's, which a strict state-dict load checks:

* ResNet: ``conv1, bn1, relu, maxpool, layer1..layer4, avgpool, fc``; blocks hold ``conv1/bn1, conv2/bn2[, conv3/bn3]``
  and, where the shape changes, ``downsample.0`` (1x1 conv) and ``downsample.1`` (BN).
* MobileNetV2: ``features.0`` (conv-BN-act, stride 2), ``features.1..17`` (inverted residuals, each a ``conv``
  Sequential: [expand conv-BN-act], depthwise conv-BN-act, project conv, BN), ``features.18`` (1x1 conv-BN-act),
  ``classifier.1`` (Linear with bias; ``classifier.0`` is dropout).

Activations are separate modules (never shared, never in place) so the graph torch.fx records has one
conv -> BN -> activation chain per layer, which the layer pairing reads. MobileNetV2 takes ``act=nn.ReLU6`` (the float
model's definition) or ``act=nn.ReLU`` (torchvision's *quantizable* MobileNetV2, which replaces ReLU6 by ReLU; its
weights were trained with ReLU).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["TVResNet", "TVMobileNetV2", "RESNET_DEPTHS", "tv_resnet", "tv_mobilenet_v2"]

# depth -> (bottleneck?, blocks per stage)
RESNET_DEPTHS: dict[int, tuple[bool, tuple[int, int, int, int]]] = {
    18: (False, (2, 2, 2, 2)), 34: (False, (3, 4, 6, 3)), 50: (True, (3, 4, 6, 3)),
    101: (True, (3, 4, 23, 3)), 152: (True, (3, 8, 36, 3))}


def _conv(cin: int, cout: int, k: int, stride: int = 1, groups: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, k, stride, (k - 1) // 2, groups=groups, bias=False)


class BasicBlock(nn.Module):
    """3x3 conv-BN-ReLU, 3x3 conv-BN, plus the (projected) input, then ReLU."""

    expansion = 1

    def __init__(self, cin: int, planes: int, stride: int):
        super().__init__()
        self.conv1 = _conv(cin, planes, 3, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu1 = nn.ReLU()
        self.conv2 = _conv(planes, planes, 3)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = _projection(cin, planes, stride)
        self.relu = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.bn2(self.conv2(self.relu1(self.bn1(self.conv1(x)))))
        identity = x if self.downsample is None else self.downsample(x)
        return self.relu(out + identity)


class Bottleneck(nn.Module):
    """1x1 reduce, 3x3 (strided), 1x1 expand by 4, each conv-BN (ReLU after the first two), residual, ReLU."""

    expansion = 4

    def __init__(self, cin: int, planes: int, stride: int):
        super().__init__()
        self.conv1 = _conv(cin, planes, 1)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu1 = nn.ReLU()
        self.conv2 = _conv(planes, planes, 3, stride)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu2 = nn.ReLU()
        self.conv3 = _conv(planes, planes * 4, 1)
        self.bn3 = nn.BatchNorm2d(planes * 4)
        self.downsample = _projection(cin, planes * 4, stride)
        self.relu = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.relu2(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        identity = x if self.downsample is None else self.downsample(x)
        return self.relu(out + identity)


def _projection(cin: int, cout: int, stride: int) -> nn.Sequential | None:
    if stride == 1 and cin == cout:
        return None
    return nn.Sequential(_conv(cin, cout, 1, stride), nn.BatchNorm2d(cout))


class TVResNet(nn.Module):
    """ImageNet ResNet in torchvision's layout.

    Args:
        depth: 18, 34, 50, 101 or 152.
        num_classes: outputs of ``fc`` (which has a bias).
    """

    layer1: nn.Sequential
    layer2: nn.Sequential
    layer3: nn.Sequential
    layer4: nn.Sequential

    def __init__(self, depth: int = 18, num_classes: int = 1000):
        super().__init__()
        if depth not in RESNET_DEPTHS:
            raise ValueError(f"ResNet depth {depth} is not one of {sorted(RESNET_DEPTHS)}")
        bottleneck, blocks = RESNET_DEPTHS[depth]
        block = Bottleneck if bottleneck else BasicBlock
        self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU()
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        cin = 64
        for i, (planes, n) in enumerate(zip((64, 128, 256, 512), blocks)):
            layer = []
            for j in range(n):
                layer.append(block(cin, planes, 2 if (i > 0 and j == 0) else 1))
                cin = planes * block.expansion
            setattr(self, f"layer{i + 1}", nn.Sequential(*layer))
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(cin, num_classes)
        _he_init(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def _conv_bn_act(cin: int, cout: int, k: int, stride: int, groups: int, act: type[nn.Module]) -> nn.Sequential:
    return nn.Sequential(_conv(cin, cout, k, stride, groups), nn.BatchNorm2d(cout), act())


class InvertedResidual(nn.Module):
    """[1x1 expand conv-BN-act], 3x3 depthwise conv-BN-act, 1x1 projection conv-BN; residual when shapes agree."""

    def __init__(self, cin: int, cout: int, stride: int, expand: int, act: type[nn.Module]):
        super().__init__()
        hidden = cin * expand
        layers: list[nn.Module] = []
        if expand != 1:
            layers.append(_conv_bn_act(cin, hidden, 1, 1, 1, act))
        layers += [_conv_bn_act(hidden, hidden, 3, stride, hidden, act), _conv(hidden, cout, 1), nn.BatchNorm2d(cout)]
        self.conv = nn.Sequential(*layers)
        self.use_residual = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.use_residual:  # a Python bool fixed at construction: torch.fx records one branch
            return x + self.conv(x)
        return self.conv(x)


# (expansion t, output channels c, repeats n, first stride s) of the MobileNetV2 paper's Table 2
_MBV2_STAGES = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2),
                (6, 320, 1, 1))


class TVMobileNetV2(nn.Module):
    """MobileNetV2 (width 1.0) in torchvision's layout.

    Args:
        num_classes: outputs of ``classifier.1``.
        act: ``nn.ReLU6`` (torchvision's float model) or ``nn.ReLU`` (its quantizable model).
        dropout: dropout probability before the classifier (inactive in eval mode).
    """

    def __init__(self, num_classes: int = 1000, act: type[nn.Module] = nn.ReLU6, dropout: float = 0.2):
        super().__init__()
        layers: list[nn.Module] = [_conv_bn_act(3, 32, 3, 2, 1, act)]
        cin = 32
        for t, c, n, s in _MBV2_STAGES:
            for i in range(n):
                layers.append(InvertedResidual(cin, c, s if i == 0 else 1, t, act))
                cin = c
        layers.append(_conv_bn_act(cin, 1280, 1, 1, 1, act))
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Sequential(nn.Dropout(dropout), nn.Linear(1280, num_classes))
        _he_init(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.adaptive_avg_pool2d(self.features(x), 1)
        return self.classifier(torch.flatten(x, 1))


def _he_init(model: nn.Module) -> None:
    """He-normal convs (fan-out), unit BN, small-normal classifier: a sane start for ``--weights random``."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, 0, 0.01)
            nn.init.zeros_(m.bias)


def tv_resnet(depth: int, num_classes: int = 1000) -> TVResNet:
    """A randomly initialised torchvision-layout ResNet of the given depth."""
    return TVResNet(depth, num_classes)


def tv_mobilenet_v2(relu6: bool = True, num_classes: int = 1000) -> TVMobileNetV2:
    """A randomly initialised torchvision-layout MobileNetV2 with ReLU6 (float model) or ReLU (quantizable model)."""
    return TVMobileNetV2(num_classes, nn.ReLU6 if relu6 else nn.ReLU)
