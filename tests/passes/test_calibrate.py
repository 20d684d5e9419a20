"""passes/calibrate.py: where the calibration inputs come from, and models whose BN carry no statistics."""
import dataclasses

import pytest
import torch
from torch import nn

from dfmpc_deploy.core.stats import bn_status
from dfmpc_deploy.errors import UsageError
from dfmpc_deploy.passes.recipes import compensate
from tests.conftest import make_tiny_net

SHAPE = (3, 16, 16)


def _folded(net):
    """``net`` with identity statistics, as a model whose BN was folded before publication carries."""
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.zero_()
                m.running_var.fill_(1 - m.eps)
    return net


def test_bn_status():
    assert bn_status(make_tiny_net()) == "real"
    assert bn_status(_folded(make_tiny_net())) == "identity"
    assert bn_status(nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU())) == "absent"


def test_synthesis_budget_and_record():
    mp = compensate(make_tiny_net(), SHAPE, synth_steps=7, synth_samples=4)
    info = mp.config.record("calibrate").info
    assert (info["source"], info["samples"], info["steps_max"], info["resolution"]) == ("synthetic", 4, 7, 16)
    assert info["steps_run"] <= 7 and info["loss_final"] <= info["loss_initial"]
    assert "4 samples" in mp.estimator and "no data" in mp.estimator


def test_identity_statistics_skip_synthesis_and_say_so():
    from dfmpc_deploy.passes.base import run_recipe
    from dfmpc_deploy.passes.recipes import RECIPES

    net = _folded(make_tiny_net())
    own = dataclasses.replace(RECIPES["dfmpc"], without_statistics="run")  # the passes themselves, no fallback
    mp = run_recipe(own, net, SHAPE, {"rounding": "nearest"})
    rec = mp.config.record("calibrate")
    assert rec.info["source"] == "none" and "identity" in rec.info["skipped"]
    assert mp.config.bn_status == "identity" and "carry no statistics" in mp.estimator
    with pytest.raises(UsageError, match="carry no statistics"):  # error feedback has nothing to measure H on
        run_recipe(own, net, SHAPE)


def test_real_reference_needs_images():
    with pytest.raises(UsageError, match="needs --data"):
        compensate(make_tiny_net(), SHAPE, recal="real")
    mp = compensate(make_tiny_net(), SHAPE, recal="real", real_inputs=torch.randn(16, *SHAPE))
    assert "REAL-DATA" in mp.estimator


def test_every_recipe_has_a_defined_behaviour_without_statistics():
    from dfmpc_deploy.errors import DfmpcError
    from dfmpc_deploy.passes.recipes import RECIPES

    net = _folded(make_tiny_net())
    ran = {}
    for name in RECIPES:
        try:
            mp = compensate(net, SHAPE, name, finetune_steps=2)
        except DfmpcError as err:
            assert name in ("zeroq", "gdfq") and "carry none (identity" in str(err), (name, err)
            continue
        ran[name] = mp.config
    assert ran["dfmpc"].recipe == "dfmpc-weights" and "runs as dfmpc-weights" in ran["dfmpc"].overrides[0]
    assert ran["dfmpc-alloc"].recipe == "dfmpc-weights"
    assert ran["rtn"].recipe == "rtn" and ran["dfmpc-paper"].recipe == "dfmpc-paper"
    assert ran["dfmpc-weights"].recipe == "dfmpc-weights"
    assert not any("runs as" in o for o in ran["dfmpc-weights"].overrides)
    assert ran["dfq"].record("bias_correct").info["skipped"] == "bn statistics identity"
    assert set(ran) == set(RECIPES) - {"zeroq", "gdfq"}
