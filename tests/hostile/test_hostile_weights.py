"""Hostile weights: non-finite or degenerate values, non-float dtypes, pickles that run code, broken files.
Every case: a one-line DfmpcError naming the tensor (or file) and what is wrong, before any pass runs."""
import os
import pickle

import pytest
import torch
from torch import nn

from dfmpc_deploy.core.validate import MAX_SQUARED_NORM, check_weights
from dfmpc_deploy.errors import DfmpcError
from dfmpc_deploy.zoo.models import load_model, load_state_dict_file
from tests.conftest import make_tiny_net
from tests.hostile.conftest import one_line

pytestmark = pytest.mark.usefixtures("deadline")

MODEL = "resnet20_cifar10_optA"


def _set(net: nn.Module, name: str, index, value) -> None:
    t = dict(net.named_parameters(), **dict(net.named_buffers()))[name]
    with torch.no_grad():
        t[index] = value


@pytest.mark.parametrize("name, index, value, expect", [
    ("conv1.weight", (3, 2, 1, 0), float("nan"),
     r"'conv1.weight' \[16, 8, 3, 3\] holds 1 NaN and 0 infinite value\(s\) \(first at index \[3, 2, 1, 0\]\)"),
    ("conv2.weight", (0, 0, 0, 0), float("inf"), r"'conv2.weight' .* 0 NaN and 1 infinite"),
    ("fc.bias", 4, float("-inf"), r"'fc.bias' .* 1 infinite"),
    ("bn1.running_var", 5, float("nan"), r"'bn1.running_var' .* 1 NaN"),
    ("bn2.running_mean", 0, float("inf"), r"'bn2.running_mean'"),
    ("bn1.running_var", 7, -0.5, r"'bn1.running_var' holds 1 negative variance\(s\) \(first -0.5 at channel 7\)"),
    ("conv1.weight", (0, 0, 0, 0), 3e38, r"'conv1.weight' .* values up to 3e\+38: its squared norm .* exceeds"),
    ("stem.weight", (0, 0, 0, 0), 1e18, r"'stem.weight' .* values up to 1e\+18"),
])
def test_check_weights_names_the_first_bad_tensor(name, index, value, expect):
    net = make_tiny_net()
    check_weights(net)  # the healthy net passes
    _set(net, name, index, value)
    with pytest.raises(DfmpcError, match=expect) as e:
        check_weights(net)
    one_line(e)


def test_first_bad_tensor_in_module_order_is_named():
    net = make_tiny_net()
    _set(net, "fc.weight", (0, 0), float("nan"))
    _set(net, "bn0.running_var", 0, float("nan"))
    with pytest.raises(DfmpcError, match="'bn0.running_var'"):
        check_weights(net)


def test_bound_admits_large_but_trained_like_values():
    net = make_tiny_net()
    _set(net, "conv1.weight", (0, 0, 0, 0), 1e6)
    _set(net, "bn1.running_var", 0, 1e8)
    check_weights(net)
    assert MAX_SQUARED_NORM > 1e32


@pytest.mark.parametrize("eps", [0.0, -1e-5, float("nan")])
def test_bn_eps_must_be_positive(eps):
    net = make_tiny_net()
    net.bn2.eps = eps
    with pytest.raises(DfmpcError, match=r"BatchNorm 'bn2' has eps=.*positive finite"):
        check_weights(net)


def test_complex_buffer_is_refused():
    net = make_tiny_net()
    net.register_buffer("phase", torch.zeros(3, dtype=torch.complex64))
    with pytest.raises(DfmpcError, match="'phase' is complex"):
        check_weights(net)


def _saved(tmp_path, mutate, name="w.pth"):
    sd = load_model(MODEL, "random").module.state_dict()
    mutate(sd)
    f = tmp_path / name
    torch.save(sd, f)
    return f


