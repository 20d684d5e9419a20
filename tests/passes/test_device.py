"""--device: the passes run where asked and hand back a CPU model; the CUDA path agrees with the CPU one."""
import pytest
import torch

from dfmpc_deploy.build import resolve_device
from dfmpc_deploy.errors import DfmpcError
from dfmpc_deploy.passes.recipes import compensate
from tests.conftest import example_inputs, make_tiny_net

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def test_auto_resolves_to_what_is_there_and_cuda_without_a_gpu_is_refused():
    assert resolve_device("cpu").type == "cpu"
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    if not torch.cuda.is_available():
        with pytest.raises(DfmpcError, match="no CUDA device"):
            resolve_device("cuda")


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("recipe", ["dfmpc", "zeroq", "dfmpc-alloc", "dfq"])
def test_cuda_agrees_with_cpu(recipe):
    net = make_tiny_net()
    settings = dict(synth_samples=16, synth_steps=20)
    a = compensate(net, (3, 16, 16), recipe, device="cpu", **settings)
    b = compensate(net, (3, 16, 16), recipe, device="cuda", **settings)
    assert all(p.device.type == "cpu" for p in b.module.parameters())
    assert {n: (q.role, q.bits) for n, q in a.layers.items()} == {n: (q.role, q.bits) for n, q in b.layers.items()}
    agree = sum(int((q.codes == b.layers[n].codes).sum()) for n, q in a.layers.items())
    total = sum(q.numel for q in a.layers.values())
    assert agree / total >= 0.95, f"{agree / total:.3f} of the codes agree"  # synthesis differs in float rounding
    x = example_inputs(64)
    with torch.no_grad():
        ya, yb = a.module(x), b.module(x)
    assert float((ya.argmax(1) == yb.argmax(1)).float().mean()) >= 0.9
