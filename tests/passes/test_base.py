"""passes/base.py: recipes configure passes from the user's settings; overrides are derived, settings validated."""
import dataclasses

import pytest
import torch

from dfmpc_deploy.build import BuildConfig
from dfmpc_deploy.core.options import flag_of, options_of
from dfmpc_deploy.errors import DfmpcError, UsageError
from dfmpc_deploy.passes.base import PASS_CLASSES, Recipe, run_recipe, validate_settings
from dfmpc_deploy.passes.recipes import RECIPES, compensate
from tests.conftest import make_tiny_net
from tests.passes.test_calibrate import SHAPE, _folded


def test_a_field_shared_by_passes_declares_one_flag_and_one_default():
    seen: dict[str, tuple] = {}
    for cls in PASS_CLASSES:
        for f in dataclasses.fields(cls):
            spec = (flag_of(f), f.default)
            assert seen.setdefault(f.name, spec) == spec, f"{cls.__name__}.{f.name} disagrees with another pass"


def test_flags_are_unique_and_build_fields_do_not_collide_with_pass_fields():
    flags = [flag_of(f) for cls in PASS_CLASSES for f in options_of(cls)]
    names = {f.name for cls in PASS_CLASSES for f in dataclasses.fields(cls)}
    build = {f.name for f in dataclasses.fields(BuildConfig)}
    assert not names & build, names & build
    by_flag: dict[str, set] = {}
    for cls in PASS_CLASSES:
        for f in options_of(cls):
            by_flag.setdefault(flag_of(f), set()).add(f.name)
    assert all(len(v) == 1 for v in by_flag.values()), by_flag
    assert len(set(flags)) == len(by_flag)
    assert not set(by_flag) & {flag_of(f) for f in options_of(BuildConfig)}


def test_overrides_are_derived_from_the_pass_fields():
    zeroq, rtn, paper = RECIPES["zeroq"], RECIPES["rtn"], RECIPES["dfmpc-paper"]
    _, msgs = zeroq.configure({"rounding": "gptq", "recal_scope": "all", "finetune_steps": 3})
    assert msgs == ["--finetune-steps is not used by zeroq", "--rounding gptq is replaced by zeroq's nearest"]
    _, msgs = rtn.configure({"avg_bits": 3.0})
    assert msgs == ["--avg-bits is not used by rtn"]
    _, msgs = paper.configure({"c_mode": "off", "lambda1": 0.3})
    assert msgs == ["--c-mode off is replaced by dfmpc-paper's paper"]
    passes, msgs = RECIPES["dfmpc"].configure({})
    assert msgs == [] and [p.name for p in passes] == ["equalize_rows", "quantize", "calibrate", "allocate",
                                                       "recalibrate", "solve_c"]


def test_a_recipe_that_ignores_a_budget_really_ignores_it():
    """The old registry warned '--avg-bits is not used by dfq' and then failed in the allocation: no more."""
    mp = compensate(make_tiny_net(), (3, 16, 16), "dfq", avg_bits=3.0)
    assert [p.name for p in mp.config.passes] == ["equalize", "quantize", "bias_correct"]
    assert mp.config.overrides == ("--avg-bits is not used by dfq",)


@pytest.mark.parametrize("settings, msg", [({"lambda1": float("nan")}, "lambda1"), ({"lambda2": -1.0}, "lambda2"),
                                           ({"recal": "maybe"}, "--recal"), ({"bits": "9/2"}, "--bits"),
                                           ({"synth_steps": -1}, "synth-steps"), ({"no_such": 1}, "unknown setting"),
                                           ({"c_mode": "folded"}, "c-mode")])
def test_bad_settings_are_refused_whatever_the_recipe(settings, msg):
    with pytest.raises(UsageError, match=msg):
        validate_settings(settings)
    with pytest.raises(UsageError, match=msg):
        compensate(make_tiny_net(), (3, 16, 16), "rtn", **settings)


def test_pins_must_name_fields():
    from dfmpc_deploy.passes.quantize import Quantize
    with pytest.raises(ValueError, match="no field"):
        Recipe("x", "x", "none", False, ((Quantize, {"nope": 1}),))


def test_result_lives_on_the_cpu_and_the_passes_leave_the_caller_model_alone():
    net = make_tiny_net()
    mp = compensate(net, (3, 16, 16), synth_steps=3, device="cpu")
    assert all(p.device.type == "cpu" for p in mp.module.parameters())
    assert mp.graph is not None and [(p.low, p.high) for p in mp.graph.pairs] == [("conv1", "conv2")]
    assert not any(m.training for m in net.modules()) and torch.is_grad_enabled() is not False


def test_a_fallback_recipe_is_found_in_the_registry_and_an_unknown_one_is_one_line():
    """base does not import recipes (tests/test_imports.py): the fallback comes from what recipes.py registered."""
    net = _folded(make_tiny_net())
    fallback = dataclasses.replace(RECIPES["rtn"], name="mine", without_statistics="dfmpc-paper")
    assert run_recipe(fallback, net, SHAPE).config.recipe == "dfmpc-paper"  # registered by passes/recipes.py
    missing = dataclasses.replace(fallback, without_statistics="no-such-recipe")
    with pytest.raises(DfmpcError, match="'no-such-recipe', is not a registered recipe"):
        run_recipe(missing, net, SHAPE)
    assert run_recipe(missing, make_tiny_net(), SHAPE).config.recipe == "mine"  # real statistics: no fallback
