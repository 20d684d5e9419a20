"""passes/recalibrate.py: BN re-estimation and error-feedback rounding in one walk equal the layer-by-layer way."""
import copy

import pytest
import torch
from torch import nn

from calib_free import collect_bn_stats, recalibrate_bn_
from dfmpc_deploy.core.graph import GraphAnalysis, Role
from dfmpc_deploy.passes.base import Context
from dfmpc_deploy.passes.quantize import Quantize
from dfmpc_deploy.passes.recalibrate import DELTA_FITS, Recalibrate, column_energy, delta_statistics
from dfmpc_deploy.passes.rounding import best_grid_codes, grouped_codes, input_second_moment
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
    info = Recalibrate().apply(ctx)  # delta statistics at every BN: the FP model runs once more, not this one
    assert info["rounded_layers"] == 1 and info["bn_reestimated"] == 3 and info["stats"] == "delta"
    assert set(calls.values()) == {1}, calls


def test_nearest_rounding_statistics_equal_a_train_mode_re_estimation():
    net = make_tiny_net()
    x = example_inputs(64)
    for scope, names in (("low", ["bn1"]), ("all", ["bn0", "bn1", "bn2"])):
        ctx = _ctx(net, x)
        ref = copy.deepcopy(ctx.model)
        Recalibrate(rounding="nearest", recal_scope=scope, stats="absolute").apply(ctx)
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
    Recalibrate(rounding_scope="all", stats="absolute").apply(ctx)
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


def _depthwise_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.Conv2d(8, 16, 3, padding=1, groups=8), nn.BatchNorm2d(16), nn.ReLU(),
                         nn.Conv2d(16, 8, 1)).eval()


def test_grouped_convolutions_get_error_feedback_per_group():
    net = _depthwise_net()
    ctx = _ctx(net, example_inputs(16))
    before = {n: q.codes.clone() for n, q in ctx.layers.items()}
    info = Recalibrate(rounding_scope="all").apply(ctx)
    assert info["rounded_layers"] == 3 and info["grouped_rounded"] == 1
    assert not torch.equal(ctx.layers["3"].codes, before["3"])


def test_grouped_codes_equal_error_feedback_on_each_group_alone():
    """The batched grouped rounding is the ungrouped algorithm run on each group with that group's moment."""
    conv = _depthwise_net()[3]
    x = torch.randn(4, 8, 10, 10, generator=torch.Generator().manual_seed(2))
    h = input_second_moment(conv, x)
    assert h.shape == (8, 9, 9)  # one input channel x 3 x 3 per group
    w = conv.weight.detach().flatten(1)
    scale = w.abs().amax(1) / 63
    codes, chosen, mult = grouped_codes(w, h, scale, 6, groups=8, multipliers=(1.0,))
    for g in range(8):
        rows = slice(2 * g, 2 * g + 2)
        one = nn.Conv2d(1, 2, 3, padding=1)
        ref_h = input_second_moment(one, x[:, g:g + 1])
        ref, _, _ = best_grid_codes(w[rows], ref_h, scale[rows], 6, multipliers=(1.0,))
        assert torch.allclose(h[g], ref_h, rtol=1e-4, atol=1e-6)
        assert (codes[rows] == ref).float().mean() >= 0.98, g
    assert torch.equal(chosen, scale) and mult == 1.0


def test_grouped_error_feedback_lowers_the_output_error_of_nearest_rounding():
    from dfmpc_deploy.passes.rounding import nearest_codes
    conv = _depthwise_net()[3]
    # neighbouring pixels correlate, as in images (independent inputs leave nothing for error feedback to use)
    x = torch.nn.functional.avg_pool2d(torch.randn(4, 8, 12, 12, generator=torch.Generator().manual_seed(3)), 3, 1)
    h = input_second_moment(conv, x)
    w = conv.weight.detach().flatten(1)
    scale = w.abs().amax(1) / 3  # 3-bit: where the choice of codes matters
    codes, s, _ = grouped_codes(w, h, scale, 3, groups=8, multipliers=(1.0,))

    def out_err(c):
        d = (c * scale[:, None] - w).reshape(8, 2, -1)
        return float(torch.einsum("grk,gkl,grl->", d, h, d))
    assert out_err(codes) < 0.8 * out_err(nearest_codes(w, scale[:, None], 3))


