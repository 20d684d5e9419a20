"""Shared fixtures: a seeded tiny CNN with non-trivial BN statistics, and paths to ../shared/data."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"
R20_WEIGHTS = SHARED_DATA / "weights" / "akamaster_cifar10" / "resnet20-12fca82f.th"
R56_WEIGHTS = SHARED_DATA / "weights" / "akamaster_cifar10" / "resnet56-4bfd9763.th"
CIFAR_TEST = SHARED_DATA / "cifar10-test-jpg" / "test"

needs_shared = pytest.mark.skipif(not R20_WEIGHTS.is_file(),
                                  reason="../shared/data (real weights/test set) not present")


class TinyNet(nn.Module):
    """Conv-BN-ReLU x3 -> GAP -> Linear on 3x16x16 inputs (one DF-MPC pair plus a stem)."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn0 = nn.BatchNorm2d(8)
        self.conv1 = nn.Conv2d(8, 16, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.conv2 = nn.Conv2d(16, 16, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(16)
        self.fc = nn.Linear(16, 10)

    def forward(self, x):
        x = torch.relu(self.bn0(self.stem(x)))
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.bn2(self.conv2(x)))
        return self.fc(x.mean(dim=(2, 3)))


def example_inputs(n: int = 64, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, 3, 16, 16, generator=torch.Generator().manual_seed(seed))


def make_tiny_net(seed: int = 0) -> nn.Module:
    """Seeded TinyNet whose BN running statistics are the population statistics of Gaussian inputs."""
    torch.manual_seed(seed)
    net = TinyNet()
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.Conv2d):
                # log-normal per-output-channel scale spread, as in real nets
                m.weight.mul_(torch.exp(0.5 * torch.randn(m.out_channels, 1, 1, 1)))
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0, 0.5)
        net.train()
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.momentum = None
        net(torch.randn(512, 3, 16, 16, generator=torch.Generator().manual_seed(123)))
    return net.eval()


@pytest.fixture
def tiny_net() -> nn.Module:
    return make_tiny_net()


def trained_bn_statistics_(net: nn.Module, gamma: tuple[float, float] | None = None,
                           beta: tuple[float, float] | None = None) -> nn.Module:
    """Give every BatchNorm2d of ``net`` trained-looking statistics (mean U(-0.5, 0.5), var U(0.5, 2)) and, when
    given, gamma ~ U(*gamma) and beta ~ U(*beta), under the caller's seed (identity statistics read as folded BN);
    returns ``net`` in eval mode."""
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                if gamma is not None:
                    m.weight.uniform_(*gamma)
                if beta is not None:
                    m.bias.uniform_(*beta)
    return net.eval()


@pytest.fixture(scope="module")
def one_torch_thread():
    """One intra-op thread for a module of short ops: on a busy shared CPU, waking OpenMP workers (~10 ms each)
    would dominate. Use with ``pytestmark = pytest.mark.usefixtures("one_torch_thread")``."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


CIFAR_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")


def make_images(root: Path, per_class: int = 2, size: int = 32) -> Path:
    """A seeded 10-class imagefolder of random PNGs (CIFAR-10 class names, ``per_class`` images each)."""
    rng = np.random.default_rng(0)
    for c in CIFAR_CLASSES:
        (root / c).mkdir(parents=True)
        for i in range(per_class):
            Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(root / c / f"{i}.png")
    return root
