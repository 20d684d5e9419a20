"""passes/equalize.py: DFQ's cross-layer equalisation is exact and equalises; bias correction fixes the mean."""
import torch

from dfmpc_deploy.core.graph import GraphAnalysis
from dfmpc_deploy.passes.base import Recipe
from dfmpc_deploy.passes.equalize import BiasCorrect, Equalize, cross_layer_equalize
from dfmpc_deploy.passes.quantize import Quantize
from dfmpc_deploy.passes.recipes import RECIPES, compensate
from tests.conftest import example_inputs, make_tiny_net

SHAPE = (3, 16, 16)


def test_cle_is_exact_and_equalises_ranges():
    net = make_tiny_net()
    eq, pre = cross_layer_equalize(net, GraphAnalysis.of(net))
    x = example_inputs(64)
    with torch.no_grad():
        assert torch.allclose(eq(x), net(x), atol=1e-5), "CLE changed the FP function"
    m = dict(eq.named_modules())
    for a, b in (("stem", "conv1"), ("conv1", "conv2")):
        r1 = m[a].weight.abs().flatten(1).amax(1)
        r2 = m[b].weight.abs().transpose(0, 1).flatten(1).amax(1)
        assert torch.allclose(r1, r2, rtol=1e-2), f"{a}->{b} ranges not equalised"
    assert set(pre) == {"bn0", "bn1"}


def _bn2_mean(model, x):
    out = {}
    h = dict(model.named_modules())["bn2"].register_forward_hook(lambda m, i, o: out.update(y=o))
    with torch.no_grad():
        model(x)
    h.remove()
    return out["y"].mean(dim=(0, 2, 3))


def test_bias_correction_matches_fp_mean_better():
    net = make_tiny_net()
    x = torch.randn(512, *SHAPE, generator=torch.Generator().manual_seed(7))  # the BN statistics' input law
    ref = _bn2_mean(net, x)
    recipes = {False: (RECIPES["rtn"], Recipe("bc", "", "none", False, ((Quantize, {}), (BiasCorrect, {})))),
               True: (Recipe("eq", "", "none", False, ((Equalize, {}), (Quantize, {}))), RECIPES["dfq"])}
    for equalize, (off_r, on_r) in recipes.items():
        from dfmpc_deploy.passes.base import run_recipe
        off, on = run_recipe(off_r, net, SHAPE), run_recipe(on_r, net, SHAPE)
        assert on.config.record("bias_correct").info["corrected_layers"] == 2
        e_off = float((_bn2_mean(off.module, x) - ref).abs().mean())
        e_on = float((_bn2_mean(on.module, x) - ref).abs().mean())
        assert e_on < 0.75 * e_off, f"equalize={equalize}: bias correction mean error {e_on:.4f} vs {e_off:.4f}"


def test_dfq_estimator_names_its_steps():
    assert compensate(make_tiny_net(), SHAPE, "dfq").estimator == \
        "none (data-free: CLE + analytic bias correction from BN statistics)"