def test_delta_statistics_of_an_unchanged_model_are_the_stored_ones():
    """Delta takes only the change quantization makes: with nothing changed, the stored statistics stay, however
    far the inputs' own statistics are from them (absolute statistics would replace them)."""
    net = make_tiny_net()
    ctx = Context(fp_model=net, model=copy.deepcopy(net), graph=GraphAnalysis.of(net), input_shape=SHAPE)
    Quantize().apply(ctx)
    ctx.model = copy.deepcopy(net)  # the working model computes exactly as the FP one
    ctx.inputs = 3 * example_inputs(32) + 1  # far from the statistics the BN layers stored
    Recalibrate(rounding="nearest", stats="delta").apply(ctx)
    got, fp = collect_bn_stats(ctx.model), collect_bn_stats(net)
    for n in ("bn0", "bn1", "bn2"):
        assert torch.allclose(got[n].mean, fp[n].mean, atol=1e-5) and torch.allclose(got[n].var, fp[n].var, rtol=1e-5)
    Recalibrate(rounding="nearest", stats="absolute", recal_scope="all").apply(ctx)
    assert not torch.allclose(collect_bn_stats(ctx.model)["bn0"].mean, fp["bn0"].mean, atol=1e-2)


@pytest.mark.parametrize("fit", DELTA_FITS)
def test_delta_statistics_in_the_walk_are_those_of_the_fp_and_quantized_inputs(fit):
    """The walk runs the FP model in lockstep: bn0's corrected statistics are delta_statistics of what bn0 sees in
    the FP and in the quantized model on the same inputs."""
    net = make_tiny_net()
    x = example_inputs(32)
    ctx = _ctx(net, x)
    seen = {}

    def keep(key, x):
        seen.setdefault(key, x.detach().clone())

    hooks = [dict(m.named_modules())["bn0"].register_forward_hook(lambda mod, i, o, key=key: keep(key, i[0]))
             for key, m in (("q", ctx.model), ("fp", net))]
    with torch.no_grad():
        ctx.model(x)
        net(x)
    for h in hooks:
        h.remove()
    stored = collect_bn_stats(net)["bn0"]
    bn = dict(net.named_modules())["bn0"]
    want = delta_statistics(bn.running_mean, bn.running_var, bn.eps, seen["fp"], seen["q"], fit)
    Recalibrate(rounding="nearest", stats="delta", delta_fit=fit).apply(ctx)
    got = collect_bn_stats(ctx.model)["bn0"]
    assert torch.allclose(got.mean, want[0].double(), atol=1e-5)
    assert torch.allclose(got.var, want[1].double(), rtol=1e-4)
    assert not torch.allclose(got.var, stored.var, rtol=1e-3)  # quantization moved them


