"""passes/equalize.py: DFQ's cross-layer equalisation is exact and equalises; bias correction fixes the mean."""
import copy

import torch

from dfmpc_deploy.core.graph import GraphAnalysis, Role
from dfmpc_deploy.core.quantizers import dequantize, int_grid
from dfmpc_deploy.passes.base import Context, Recipe
from dfmpc_deploy.passes.equalize import BiasCorrect, Equalize, EqualizeRows, cross_layer_equalize, equalize_rows
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


def _row_ranges(m):
    return m.weight.detach().abs().flatten(1).amax(1)


def test_row_equalisation_is_exact_and_gives_every_row_the_widest_range():
    net = make_tiny_net()
    g = GraphAnalysis.of(net)
    names = set(g.bn_after)
    eq, spread, _ = equalize_rows(net, g, dict.fromkeys(names, 4))
    x = example_inputs(64)
    with torch.no_grad():
        assert torch.allclose(eq(x), net(x), atol=1e-5, rtol=1e-5), "row equalisation changed the FP function"
    m, orig = dict(eq.named_modules()), dict(net.named_modules())
    convs = [n for n in names if isinstance(m[n], torch.nn.Conv2d)]
    assert set(spread) == set(convs) and convs
    for n in convs:
        r = _row_ranges(m[n])
        assert torch.allclose(r, r.max().expand_as(r), rtol=1e-6), n
        assert torch.allclose(r.max(), _row_ranges(orig[n]).max()), "the widest row is unchanged"
        assert spread[n] > 1
    assert torch.equal(orig["stem"].weight, make_tiny_net().stem.weight), "the input model is not modified"


def test_row_equalisation_only_for_per_tensor_k_bit_layers_with_statistics():
    net = make_tiny_net()
    g = GraphAnalysis.of(net)
    low = {r.fqn for r in g.roles if r.role == Role.LOW}
    ctx = Context(fp_model=net, model=copy.deepcopy(net), graph=g, input_shape=SHAPE)
    info = EqualizeRows(bits="2/6").apply(ctx)
    m = dict(ctx.fp_model.named_modules())
    for n in low:  # ternary layers keep the weights TWN's threshold is defined on
        assert torch.equal(m[n].weight, dict(net.named_modules())[n].weight), n
    assert info["layers"] + info["left_as_they_were"] == len(
        {n for n in g.bn_after if n not in low and isinstance(m[n], torch.nn.Conv2d)})
    ctx = Context(fp_model=net, model=copy.deepcopy(net), graph=g, input_shape=SHAPE)
    assert "skipped" in EqualizeRows(bits="6", per_channel=True).apply(ctx) and ctx.fp_model is net
    ctx = Context(fp_model=net, model=copy.deepcopy(net), graph=g, input_shape=SHAPE, bn_status="identity")
    assert "skipped" in EqualizeRows(bits="6").apply(ctx) and ctx.fp_model is net


def test_row_equalisation_lowers_the_per_tensor_error_seen_after_the_bn():
    """What a BN-followed conv's error costs is its error in BN-normalised units: lower after equalisation."""
    net = make_tiny_net()
    g = GraphAnalysis.of(net)
    eq, _, _ = equalize_rows(net, g, dict.fromkeys(g.bn_after, 4))

    def normalised_error(model):
        mods, total = dict(model.named_modules()), 0.0
        for n, bn_name in g.bn_after.items():
            conv, bn = mods[n], mods[bn_name]
            if not isinstance(conv, torch.nn.Conv2d):
                continue
            w = conv.weight.detach()
            d = (dequantize(*int_grid(w, 4)) - w).flatten(1)
            gain = bn.weight.detach() / torch.sqrt(bn.running_var + bn.eps)
            total += float(((d ** 2).sum(1) * gain ** 2).sum())
        return total
    assert normalised_error(eq) < 0.8 * normalised_error(net)


def test_dfmpc_recipes_equalise_rows_first():
    for name in ("dfmpc", "dfmpc-alloc"):
        assert RECIPES[name].passes[0][0] is EqualizeRows
    for name in ("rtn", "zeroq", "gdfq", "dfmpc-paper"):
        assert all(p[0] is not EqualizeRows for p in RECIPES[name].passes), name


def test_row_equalisation_leaves_a_per_tensor_lattice_alone():
    net = make_tiny_net()
    g = GraphAnalysis.of(net)
    with torch.no_grad():
        w = net.conv1.weight
        q = torch.randint(-128, 128, w.shape, generator=torch.Generator().manual_seed(0))
        w.copy_(q.float() * 0.0123)
    eq, spread, kept = equalize_rows(net, g, dict.fromkeys(g.bn_after, 8))
    assert "conv1" in kept and "conv1" not in spread
    assert torch.equal(dict(eq.named_modules())["conv1"].weight, net.conv1.weight)
