"""The finetune pass (GDFQ) on the tiny net: the generator learns the BN statistics, the student is fine-tuned,
the result packs."""
import pytest
import torch

from dfmpc_deploy.errors import UsageError
from dfmpc_deploy.io.container import load_packed, save_packed
from dfmpc_deploy.passes.finetune import Finetune, Generator, bns_loss
from dfmpc_deploy.passes.recipes import compensate
from tests.conftest import make_tiny_net

SHAPE = (3, 16, 16)


def test_generator_shapes_and_normalised_output():
    g = Generator(10, 16)
    x = g(torch.randn(8, 100), torch.randint(0, 10, (8,)))
    assert x.shape == (8, 3, 16, 16)
    assert abs(float(x.mean())) < 1e-4 and abs(float(x.var(unbiased=False)) - 1) < 1e-2  # non-affine BN output
    assert Generator(10, 30)(torch.randn(4, 100), torch.randint(0, 10, (4,))).shape == (4, 3, 30, 30)


def test_generator_training_lowers_the_bn_statistics_loss():
    torch.manual_seed(0)
    teacher = make_tiny_net()
    for p in teacher.parameters():
        p.requires_grad_(False)
    g = Generator(10, 16)
    opt = torch.optim.Adam(g.parameters(), lr=1e-2, betas=(0.5, 0.999))
    take, remove = bns_loss(teacher)
    losses = []
    for _ in range(60):
        teacher(g(torch.randn(32, 100), torch.randint(0, 10, (32,))))
        loss = take()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss))
    remove()
    assert sum(losses[-5:]) / 5 < 0.5 * sum(losses[:5]) / 5, losses[::10]
    assert not any(h for m in teacher.modules() for h in m._forward_hooks.values())  # hooks removed


def test_zero_steps_is_round_to_nearest():
    net = make_tiny_net()
    mp = compensate(net, SHAPE, "gdfq", finetune_steps=0)
    rtn = compensate(net, SHAPE, "rtn")
    for n, q in mp.layers.items():
        assert torch.equal(q.codes, rtn.layers[n].codes) and torch.equal(q.scale, rtn.layers[n].scale)


def test_fine_tuning_moves_the_weights_and_the_result_packs(tmp_path):
    net = make_tiny_net()
    mp = compensate(net, SHAPE, "gdfq", finetune_steps=12)
    rtn = compensate(net, SHAPE, "rtn")
    assert {n: (q.role, q.bits) for n, q in mp.layers.items()} == {n: (q.role, q.bits) for n, q in rtn.layers.items()}
    moved = sum(not torch.equal(q.scale, rtn.layers[n].scale) for n, q in mp.layers.items())
    assert moved >= 1, "fine-tuning did not change any layer"
    info = mp.config.record("finetune").info
    assert info["student_steps"] == 9 and info["steps"] == 12  # 3 generator warm-up steps
    assert "no data" in mp.estimator
    save_packed(mp, tmp_path / "g.dfmpc")
    back = load_packed(tmp_path / "g.dfmpc", model=make_tiny_net())
    x = torch.randn(4, *SHAPE)
    with torch.no_grad():
        assert torch.equal(back.module(x), mp.module(x))
    assert torch.equal(make_tiny_net().conv1.weight, net.conv1.weight)  # the FP model is untouched


def test_config_is_validated():
    with pytest.raises(UsageError, match="batch"):
        Finetune(batch=1)
    with pytest.raises(UsageError, match="lr_s"):
        Finetune(lr_s=float("nan"))
