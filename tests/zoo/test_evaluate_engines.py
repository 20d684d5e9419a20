"""zoo/evaluate.py engines: ONNX Runtime computes what torch computes, ``auto`` picks it only for large inputs."""
import logging

import pytest
import torch
from torch import nn

from dfmpc_deploy.errors import UsageError
from dfmpc_deploy.zoo.data import Dataset
from dfmpc_deploy.zoo.evaluate import accuracy, logits
from tests.conftest import trained_bn_statistics_


def _net() -> nn.Module:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, 2, 1, bias=False), nn.BatchNorm2d(8), nn.ReLU6(),
                        nn.Conv2d(8, 8, 3, 1, 1, groups=8, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
                        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 5))
    return trained_bn_statistics_(net)


def test_ort_engine_matches_torch_and_auto_uses_it_for_large_inputs(caplog):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx")
    net = _net()
    x = torch.randn(10, 3, 80, 80, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = net(x)
    with caplog.at_level(logging.INFO, logger="dfmpc_deploy"):
        got = logits(net, x, batch_size=4, engine="auto")
    assert "with ONNX Runtime" in caplog.text
    assert torch.allclose(got, ref, rtol=1e-4, atol=1e-5)
    assert torch.allclose(logits(net, x, engine="ort"), logits(net, x, engine="torch"), rtol=1e-4, atol=1e-5)
    labels = ref.argmax(1)
    assert accuracy(net, Dataset("t", x, labels), engine="ort")["top1"] == 100.0


def test_auto_keeps_torch_for_small_inputs(caplog):
    with caplog.at_level(logging.INFO, logger="dfmpc_deploy"):
        logits(_net(), torch.randn(4, 3, 32, 32))
    assert "ONNX Runtime" not in caplog.text


def test_unknown_engine_is_a_usage_error():
    with pytest.raises(UsageError, match="bad evaluation engine 'tensorrt'"):
        logits(_net(), torch.randn(2, 3, 8, 8), engine="tensorrt")
