"""passes/recalibrate.py: BN re-estimation and error-feedback rounding in one walk equal the layer-by-layer way."""
import copy

import torch
from torch import nn

from calib_free import collect_bn_stats, recalibrate_bn_
from dfmpc_deploy.core.graph import GraphAnalysis, Role
from dfmpc_deploy.passes.base import Context
from dfmpc_deploy.passes.quantize import Quantize
from dfmpc_deploy.passes.recalibrate import Recalibrate
from dfmpc_deploy.passes.rounding import best_grid_codes, input_second_moment
from tests.conftest import example_inputs, make_tiny_net

SHAPE = (3, 16, 16)


def _ctx(net, inputs):
    ctx = Context(fp_model=net, model=copy.deepcopy(net), graph=GraphAnalysis.of(net), input_shape=SHAPE)
    Quantize().apply(ctx)
    ctx.inputs = inputs
    return ctx


def test_every_module_runs_once():
    net = make_tiny_net()
    ctx = _ctx(net, example_inputs(32))
    calls: dict[str, int] = {}
    for n, m in ctx.model.named_modules():
        if not list(m.children()):
            m.register_forward_hook(lambda mod, i, o, n=n: calls.__setitem__(n, calls.get(n, 0) + 1))
    info = Recalibrate().apply(ctx)
    assert info["rounded_layers"] == 1 and info["bn_reestimated"] == 1
    assert set(calls.values()) == {1}, calls


def test_nearest_rounding_statistics_equal_a_train_mode_re_estimation():
    net = make_tiny_net()
    x = example_inputs(64)
    for scope, names in (("low", ["bn1"]), ("all", ["bn0", "bn1", "bn2"])):
        ctx = _ctx(net, x)
        ref = copy.deepcopy(ctx.model)
        Recalibrate(rounding="nearest", recal_scope=scope).apply(ctx)
        recalibrate_bn_(ref, x, names)
        got, want, fp = collect_bn_stats(ctx.model), collect_bn_stats(ref), collect_bn_stats(net)
        for n in ("bn0", "bn1", "bn2"):
            if n in names:
                assert torch.allclose(got[n].mean, want[n].mean, rtol=1e-3, atol=1e-5), (scope, n)
                assert torch.allclose(got[n].var, want[n].var, rtol=1e-3), (scope, n)
            else:
                assert torch.equal(got[n].var, fp[n].var), (scope, n)


def test_error_feedback_in_one_walk_equals_the_layer_by_layer_procedure():
    """Reference: before each layer, re-estimate the scoped statistics and run the whole model to see its input."""
    net = make_tiny_net()
    x = example_inputs(64)
    ctx = _ctx(net, x)
    ref_model, ref_layers = copy.deepcopy(ctx.model), copy.deepcopy(ctx.layers)
    Recalibrate(rounding_scope="all").apply(ctx)
    mods, fp = dict(ref_model.named_modules()), dict(net.named_modules())
    scope = ["bn1"]
    for name, q in ref_layers.items():
        recalibrate_bn_(ref_model, x, scope)
        seen = []
        h = mods[name].register_forward_hook(lambda m, i, o, seen=seen: seen.append(i[0]))
        with torch.no_grad():
            ref_model(x)
        h.remove()
        hm = input_second_moment(mods[name], seen[0])
        mults = {} if q.role == Role.LOW else {"multipliers": (1.0,)}
        codes, scale, _ = best_grid_codes(fp[name].weight.flatten(1), hm, q.scale, q.bits, grid=q.grid,
                                          **mults)
        q.codes, q.scale = codes.reshape(q.codes.shape).to(q.codes.dtype), scale
        with torch.no_grad():
            mods[name].weight.copy_(q.weight())
    recalibrate_bn_(ref_model, x, scope)
    for name, q in ref_layers.items():
        agree = float((ctx.layers[name].codes == q.codes).float().mean())
        assert agree >= 0.98, f"{name}: {agree:.3f} of the codes agree"
    out_a, out_b = (m(x) for m in (ctx.model, ref_model))
    assert float((out_a - out_b).abs().max() / out_b.abs().max()) < 0.05


def test_without_inputs_gptq_is_a_clear_error_and_nearest_does_nothing():
    import pytest

    from dfmpc_deploy.errors import UsageError
    net = make_tiny_net()
    ctx = _ctx(net, None)
    with pytest.raises(UsageError, match="calibration inputs"):
        Recalibrate().apply(ctx)
    assert Recalibrate(rounding="nearest").apply(ctx) == {"skipped": "no calibration inputs"}


def test_grouped_convolutions_keep_nearest_codes():
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                        nn.Conv2d(8, 8, 3, padding=1, groups=8), nn.BatchNorm2d(8), nn.ReLU(),
                        nn.Conv2d(8, 8, 1)).eval()
    ctx = _ctx(net, example_inputs(16))
    before = {n: q.codes.clone() for n, q in ctx.layers.items()}
    info = Recalibrate(rounding_scope="all").apply(ctx)
    assert torch.equal(ctx.layers["3"].codes, before["3"])  # depthwise: not supported by error feedback
    assert info["rounded_layers"] == 2
