"""passes/guard.py: a guarded correction that does not bring the model closer to the FP one is undone, exactly."""
import copy
from dataclasses import dataclass

import torch

from dfmpc_deploy.core.graph import GraphAnalysis
from dfmpc_deploy.passes.base import Context, Pass
from dfmpc_deploy.passes.guard import guarded_apply, holdout_kl
from dfmpc_deploy.passes.quantize import Quantize
from dfmpc_deploy.passes.recipes import compensate
from tests.conftest import example_inputs, make_tiny_net

SHAPE = (3, 16, 16)


def _ctx(holdout: bool = True) -> Context:
    net = make_tiny_net()
    ctx = Context(fp_model=net, model=copy.deepcopy(net), graph=GraphAnalysis.of(net), input_shape=SHAPE)
    Quantize(bits="3/6").apply(ctx)
    ctx.holdout = example_inputs(16, seed=9) if holdout else None
    return ctx


@dataclass(frozen=True)
class _Scale(Pass):
    """Multiplies every quantized layer's scale (and the working weights) by ``factor``."""

    name = "scale"
    guarded = True
    factor: float = 1.0

    def apply(self, ctx: Context) -> dict:
        mods = dict(ctx.model.named_modules())
        for q in ctx.layers.values():
            q.scale = q.scale * self.factor
            with torch.no_grad():
                mods[q.fqn].weight.copy_(q.weight())
        return {"factor": self.factor}


@dataclass(frozen=True)
class _BackToFP(Pass):
    """Puts the FP weights back (the best possible 'correction')."""

    name = "fp"
    guarded = True

    def apply(self, ctx: Context) -> dict:
        ctx.model.load_state_dict(ctx.fp_model.state_dict())
        return {}


def test_a_correction_that_hurts_is_undone_exactly():
    ctx = _ctx()
    state = {k: v.clone() for k, v in ctx.model.state_dict().items()}
    scales = {n: q.scale.clone() for n, q in ctx.layers.items()}
    before = holdout_kl(ctx)
    info = guarded_apply(_Scale(factor=1.7), ctx)
    assert info["guard"]["kept"] is False and info["guard"]["kl_after"] > info["guard"]["kl_before"]
    assert info["factor"] == 1.7
    assert all(torch.equal(v, ctx.model.state_dict()[k]) for k, v in state.items())
    assert all(torch.equal(scales[n], q.scale) for n, q in ctx.layers.items())
    assert holdout_kl(ctx) == before


def test_a_correction_that_helps_is_kept():
    ctx = _ctx()
    info = guarded_apply(_BackToFP(), ctx)
    assert info["guard"]["kept"] is True
    assert info["guard"]["kl_after"] < 1e-6 < info["guard"]["kl_before"]


def test_without_held_out_inputs_there_is_no_guard():
    ctx = _ctx(holdout=False)
    info = guarded_apply(_Scale(factor=1.7), ctx)
    assert "guard" not in info and holdout_kl(ctx) is None


def test_the_default_recipe_reports_the_guard_and_its_held_out_inputs():
    net = make_tiny_net()
    mp = compensate(net, SHAPE, "dfmpc", bits="3/6", synth_samples=8, synth_steps=5)
    cal, rec = mp.config.record("calibrate"), mp.config.record("recalibrate")
    assert cal.info["holdout_samples"] == 4 and cal.info["per_bn"]["layers"] == 3
    guard = rec.info["guard"]
    assert set(guard) == {"kept", "kl_before", "kl_after"}
    assert guard["kept"] == (guard["kl_after"] < guard["kl_before"])
    zeroq = compensate(net, SHAPE, "zeroq", bits="3/6", synth_samples=8, synth_steps=5)
    assert "guard" not in zeroq.config.record("recalibrate").info  # a published method runs as published
