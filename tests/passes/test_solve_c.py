import copy

import pytest
import torch
from torch import nn

from calib_free import collect_bn_stats
from dfmpc_deploy.core.graph import Role
from dfmpc_deploy.core.quantizers import dequantize, ternarize
from dfmpc_deploy.passes.recipes import compensate
from dfmpc_deploy.passes.solve_c import closed_form_c, eq22_loss
from tests.conftest import example_inputs, make_tiny_net


def _random_layer(seed, out=12, inp=6):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out, inp, 3, 3, generator=g) * torch.exp(0.5 * torch.randn(out, 1, 1, 1, generator=g))
    w_hat = dequantize(*ternarize(w))
    gamma = torch.rand(out, generator=g, dtype=torch.float64) + 0.5
    beta = torch.randn(out, generator=g, dtype=torch.float64) * 0.5
    mu = torch.randn(out, generator=g, dtype=torch.float64)
    sigma = torch.rand(out, generator=g, dtype=torch.float64) + 0.5
    mu_hat = mu + 0.3 * torch.randn(out, generator=g, dtype=torch.float64)
    sigma_hat = sigma * (0.7 + 0.6 * torch.rand(out, generator=g, dtype=torch.float64))
    return w, w_hat, gamma, beta, mu, sigma, mu_hat, sigma_hat


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("lambdas", [(0.5, 0.0), (0.1, 0.01), (0.0, 0.0), (2.0, 0.1)])
def test_closed_form_equals_brute_force_minimiser_of_eq22(seed, lambdas):
    args = _random_layer(seed)
    c = closed_form_c(*args, *lambdas)
    # Eq. 22 is separable per channel: brute-force each channel on a fine grid of c >= 0.
    grid = torch.linspace(0, 4, 40001, dtype=torch.float64)
    best = torch.empty_like(c)
    for j in range(len(c)):
        sub = [a[j:j + 1] for a in args]
        losses = torch.stack([eq22_loss(torch.full((1,), float(g)), *sub, *lambdas) for g in grid[::200]])
        k = int(losses.argmin()) * 200
        fine = grid[max(0, k - 200):k + 201]
        losses = torch.stack([eq22_loss(torch.full((1,), float(g)), *sub, *lambdas) for g in fine])
        best[j] = fine[int(losses.argmin())]
    assert torch.allclose(c, best, atol=2e-4), f"closed form {c} vs grid {best}"
    assert eq22_loss(c, *args, *lambdas) <= eq22_loss(best, *args, *lambdas) + 1e-9
    assert (c >= 0).all()


def test_closed_form_clamps_negative_solutions_to_zero():
    w, w_hat, gamma, beta, mu, sigma, mu_hat, sigma_hat = _random_layer(0, out=1)
    w_hat = -w_hat * 1e-3  # anti-correlated, tiny: the unconstrained optimum is negative
    c = closed_form_c(w, w_hat, gamma, beta, mu, sigma, mu_hat, sigma_hat, 0.0, 0.0)
    assert c.item() == 0.0


def _feature_error(a: nn.Module, b: nn.Module, x: torch.Tensor) -> float:
    feats = {}

    def grab(name):
        return lambda m, i, o: feats.__setitem__(name, o.detach())

    ha = a.bn2.register_forward_hook(grab("a"))
    hb = b.bn2.register_forward_hook(grab("b"))
    with torch.no_grad():
        a(x), b(x)
    ha.remove(), hb.remove()
    return float(((feats["a"] - feats["b"]) ** 2).sum() / (feats["a"] ** 2).sum())


@pytest.mark.parametrize("seed", range(4))
def test_compensation_lowers_feature_reconstruction_error(seed):
    net = make_tiny_net(seed)
    x = example_inputs(128, seed=seed + 10)
    rtn = compensate(net, (3, 16, 16), "rtn")
    paper = compensate(net, (3, 16, 16), c_mode="paper", recal="none", rounding="nearest")
    full = compensate(net, (3, 16, 16), synth_steps=30)
    e_rtn, e_paper, e_full = (_feature_error(net, m.module, x) for m in (rtn, paper, full))
    assert e_paper < e_rtn, f"paper c {e_paper:.3f} should beat RTN {e_rtn:.3f}"
    assert e_full < e_rtn, f"default pipeline {e_full:.3f} should beat RTN {e_rtn:.3f}"


def test_fold_into_bn_equals_fold_into_next_layer_input_channels(tiny_net):
    mp = compensate(tiny_net, (3, 16, 16), c_mode="paper", recal="none", rounding="nearest")
    c = mp.layers["conv1"].c
    assert c is not None and not torch.allclose(c, torch.ones_like(c))
    # Undo the BN fold and put c into conv2's input channels instead (Eq. 7): outputs must agree.
    alt = copy.deepcopy(mp.module)
    with torch.no_grad():
        alt.bn1.weight.div_(c)
        alt.bn1.bias.div_(c)
        alt.conv2.weight.mul_(c.view(1, -1, 1, 1))
    x = example_inputs(8)
    with torch.no_grad():
        assert torch.allclose(mp.module(x), alt(x), atol=1e-5, rtol=1e-4)


def test_compensate_does_not_modify_input_and_uses_codes(tiny_net):
    before = {k: v.clone() for k, v in tiny_net.state_dict().items()}
    mp = compensate(tiny_net, (3, 16, 16), bits="2/6", synth_steps=5)
    for k, v in tiny_net.state_dict().items():
        assert torch.equal(v, before[k]), f"{k} was modified"
    mods = dict(mp.module.named_modules())
    for q in mp.layers.values():
        assert torch.equal(mods[q.fqn].weight, q.weight()), q.fqn
    assert mp.layers["conv1"].role == Role.LOW and mp.layers["conv1"].bits == 2
    assert mp.layers["conv2"].role == Role.HIGH_COMPENSATING and mp.layers["conv2"].bits == 6
    assert mp.layers["conv1"].c is not None and not mp.layers["conv1"].c_folded
    assert mp.layers["stem"].bits == 6 and mp.layers["fc"].bits == 6


def test_synthetic_recalibration_moves_low_bit_statistics(tiny_net):
    # per-channel grids: equalize_rows (which rescales a BN's statistics with its conv, exactly) leaves them alone
    mp = compensate(tiny_net, (3, 16, 16), synth_steps=20, rounding="nearest", stats="absolute", per_channel=True)
    fp, q = collect_bn_stats(tiny_net), collect_bn_stats(mp.module)
    assert not torch.allclose(fp["bn1"].var, q["bn1"].var)  # re-estimated (low-bit layer's BN)
    assert torch.equal(fp["bn2"].var, q["bn2"].var)  # absolute statistics, scope "low": other BNs untouched
