"""passes/recipes.py: every recipe on the tiny net - metadata, the exact configs that ran, numerics vs RTN."""
import json

import pytest
import torch

from dfmpc_deploy.cli import main
from dfmpc_deploy.core.graph import Role
from dfmpc_deploy.errors import DfmpcError
from dfmpc_deploy.io.container import save_packed
from dfmpc_deploy.passes.recipes import RECIPES, compensate, get_recipe
from tests.conftest import example_inputs, make_tiny_net

SHAPE = (3, 16, 16)
# small budgets: the tests check properties, not accuracy
SETTINGS = dict(synth_samples=16, synth_steps=20, finetune_steps=8)


def _rel_err(model, ref, x):
    with torch.no_grad():
        y, r = model(x), ref(x)
    return float(((y - r) ** 2).mean() / (r ** 2).mean())


@pytest.fixture(scope="module")
def runs():
    net = make_tiny_net()
    return net, {name: compensate(net, SHAPE, name, **SETTINGS) for name in RECIPES}


def test_registry_metadata():
    expect = {"rtn": ("none", False), "dfq": ("none", False), "dfmpc": ("synthetic", False),
              "dfmpc-paper": ("none", False), "zeroq": ("synthetic", False), "gdfq": ("synthetic", True),
              "dfmpc-alloc": ("synthetic", False), "dfmpc-weights": ("none", False)}
    assert {n: (r.data_used, r.fine_tuning) for n, r in RECIPES.items()} == expect
    assert all(r.name == n and r.description for n, r in RECIPES.items())
    with pytest.raises(DfmpcError, match="unknown method 'nope'"):
        get_recipe("nope")


def test_every_recipe_records_the_exact_config_that_ran(runs):
    """The record is made from the pass instances that ran: pins win, user settings fill the rest, defaults stay."""
    _, mps = runs
    for name, mp in mps.items():
        recipe = RECIPES[name]
        passes, _ = recipe.configure(SETTINGS)
        assert [p.name for p in mp.config.passes] == [p.name for p in passes], name
        for rec, p in zip(mp.config.passes, passes):
            assert rec.config == p.config(), (name, rec.name)
            json.dumps(rec.config, allow_nan=False)
            json.dumps(rec.info, allow_nan=False)
        for cls, pins in recipe.passes:
            rec = mp.config.record(cls.name)
            assert all(rec.config[k] == v for k, v in pins.items()), (name, cls.name, pins)
    # what the records say is what happened
    assert mps["zeroq"].config.record("recalibrate").config["rounding"] == "nearest"
    assert all(torch.equal(q.codes, mps["rtn"].layers[n].codes) for n, q in mps["zeroq"].layers.items())
    assert not all(torch.equal(q.codes, mps["rtn"].layers[n].codes) for n, q in mps["dfmpc"].layers.items())
    assert mps["dfmpc-paper"].layers["conv1"].c_folded and not mps["dfmpc"].layers["conv1"].c_folded
    assert mps["dfmpc"].config.record("calibrate").config["synth_steps"] == 20


def test_every_recipe_quantizes_and_beats_rtn_where_expected(runs):
    net, mps = runs
    x = example_inputs(128)
    errs = {n: _rel_err(mp.module, net, x) for n, mp in mps.items()}
    assert all(e > 1e-6 for e in errs.values()), f"some recipe returned the FP model: {errs}"
    for n in ("dfq", "zeroq", "dfmpc", "dfmpc-alloc"):
        assert errs[n] < 0.5 * errs["rtn"], f"{n} output error {errs[n]:.4f} not below RTN's {errs['rtn']:.4f}"


def test_same_layers_same_bits_same_code_bytes(runs, tmp_path):
    _, mps = runs
    fixed = {n: mp for n, mp in mps.items() if n != "dfmpc-alloc"}  # the allocation chooses its own widths
    plans = {n: {f: (q.role, q.bits) for f, q in mp.layers.items()} for n, mp in fixed.items()}
    assert all(p == plans["rtn"] for p in plans.values())
    sizes = {n: save_packed(mp, tmp_path / f"{n}.dfmpc") for n, mp in mps.items()}
    for key in ("low_bit_codes", "high_bit_codes"):
        assert len({s[key] for n, s in sizes.items() if n in fixed}) == 1, {n: s[key] for n, s in sizes.items()}
    assert sizes["dfmpc-alloc"]["packed"] <= sizes["rtn"]["packed"]  # same size budget as the fixed pairing


def test_input_model_is_never_modified():
    net = make_tiny_net()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    for name in ("dfq", "dfmpc", "gdfq"):
        compensate(net, SHAPE, name, synth_steps=3, finetune_steps=2)
        assert all(torch.equal(before[k], v) for k, v in net.state_dict().items()), name


def test_single_width_bits_quantizes_every_layer_at_it():
    mp = compensate(make_tiny_net(), SHAPE, "rtn", bits="6")
    assert {q.bits for q in mp.layers.values()} == {6}
    assert mp.layers["conv1"].role == Role.LOW  # still the pair's first layer: it gets the pair's treatment


def test_cli_accepts_method_dfq(capsys, tmp_path):
    out = tmp_path / "o"
    code = main(["build", "resnet20_cifar10_optA", "--weights", "random", "--method", "dfq", "--json", "--quiet",
                 "--out", str(out)])
    stdout, err = capsys.readouterr()
    assert code == 0, err
    rep = json.loads(stdout)
    passes = {p["name"]: p for p in rep["recipe"]["passes"]}
    assert rep["method"] == "dfq" and list(passes) == ["equalize", "quantize", "bias_correct"]
    assert passes["bias_correct"]["info"]["corrected_layers"] > 0
    assert rep["size_bytes"]["packed"] == (out / "model.dfmpc").stat().st_size


def test_cli_rejects_unknown_method(capsys, tmp_path):
    code = main(["build", "resnet20_cifar10_optA", "--weights", "random", "--method", "nope", "--out", str(tmp_path)])
    err = capsys.readouterr().err
    assert code == 2 and "dfq" in err and "nope" in err and "Traceback" not in err