def _bn_input(seed, n=16, c=4):
    return torch.randn(n, c, 5, 5, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("fit", DELTA_FITS)
def test_delta_statistics_of_a_rescaled_shifted_channel_are_exact(fit):
    """x_q = a x_fp + c: the BN with the corrected statistics maps x_q exactly as the stored BN maps x_fp - for
    ``affine`` whatever the stored statistics, for ``ratio`` only where the inputs' mean is the stored one."""
    x = _bn_input(0)
    a = torch.tensor([0.5, 1.0, 2.0, 3.0])[None, :, None, None]
    c = torch.tensor([0.1, -1.0, 0.0, 2.0])[None, :, None, None]
    mean, var, eps = torch.tensor([0.2, 0.0, -0.3, 1.0]), torch.tensor([1.0, 0.5, 2.0, 1.5]), 1e-5
    if fit == "ratio":
        mean = x.mean(dim=(0, 2, 3))
    m2, v2 = delta_statistics(mean, var, eps, x, a * x + c, fit)
    fp_out = (x - mean[None, :, None, None]) / (var + eps).sqrt()[None, :, None, None]
    q_out = (a * x + c - m2[None, :, None, None]) / (v2 + eps).sqrt()[None, :, None, None]
    assert torch.allclose(q_out, fp_out, atol=1e-4)


def test_delta_statistics_affine_shrinks_a_noisy_channel_and_every_fit_silences_a_dead_one():
    x = _bn_input(1)
    noise = 0.5 * _bn_input(2)
    xq = x + noise
    xq[:, 3] = 0.7  # the quantized filter rounded to zero: a constant channel
    mean, var, eps = torch.zeros(4), torch.ones(4), 1e-5
    m_r, v_r = delta_statistics(mean, var, eps, x, xq, "affine")
    m_v, v_v = delta_statistics(mean, var, eps, x, xq, "ratio")
    assert (v_r[:3] > v_v[:3]).all()  # the least-squares slope is below the variance ratio's when noise is added
    out_v = (xq[:, 3] - m_v[3]) / (v_v[3] + eps).sqrt()
    assert out_v.abs().max() < 1e-3  # the ratio rule: the constant is the mean, the BN outputs its shift
    assert v_r[3] >= 1e6 * var[3]  # no signal left: the BN outputs (almost exactly) its shift
    out = (xq[:, 3] - m_r[3]) / (v_r[3] + eps).sqrt()
    assert out.abs().max() < 1e-3
    m_m, v_m = delta_statistics(mean, var, eps, x, xq, "moments")
    assert ((xq[:, 3] - m_m[3]) / (v_m[3] + eps).sqrt()).abs().max() < 1e-3


def test_delta_statistics_keep_the_stored_ones_of_a_channel_the_inputs_leave_dark():
    x = _bn_input(3)
    x[:, 1] = 0.0  # dark on the calibration inputs (its stored statistics say it is not on real data)
    mean, var = torch.tensor([0.0, 0.5, 0.0, 0.0]), torch.tensor([1.0, 2.0, 1.0, 1.0])
    for fit in DELTA_FITS:
        m2, v2 = delta_statistics(mean, var, 1e-5, x, 0.5 * x + 3.0, fit)
        assert m2[1] == mean[1] and v2[1] == var[1]
        assert v2[0] != var[0]


def test_auto_statistics_keep_the_one_closer_on_held_out_inputs():
    from dfmpc_deploy.passes.guard import holdout_kl
    net = make_tiny_net()
    ctx = _ctx(net, example_inputs(32))
    ctx.holdout = example_inputs(16, seed=5)
    info = Recalibrate(stats="auto").apply(ctx)
    kl = info["stats_kl"]
    assert info["stats"] == min(kl, key=kl.get)
    assert holdout_kl(ctx) == pytest.approx(min(kl.values()), rel=1e-2)  # (reported to 6 decimals)


def test_auto_rounding_scope_is_the_low_layers_and_every_layer_of_at_most_4_bits():
    net = make_tiny_net()
    for bits, rounded in (("2/6", 1), ("4", 4), ("6", 1)):
        ctx = Context(fp_model=net, model=copy.deepcopy(net), graph=GraphAnalysis.of(net), input_shape=SHAPE)
        Quantize(bits=bits).apply(ctx)
        ctx.inputs = example_inputs(16)
        assert Recalibrate().apply(ctx)["rounded_layers"] == rounded, bits


def test_column_energy_is_the_diagonal_of_the_input_second_moment():
    x = example_inputs(4)[:, :, :8, :8]
    for m in (nn.Conv2d(3, 5, 3), nn.Conv2d(3, 6, 1), nn.Conv2d(6, 6, 3, groups=3)):
        xi = x if m.in_channels == 3 else torch.cat([x, x.flip(1)], 1)
        e = column_energy(m, xi)
        h = input_second_moment(m, xi)
        diag = h.diagonal(dim1=-2, dim2=-1)
        if m.groups > 1:  # (out, K): each row its group's diagonal
            diag = diag.repeat_interleave(m.out_channels // m.groups, dim=0)
        # without padding every position of a channel appears once per tap: equal up to the border positions
        assert e.shape == diag.shape
        assert torch.allclose(e, diag, rtol=0.35), m
    lin = nn.Linear(7, 2)
    z = torch.randn(5, 7)
    assert torch.allclose(column_energy(lin, z), input_second_moment(lin, z).diagonal(), rtol=1e-5)


def _step_ctx(bits="2/6", mismatch=None):
    net = make_tiny_net()
    ctx = _ctx(net, example_inputs(32))
    if mismatch is not None:
        ctx.shared["bn_mismatch"] = mismatch
    return net, ctx


def test_output_steps_only_where_the_synthetic_inputs_match_the_stored_statistics():
    trusted = {"bn0": 0.0, "bn1": 0.0, "bn2": 0.0}
    _, ctx = _step_ctx(mismatch=trusted)
    high = [q.fqn for q in ctx.layers.values() if q.role != Role.LOW and q.bits > 2]
    info = Recalibrate().apply(ctx)
    with_bn = [n for n in high if n in ctx.graph.bn_after]
    assert info["output_steps"] == len(with_bn) > 0
    _, ctx = _step_ctx(mismatch={k: 1.0 for k in trusted})  # a poor synthesis: nothing read from it
    assert Recalibrate().apply(ctx)["output_steps"] == 0
    _, ctx = _step_ctx()  # no synthesis quality measured (and not real inputs): nothing either
    assert Recalibrate().apply(ctx)["output_steps"] == 0
    _, ctx = _step_ctx(mismatch=trusted)
    before = {n: q.scale.clone() for n, q in ctx.layers.items()}
    assert Recalibrate(step_by="weights").apply(ctx)["output_steps"] == 0
    assert all(torch.equal(ctx.layers[n].scale, before[n]) for n in high)


def test_output_step_lowers_the_output_error_on_the_inputs_it_read():
    net, ctx = _step_ctx(mismatch={"bn0": 0.0, "bn1": 0.0, "bn2": 0.0})
    fp = dict(net.named_modules())
    name = next(n for n, q in ctx.layers.items() if q.role != Role.LOW and n in ctx.graph.bn_after)
    seen: dict[str, torch.Tensor] = {}

    def keep(mod, inp):  # the input this layer saw in the walk (a pre-hook's return value would replace it)
        seen.setdefault("x", inp[0].detach().clone())
    hook = dict(ctx.model.named_modules())[name].register_forward_pre_hook(keep)
    q_before = copy.deepcopy(ctx.layers[name])
    Recalibrate(rounding="nearest", stats="delta").apply(ctx)
    hook.remove()
    m = fp[name]
    h = input_second_moment(m, seen["x"])
    w = m.weight.detach().flatten(1)

    def err(q):
        d = q.weight().flatten(1) - w
        return float(torch.einsum("rk,kl,rl->", d, h, d))
    e = column_energy(m, seen["x"])

    def diag_err(q):
        return float(((q.weight().flatten(1) - w) ** 2 * e).sum())
    assert diag_err(ctx.layers[name]) <= diag_err(q_before) + 1e-9
    assert err(ctx.layers[name]) <= err(q_before) * 1.05  # the full second moment agrees up to its off-diagonal


def test_zeroq_keeps_the_weight_error_step():
    from dfmpc_deploy.passes.recipes import RECIPES
    spec = dict(RECIPES["zeroq"].passes)[Recalibrate]
    assert spec["step_by"] == "weights" and spec["rounding"] == "nearest"
