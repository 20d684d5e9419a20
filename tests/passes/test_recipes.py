"""The method registry (methods.py) and DFQ (dfq.py) on the tiny net: metadata, exactness of CLE, numerics vs RTN."""
import json
import subprocess
import sys

import pytest
import torch

from dfmpc_deploy.cli import main
from dfmpc_deploy.core.config import QuantConfig
from dfmpc_deploy.io.container import save_packed
from dfmpc_deploy.passes.dfq import cross_layer_equalize, dfq
from dfmpc_deploy.passes.recipes import METHODS, method_config, run_method
from tests.conftest import example_inputs, make_tiny_net

SHAPE = (3, 16, 16)
CFG = QuantConfig(synth_samples=16, synth_steps=20, finetune_steps=8)  # small synthesis budget: the tests check properties, not accuracy


def _rel_err(model, ref, x):
    with torch.no_grad():
        y, r = model(x), ref(x)
    return float(((y - r) ** 2).mean() / (r ** 2).mean())


@pytest.fixture(scope="module")
def runs():
    net = make_tiny_net()
    return net, {name: run_method(name, net, CFG, SHAPE) for name in METHODS}


def test_registry_metadata():
    expect = {"rtn": ("none", False), "dfq": ("none", False), "dfmpc": ("synthetic", False),
              "dfmpc-paper": ("none", False), "zeroq": ("synthetic", False), "gdfq": ("synthetic", True),
              "dfmpc-alloc": ("synthetic", False)}
    assert {n: (s.data_used, s.fine_tuning) for n, s in METHODS.items()} == expect
    assert all(s.name == n and s.description for n, s in METHODS.items())


def test_method_configs():
    assert method_config("dfmpc", CFG) == CFG  # the build's default behaviour is unchanged
    rtn = method_config("rtn", CFG)
    assert (rtn.compensation, rtn.recal, rtn.rounding) == (False, "none", "nearest")
    paper = method_config("dfmpc-paper", CFG)
    assert (paper.compensation, paper.c_mode, paper.recal, paper.rounding) == (True, "paper", "none", "nearest")
    zq = method_config("zeroq", CFG)
    assert (zq.compensation, zq.recal, zq.recal_scope, zq.rounding) == (False, "synthetic", "all", "nearest")
    assert all(method_config(n, CFG).bits == CFG.bits for n in METHODS)


def test_every_method_quantizes_and_beats_rtn_where_expected(runs):
    net, mps = runs
    x = example_inputs(128)
    errs = {n: _rel_err(mp.module, net, x) for n, mp in mps.items()}
    assert all(e > 1e-6 for e in errs.values()), f"some method returned the FP model: {errs}"
    for n in ("dfq", "zeroq", "dfmpc", "dfmpc-alloc"):
        assert errs[n] < 0.5 * errs["rtn"], f"{n} output error {errs[n]:.4f} not below RTN's {errs['rtn']:.4f}"


def test_same_layers_same_bits_same_code_bytes(runs, tmp_path):
    _, mps = runs
    fixed = {n: mp for n, mp in mps.items() if n != "dfmpc-alloc"}  # the allocation chooses its own widths
    plans = {n: {f: (q.role, q.bits) for f, q in mp.layers.items()} for n, mp in fixed.items()}
    assert all(p == plans["rtn"] for p in plans.values())
    sizes = {n: save_packed(mp, tmp_path / f"{n}.dfpk") for n, mp in mps.items()}
    for key in ("low_bit_codes", "high_bit_codes"):
        assert len({s[key] for n, s in sizes.items() if n in fixed}) == 1, {n: s[key] for n, s in sizes.items()}
    assert sizes["dfmpc-alloc"]["packed"] <= sizes["rtn"]["packed"]  # same size budget as the fixed pairing


def test_cle_is_exact_and_equalises_ranges():
    net = make_tiny_net()
    eq, pre = cross_layer_equalize(net)
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
    for equalize in (False, True):
        off = dfq(net, CFG, SHAPE, equalize=equalize, bias_correction=False)
        on = dfq(net, CFG, SHAPE, equalize=equalize, bias_correction=True)
        assert on.info["bias_corrected_layers"] == 2
        e_off = float((_bn2_mean(off.module, x) - ref).abs().mean())
        e_on = float((_bn2_mean(on.module, x) - ref).abs().mean())
        assert e_on < 0.75 * e_off, f"equalize={equalize}: bias correction mean error {e_on:.4f} vs {e_off:.4f}"


def test_dfq_leaves_input_model_alone():
    net = make_tiny_net()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    dfq(net, CFG, SHAPE)
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())


def test_cli_accepts_method_dfq(capsys, tmp_path):
    out = tmp_path / "o"
    code = main(["build", "resnet20_cifar10_optA", "--weights", "random", "--method", "dfq", "--json", "--quiet",
                 "--out", str(out)])
    stdout, err = capsys.readouterr()
    assert code == 0, err
    rep = json.loads(stdout)
    assert rep["method"] == "dfq" and rep["config"]["recal"] == "none"
    assert rep["diagnostics"]["bias_corrected_layers"] > 0
    assert rep["size_bytes"]["packed"] == (out / "model.dfmpc").stat().st_size


def test_cli_rejects_unknown_method(capsys, tmp_path):
    with pytest.raises(SystemExit) as e:
        main(["build", "resnet20_cifar10_optA", "--weights", "random", "--method", "nope", "--out", str(tmp_path)])
    assert e.value.code == 2 and "dfq" in capsys.readouterr().err


def test_registry_import_is_torch_free():
    code = "import sys, dfmpc_deploy.passes.recipes, dfmpc_deploy.cli; print('torch' in sys.modules)"
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert res.stdout.strip() == "False"
