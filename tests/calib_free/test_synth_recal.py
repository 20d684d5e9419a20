import torch

from calib_free import collect_bn_stats, recalibrate_bn_, synthesize_inputs
from tests.conftest import example_inputs, make_tiny_net


def test_synthesis_reduces_bn_statistics_mismatch():
    net = make_tiny_net()
    res = synthesize_inputs(net, (3, 16, 16), n=16, steps=40, lr=0.1)
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
