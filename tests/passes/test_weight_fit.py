"""passes/weight_fit.py and the no-statistics fallback: what `dfmpc` does on a model whose BN was folded."""
import pytest
import torch
from torch import nn

from calib_free.ranges import estimate_act_ranges
from dfmpc_deploy.core.graph import GraphAnalysis
from dfmpc_deploy.core.quantizers import quantize_weight
from dfmpc_deploy.core.state import QuantLayer
from dfmpc_deploy.errors import UsageError
from dfmpc_deploy.passes.base import Recipe, run_recipe
from dfmpc_deploy.passes.quantize import Quantize
from dfmpc_deploy.passes.recipes import RECIPES, compensate
from dfmpc_deploy.passes.weight_fit import CorrectBias, fit_layer
from tests.deploy.test_depthwise import SHAPE, tiny_ir


def smooth_inputs(n: int = 64, seed: int = 3) -> torch.Tensor:
    """Standardised inputs that are locally constant (4x4 blocks), like natural images at the scale of a window."""
    g = torch.Generator().manual_seed(seed)
    return nn.functional.interpolate(torch.randn(n, 3, 4, 4, generator=g), scale_factor=4, mode="nearest")


def _err(model, ref, x):
    with torch.no_grad():
        y, r = model(x), ref(x)
    return float((y - r).pow(2).sum() / r.pow(2).sum())


def test_fit_layer_never_increases_the_rescaled_weight_error_and_keeps_the_grid():
    torch.manual_seed(0)
    w = torch.randn(16, 8, 3, 3) * torch.exp(torch.randn(16, 1, 1, 1))
    w[0, 0, 0, 0] = 25.0  # an outlier: clipping pays off per tensor
    codes, scale = quantize_weight(w, 4, grid="dorefa")  # DoReFa has no clipping of its own
    q = QuantLayer("l", "conv", "high", 4, codes, scale, grid="dorefa")
    new_codes, new_scale, m, c = fit_layer(w, q)

    def resid(cd, sc, cc):
        return float((w - cd.float() * (sc * cc.float()).reshape(-1, 1, 1, 1)).pow(2).sum())

    assert m < 1.0, "the outlier should make a clipped grid win"
    assert resid(new_codes, new_scale, c) < resid(codes, scale, torch.ones(16)) * 0.9
    assert torch.equal(new_scale, new_scale[0].expand(16)), "per-tensor grid stays per tensor"
    assert int(new_codes.abs().max()) <= 15 and (new_codes % 2 != 0).all(), "DoReFa codes are odd integers"


def test_fit_layer_on_the_int_grid_keeps_int_codes_and_never_increases_the_weight_error():
    torch.manual_seed(0)
    w = torch.randn(16, 8, 3, 3) * torch.exp(torch.randn(16, 1, 1, 1))
    w[0, 0, 0, 0] = 25.0
    codes, scale = quantize_weight(w, 4, grid="int")  # its step is already chosen by weight error
    q = QuantLayer("l", "conv", "high", 4, codes, scale, grid="int")
    new_codes, new_scale, m, _ = fit_layer(w, q)
    err = float((w - new_codes.float() * new_scale.reshape(-1, 1, 1, 1)).pow(2).sum())
    assert err <= float((w - codes.float() * scale.reshape(-1, 1, 1, 1)).pow(2).sum())
    assert int(new_codes.min()) >= -8 and int(new_codes.max()) <= 7 and bool((new_codes == 0).any())