@pytest.mark.parametrize("key, value, expect", [
    ("layer1.0.conv1.weight", float("nan"), r"'layer1.0.conv1.weight' .* 1 NaN"),
    ("layer2.1.bn2.running_var", -1.0, r"'layer2.1.bn2.running_var' holds .* negative"),
    ("linear.weight", 3e38, r"'linear.weight' .* values up to 3e\+38"),
])
def test_load_model_refuses_bad_weight_files(tmp_path, key, value, expect):
    def mutate(sd):
        sd[key].view(-1)[0] = value
    f = _saved(tmp_path, mutate)
    with pytest.raises(DfmpcError, match=expect) as e:
        load_model(MODEL, str(f))
    one_line(e)


def test_float64_values_beyond_float32_become_a_named_error(tmp_path):
    def mutate(sd):
        sd["conv1.weight"] = sd["conv1.weight"].double()
        sd["conv1.weight"][0, 0, 0, 0] = 1e39
    with pytest.raises(DfmpcError, match="'conv1.weight' .* infinite"):
        load_model(MODEL, str(_saved(tmp_path, mutate)))


@pytest.mark.parametrize("dtype", [torch.bool, torch.int32, torch.uint8, torch.complex64])
def test_non_float_safetensors_are_refused_not_cast(tmp_path, dtype):
    st = pytest.importorskip("safetensors.torch")
    sd = load_model(MODEL, "random").module.state_dict()
    sd["layer1.0.conv2.weight"] = torch.ones(sd["layer1.0.conv2.weight"].shape, dtype=dtype)
    f = tmp_path / "w.safetensors"
    st.save_file({k: v.contiguous() for k, v in sd.items()}, str(f))
    name = str(dtype).replace("torch.", "")
    with pytest.raises(DfmpcError, match=rf"tensor 'layer1.0.conv2.weight' is {name} where the model holds floats"):
        load_model(MODEL, str(f))


class _System:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return os.system, (f"touch {self.path}",)


@pytest.mark.parametrize("container, expect", [("torch.save", "--unsafe-pickle"),
                                               ("pickle", "not a readable torch checkpoint")])
def test_weights_pickle_that_runs_code_is_refused(tmp_path, container, expect):
    marker = tmp_path / "pwned"
    f = tmp_path / "evil.pth"
    obj = {"conv1.weight": _System(marker)}
    if container == "torch.save":
        torch.save(obj, f)
    else:
        f.write_bytes(pickle.dumps(obj))
    with pytest.raises(DfmpcError, match=expect) as e:
        load_model(MODEL, str(f))
    one_line(e)
    assert not marker.exists()


@pytest.mark.parametrize("content", [b"", b"garbage", "truncated", "int_keys", "nested", "empty_dict"])
def test_broken_weight_files_areone_line(tmp_path, content):
    f = tmp_path / "w.pth"
    if content == "truncated":
        torch.save(load_model(MODEL, "random").module.state_dict(), f)
        f.write_bytes(f.read_bytes()[:5000])
    elif content == "int_keys":
        torch.save({0: torch.zeros(1)}, f)
    elif content == "nested":
        torch.save({"a": {"b": torch.zeros(1)}}, f)
    elif content == "empty_dict":
        torch.save({}, f)
    else:
        f.write_bytes(content)
    with pytest.raises(DfmpcError, match="w.pth") as e:
        load_model(MODEL, str(f))
    one_line(e)


def test_weights_fifo_does_not_hang(tmp_path):
    os.mkfifo(tmp_path / "w.pth")
    with pytest.raises(DfmpcError, match="not a regular file"):
        load_state_dict_file(tmp_path / "w.pth")


def test_cli_nan_weights_exit_1_before_any_pass(tmp_path, capsys):
    from dfmpc_deploy.cli import main

    def mutate(sd):
        sd["layer3.2.bn2.running_var"][3] = float("nan")
    f = _saved(tmp_path, mutate)
    for method in ("dfmpc", "rtn", "dfq"):
        code = main(["build", MODEL, "--weights", str(f), "--method", method, "--out", str(tmp_path / "o"), "--quiet"])
        err = capsys.readouterr().err
        assert code == 1 and "Traceback" not in err and "'layer3.2.bn2.running_var'" in err, (method, err)
        assert not (tmp_path / "o").exists()
