import pytest
import torch

from dfmpc_deploy.errors import DfmpcError
from dfmpc_deploy.zoo.models import get_spec, load_model, load_state_dict_file, model_names
from tests.conftest import R20_WEIGHTS, needs_shared


def test_named_models_include_the_required_ones():
    names = set(model_names())
    for n in ["resnet18", "resnet50", "resnet101", "resnet20_cifar10", "resnet56_cifar10", "vgg16", "densenet121",
              "mobilenetv2_w1"] + [f"resnet{d}_cifar10_optA" for d in (20, 32, 44, 56, 110)]:
        assert n in names


def test_unknown_model_suggests_close_names():
    with pytest.raises(DfmpcError, match="resnet56_cifar10"):
        get_spec("resnet56")


def test_random_weights_are_seeded():
    a = load_model("resnet20_cifar10_optA", "random", seed=3).module.state_dict()
    b = load_model("resnet20_cifar10_optA", "random", seed=3).module.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


@needs_shared
def test_real_weights_module_prefix_and_safetensors(tmp_path):
    sd = load_state_dict_file(R20_WEIGHTS)
    assert not any(k.startswith("module.") for k in sd)
    from safetensors.torch import save_file
    f = tmp_path / "r20.safetensors"
    save_file({"module." + k: v.contiguous() for k, v in sd.items()}, str(f))
    m1 = load_model("resnet20_cifar10_optA", str(R20_WEIGHTS)).module
    m2 = load_model("resnet20_cifar10_optA", str(f)).module
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(m1(x), m2(x))


class Arbitrary:
    """A class the safe unpickler does not allow (it could run code when unpickled)."""


def test_pickle_with_objects_needs_unsafe_flag(tmp_path):
    f = tmp_path / "ckpt.pth"
    sd = load_model("resnet20_cifar10_optA", "random").module.state_dict()
    torch.save({"state_dict": sd, "extra": Arbitrary()}, f)
    with pytest.raises(DfmpcError, match="--unsafe-pickle"):
        load_state_dict_file(f)
    assert set(load_state_dict_file(f, unsafe_pickle=True)) == set(sd)


def test_mismatched_weights_name_the_keys(tmp_path):
    f = tmp_path / "r56.pth"
    torch.save(load_model("resnet56_cifar10_optA", "random").module.state_dict(), f)
    with pytest.raises(DfmpcError, match=r"do not fit the architecture: .*unexpected \(e\.g\. layer1\.3"):
        load_model("resnet20_cifar10_optA", str(f))