def _two_layer() -> nn.Module:
    """conv -> BN (folded: identity statistics, the folded bias) -> ReLU -> conv -> BN."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 6, 3, bias=False), nn.BatchNorm2d(6), nn.ReLU(), nn.Conv2d(6, 4, 1, bias=False),
                        nn.BatchNorm2d(4)).eval()
    with torch.no_grad():
        for bn in (net[1], net[4]):
            bn.bias.uniform_(-0.5, 0.5)
            bn.running_var.fill_(1 - bn.eps)
    return net


def _white_and_constant(n: int = 4000):
    g = torch.Generator().manual_seed(1)
    return torch.randn(n, 3, 3, 3, generator=g), torch.randn(n, 3, 1, 1, generator=g).expand(-1, -1, 3, 3)


def test_propagated_moments_are_exact_where_their_assumptions_hold():
    """conv -> BN (as an affine map, whatever its statistics) -> ReLU -> conv: the second conv's input mean is
    E[ReLU(z)] with z Gaussian, exactly what the propagation computes - for white inputs with independent window
    entries, for constant images with coherent windows (the two window rules)."""
    net = _two_layer()
    with torch.no_grad():
        net[1].weight.uniform_(0.5, 1.5)
        net[1].running_mean.uniform_(-0.2, 0.2)
        net[1].running_var.uniform_(0.5, 2.0)
    for x, coherent in zip(_white_and_constant(), (False, True)):
        seen: dict[str, torch.Tensor] = {}
        h = net[3].register_forward_hook(lambda m, i, o, seen=seen: seen.update(x=i[0]))
        with torch.no_grad():
            net(x)
        h.remove()
        est = estimate_act_ranges(net, statistics="propagate", coherent=coherent)["3"]
        measured = seen["x"].mean(dim=(0, 2, 3)).double()
        assert torch.allclose(est.mean, measured, rtol=0.05, atol=0.02), (coherent, est.mean, measured)
        other = estimate_act_ranges(net, statistics="propagate", coherent=not coherent)["3"]
        assert (other.mean - measured).abs().max() > 2 * (est.mean - measured).abs().max(), "the rules coincide"
    with pytest.raises(ValueError, match="statistics 'data'"):
        estimate_act_ranges(net, statistics="data")


@pytest.mark.parametrize("windows", ["independent", "coherent"])
def test_bias_from_weights_brings_the_output_mean_back(windows):
    net = _two_layer()
    x = _white_and_constant()[windows == "coherent"]
    settings = {"bits": "3", "per_channel": False}
    plain = run_recipe(RECIPES["rtn"], net, (3, 3, 3), settings)
    fixed = run_recipe(Recipe("bc", "", "none", False, ((Quantize, {}), (CorrectBias, {"windows": windows}))), net,
                       (3, 3, 3), settings)
    info = fixed.config.record("bias_from_weights").info
    assert (info["corrected_layers"], info["skipped"]) == (2, 0)
    with torch.no_grad():  # what the correction promises: each layer's output mean on the FP layer's input
        x2 = net[:3](x)
        ref, a, b = (m[3:](x2).mean(dim=(0, 2, 3)) for m in (net, plain.module, fixed.module))
    assert float((b - ref).abs().max()) < 0.2 * float((a - ref).abs().max()), (a - ref, b - ref)
    assert all(torch.equal(m.running_mean, torch.zeros_like(m.running_mean))
               for m in fixed.module.modules() if isinstance(m, nn.BatchNorm2d)), "statistics stay identity"
    with pytest.raises(UsageError, match="windows='smooth'"):
        CorrectBias(windows="smooth")


@pytest.mark.parametrize("per_channel", [False, True])
def test_dfmpc_without_statistics_falls_back_to_dfmpc_weights_and_beats_rtn(per_channel):
    net = tiny_ir(nn.ReLU, folded=True)
    mp = compensate(net, SHAPE, "dfmpc", bits="3", per_channel=per_channel, grid="dorefa")
    run = mp.config
    assert run.recipe == "dfmpc-weights" and run.bn_status == "identity"
    assert "runs as dfmpc-weights" in run.overrides[0]
    assert ("skipped" in run.record("equalize").info) == per_channel  # CLE only for per-tensor grids
    rtn = compensate(net, SHAPE, "rtn", bits="3", per_channel=per_channel, grid="dorefa")
    x = smooth_inputs(128)
    e_mp, e_rtn = _err(mp.module, net, x), _err(rtn.module, net, x)
    assert e_mp < 0.5 * e_rtn, f"dfmpc-weights {e_mp:.4f} vs rtn {e_rtn:.4f}"


def test_dfmpc_weights_on_a_model_with_statistics_runs_as_asked():
    net = tiny_ir(nn.ReLU)
    mp = compensate(net, SHAPE, "dfmpc-weights", bits="6")
    assert mp.config.recipe == "dfmpc-weights" and mp.config.bn_status == "real" and not mp.config.overrides
    assert GraphAnalysis.of(net).pairs == mp.analysis().pairs


@pytest.mark.parametrize("act", [nn.ReLU, nn.ReLU6])
def test_dfmpc_weights_takes_per_channel_grids_where_equalisation_cannot_run(act):
    """Per-tensor grids rely on CLE; across ReLU6 links CLE cannot rescale, so the recipe picks per-channel grids
    (said in the overrides) unless the caller chose, and the per-channel result is the better one there."""
    net = tiny_ir(act, folded=True)
    mp = compensate(net, SHAPE, "dfmpc", bits="4")
    run = mp.config
    blocked = act is nn.ReLU6
    assert run.record("quantize").config["per_channel"] is blocked
    assert any("per-channel grids" in o and "relu6" in o for o in run.overrides) == blocked
    kept = compensate(net, SHAPE, "dfmpc", bits="4", per_channel=False)  # the caller's choice stands
    assert kept.config.record("quantize").config["per_channel"] is False
    assert not any("per-channel grids" in o for o in kept.config.overrides)
    if blocked:
        x = smooth_inputs(128)
        assert _err(mp.module, net, x) < _err(kept.module, net, x)


def test_cle_is_kept_only_where_it_lowers_the_per_tensor_rounding_error():
    """Weights on a per-tensor int8 lattice (a QAT model with folded BN) round exactly at 8 bits: CLE would move them
    off it, so it is skipped and the 8-bit model is the FP one; at 3 bits CLE lowers the error and runs."""
    net = tiny_ir(nn.ReLU, folded=True)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                q = torch.randint(-127, 128, m.weight.shape, generator=torch.Generator().manual_seed(m.weight.numel()))
                m.weight.copy_(q.float() * (float(m.weight.abs().max()) / 127))
    mp = compensate(net, SHAPE, "dfmpc", bits="8")
    info = mp.config.record("equalize").info
    assert "skipped" in info and info["rounding_error"] == 0.0 < info["rounding_error_cle"]
    for name, q in mp.layers.items():
        assert torch.equal(q.weight(), dict(net.named_modules())[name].weight), name
    info3 = compensate(net, SHAPE, "dfmpc", bits="3").config.record("equalize").info
    assert "skipped" not in info3 and info3["rounding_error_cle"] < info3["rounding_error"]
