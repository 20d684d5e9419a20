import torch

from calib_free import SynthBudget, collect_bn_stats, recalibrate_bn_, synthesize_inputs
from tests.conftest import example_inputs, make_tiny_net


def test_synthesis_reduces_bn_statistics_mismatch():
    net = make_tiny_net()
    res = synthesize_inputs(net, (3, 16, 16), n=16, steps=40, lr=0.1, patience=0)
    assert res.inputs.shape == (16, 3, 16, 16)
    assert res.final_loss < 0.5 * res.initial_loss, (res.initial_loss, res.final_loss)
    assert not any(p.grad is not None for p in net.parameters())


def test_recalibration_sets_exact_batch_statistics():
    net = make_tiny_net()
    x = example_inputs(32)
    recalibrate_bn_(net, x, ["bn0"])
    with torch.no_grad():
        z = net.stem(x)
    st = collect_bn_stats(net)["bn0"]
    assert torch.allclose(st.mean.float(), z.mean(dim=(0, 2, 3)), atol=1e-5)
    assert torch.allclose(st.var.float(), z.var(dim=(0, 2, 3), unbiased=True), rtol=1e-4)
    assert not net.training and not net.bn0.training


def test_synthesis_stops_when_the_loss_stops_improving():
    net = make_tiny_net()
    res = synthesize_inputs(net, (3, 16, 16), n=8, steps=200, lr=0.0, patience=5)  # lr 0: the loss cannot move
    assert res.stopped_early and res.steps == 50 and res.steps_max == 200  # not before a quarter of the steps
    assert res.final_loss == res.initial_loss
    full = synthesize_inputs(net, (3, 16, 16), n=8, steps=30, lr=0.1, patience=0)
    assert not full.stopped_early and full.steps == 30 and full.final_loss <= full.initial_loss


def test_budget_follows_the_input_size():
    from calib_free import synth_budget
    assert synth_budget((3, 32, 32)) == SynthBudget(32, 100)
    assert synth_budget((3, 224, 224)) == SynthBudget(8, 40, coarse=0.7)


def test_a_model_without_statistics_is_refused():
    import pytest
    from torch import nn
    with pytest.raises(ValueError, match="no BatchNorm2d"):
        synthesize_inputs(nn.Sequential(nn.Conv2d(3, 4, 3)), (3, 8, 8), n=2, steps=1)


def _fixed_head_net():
    """conv-BN-ReLU twice, then a head that only fits the full 16x16 size (Flatten + Linear), as VGG's or
    pytorchcv ResNets' fixed 7x7 pooling do at 224 px."""
    import torch
    from torch import nn
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                        nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                        nn.Flatten(), nn.Linear(4 * 16 * 16, 3))
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
    return net.eval()


def test_coarse_to_fine_runs_the_first_steps_at_half_size_even_with_a_fixed_size_head():
    net = _fixed_head_net()
    res = synthesize_inputs(net, (3, 16, 16), n=4, steps=20, lr=0.1, patience=0, coarse=0.7)
    assert res.coarse_steps == 14 and res.steps == 20 and res.inputs.shape == (4, 3, 16, 16)
    assert res.final_loss <= res.initial_loss  # the full-size phase improves on the upsampled coarse result
    plain = synthesize_inputs(net, (3, 16, 16), n=4, steps=20, lr=0.1, patience=0)
    assert plain.coarse_steps == 0 and plain.steps == 20


def test_a_model_that_cannot_run_at_half_size_synthesises_at_full_size():
    import torch
    from torch import nn
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 10), nn.BatchNorm2d(4), nn.ReLU()).eval()  # 10x10 kernel: 8 px is too small
    net[1].running_var.fill_(2.0)
    res = synthesize_inputs(net, (3, 16, 16), n=2, steps=6, lr=0.1, patience=0, coarse=0.5)
    assert res.coarse_steps == 0 and res.steps == 6 and res.inputs.shape == (2, 3, 16, 16)


def test_bn_matching_loss_is_the_loss_synthesis_reports():
    import pytest

    from calib_free.synth import bn_matching_loss
    net = make_tiny_net()
    res = synthesize_inputs(net, (3, 16, 16), n=8, steps=10, lr=0.1, patience=0)
    assert bn_matching_loss(net, res.inputs) == pytest.approx(res.final_loss, rel=1e-4)
