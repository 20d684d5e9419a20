"""Bit allocation (allocate.py): the knapsack is exact and never over budget; sensitivities and budgets behave."""
import itertools
import random

import pytest
import torch

from dfmpc_deploy.core.graph import GraphAnalysis, Role
from dfmpc_deploy.errors import DfmpcError, UsageError
from dfmpc_deploy.io.container import code_nbytes, load_packed, packed_nbytes, save_packed
from dfmpc_deploy.passes.allocate import Allocate, choose_bits, fit_budget, layer_sensitivity
from dfmpc_deploy.passes.finetune import Finetune
from dfmpc_deploy.passes.recipes import compensate
from tests.conftest import example_inputs, make_tiny_net

SHAPE = (3, 16, 16)
CFG = dict(synth_samples=16, synth_steps=20)


def _brute(scores, sizes, budget):
    names = list(scores)
    best = None
    for combo in itertools.product(*[sorted(scores[n]) for n in names]):
        if sum(sizes[n][b] for n, b in zip(names, combo)) <= budget:
            loss = sum(scores[n][b] for n, b in zip(names, combo))
            best = loss if best is None else min(best, loss)
    return best


@pytest.mark.parametrize("seed", range(25))
def test_choose_bits_is_the_exact_optimum_within_budget(seed):
    rng = random.Random(seed)
    names = [f"l{i}" for i in range(rng.randint(1, 5))]
    sizes = {n: {b: rng.randint(1, 40) * b for b in (2, 3, 4, 6)} for n in names}
    scores = {n: {b: rng.random() / b for b in (2, 3, 4, 6)} for n in names}
    lo, hi = sum(min(s.values()) for s in sizes.values()), sum(max(s.values()) for s in sizes.values())
    budget = rng.randint(lo, hi)
    bits, loss = choose_bits(scores, sizes, budget, resolution=100_000)  # unit 1 byte: exact
    assert sum(sizes[n][b] for n, b in bits.items()) <= budget
    assert loss == pytest.approx(sum(scores[n][b] for n, b in bits.items()))
    assert loss == pytest.approx(_brute(scores, sizes, budget))


def test_coarse_resolution_still_fits():
    scores = {f"l{i}": {2: 1.0 / (i + 1), 6: 0.0} for i in range(50)}
    sizes = {f"l{i}": {2: 1001 + i, 6: 3003 + 3 * i} for i in range(50)}
    for budget in (60_000, 100_000, 150_000):
        bits, _ = choose_bits(scores, sizes, budget, resolution=64)
        assert sum(sizes[n][b] for n, b in bits.items()) <= budget


def test_infeasible_budget_names_the_floor():
    with pytest.raises(DfmpcError, match="needs 30"):
        choose_bits({"a": {2: 1.0, 6: 0.0}, "b": {2: 1.0, 6: 0.0}}, {"a": {2: 10, 6: 30}, "b": {2: 20, 6: 60}}, 29)


def test_fit_budget_corrects_for_the_measured_overhead():
    scores = {f"l{i}": {2: 1.0, 4: 0.5, 6: 0.0} for i in range(4)}
    sizes = {f"l{i}": {2: 100, 4: 200, 6: 300} for i in range(4)}
    measure = lambda bits: 150 + sum(sizes[n][b] for n, b in bits.items())  # noqa: E731 - real overhead 150
    alloc = fit_budget(scores, sizes, 1000, measure, overhead=0)  # first guess 0 is wrong; must still fit
    assert measure(alloc.bits) <= 1000
    assert alloc.code_bytes == sum(sizes[n][b] for n, b in alloc.bits.items())


def test_sensitivity_ranks_fewer_bits_as_worse():
    net = make_tiny_net()
    x = example_inputs(32)
    names = [n for n, m in net.named_modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]
    s = layer_sensitivity(net, names, x, [2, 3, 4, 6], 6, GraphAnalysis.of(net).bn_after)
    assert set(s) == set(names)
    for n in names:
        assert s[n][2] > s[n][4] > 0, f"{n}: {s[n]}"
        assert s[n][6] == pytest.approx(s[names[0]][6])  # every layer at the context width: the same network
    assert torch.equal(make_tiny_net().stem.weight, net.stem.weight)  # the FP model is untouched


def test_bn_after_finds_the_direct_batchnorms():
    assert GraphAnalysis.of(make_tiny_net()).bn_after == {"stem": "bn0", "conv1": "bn1", "conv2": "bn2"}


def test_size_budget_is_met_and_more_budget_buys_more_bits(tmp_path):
    net = make_tiny_net()
    fixed = packed_nbytes(compensate(net, SHAPE, **CFG))
    results = {}
    for frac in (0.9, 1.0, 1.2):
        budget = int(fixed * frac)
        mp = compensate(net, SHAPE, size_budget_bytes=budget, **CFG)
        info = save_packed(mp, tmp_path / f"m{frac}.dfmpc")
        assert info["packed"] <= budget, (frac, info["packed"], budget)
        assert (tmp_path / f"m{frac}.dfmpc").stat().st_size == info["packed"]
        back = load_packed(tmp_path / f"m{frac}.dfmpc", model=make_tiny_net())
        assert {n: q.bits for n, q in back.layers.items()} == {n: q.bits for n, q in mp.layers.items()}
        assert all(q.role == Role.LOW for q in mp.layers.values() if q.bits < 6)
        results[frac] = sum(q.bits * q.numel for q in mp.layers.values())
    assert results[0.9] <= results[1.0] <= results[1.2]
    assert results[0.9] < results[1.2]


def test_avg_bits_budget_bounds_the_code_bits():
    net = make_tiny_net()
    for avg in (2.5, 4.0):
        mp = compensate(net, SHAPE, avg_bits=avg, **CFG)
        numel = sum(q.numel for q in mp.layers.values())
        code = sum(code_nbytes(q.bits, q.numel) for q in mp.layers.values())
        assert 8 * code / numel <= avg
        assert mp.config.record("allocate").info["avg_code_bits"] <= avg


def test_dfmpc_alloc_defaults_to_the_fixed_pairing_size():
    net = make_tiny_net()
    fixed = packed_nbytes(compensate(net, SHAPE, "dfmpc", **CFG))  # the same pipeline with the fixed pairs
    mp = compensate(net, SHAPE, "dfmpc-alloc", **CFG)
    assert packed_nbytes(mp) <= fixed
    assert mp.config.record("allocate").info["budget_bytes"] == fixed


def test_budget_too_small_is_one_clear_error():
    with pytest.raises(DfmpcError, match="raise the budget"):
        compensate(make_tiny_net(), SHAPE, size_budget_bytes=100, **CFG)


@pytest.mark.parametrize("cls, kw, msg", [(Allocate, {"size_budget_bytes": 10, "avg_bits": 3.0}, "not both"),
                                          (Allocate, {"avg_bits": 1.0}, "avg-bits"),
                                          (Allocate, {"avg_bits": float("nan")}, "avg-bits"),
                                          (Allocate, {"size_budget_bytes": 0}, "size-budget"),
                                          (Finetune, {"finetune_steps": -1}, "finetune-steps")])
def test_budget_flags_are_validated(cls, kw, msg):
    with pytest.raises(UsageError, match=msg):
        cls(**kw)


def test_allocation_needs_calibration_inputs():
    with pytest.raises(UsageError, match="calibration inputs"):
        compensate(make_tiny_net(), SHAPE, recal="none", rounding="nearest", avg_bits=3.0, bits="2/6")
