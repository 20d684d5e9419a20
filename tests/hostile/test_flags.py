"""Hostile and careless flag values (issue 12, class 7): one line naming the value, exit 2 (usage) or 1, no
traceback, nothing created, and never a NaN in a report."""
import pytest

from dfmpc_deploy.cli import main

BASE = ("build", "resnet20_cifar10_optA", "--weights", "random")


def _run(capsys, tmp_path, *flags):
    code = main([*BASE, *flags, "--out", str(tmp_path / "o")])
    _, err = capsys.readouterr()
    assert "Traceback" not in err
    assert not (tmp_path / "o").exists() and [p.name for p in tmp_path.iterdir()] == []
    return code, err


@pytest.mark.parametrize("flags, needle", [
    (("--seed", str(2 ** 70)), "--seed"), (("--seed", "-1"), "--seed"), (("--seed", "1e3"), "--seed"),
    (("--mean", "nan,nan,nan"), "--mean"), (("--mean", "0.4,0.4"), "--mean"), (("--mean", "inf,0,0"), "--mean"),
    (("--std", "0,0,0"), "--std"), (("--std", "-1,1,1"), "--std"),
    (("--lambda1", "nan"), "--lambda1"), (("--lambda2", "inf"), "--lambda2"), (("--lambda1", "-0.5"), "lambda1"),
    (("--synth-samples", "0"), "--synth-samples"), (("--synth-steps", "-3"), "--synth-steps"),
    (("--batch-sizes", "0"), "batch-sizes"), (("--batch-sizes", "1,,32"), "batch-sizes"),
    (("--batch-sizes", "x"), "batch-sizes"), (("--threads", "0"), "--threads"), (("--limit", "0"), "--limit"),
    (("--size-budget-mb", "nan"), "--size-budget-mb"), (("--avg-bits", "inf"), "--avg-bits"),
    (("--avg-bits", "1.0"), "avg-bits"), (("--target", "onnx,tflite"), "tflite"), (("--target", "gpu"), "gpu"),
    (("--bits", "2/6/8"), "--bits"), (("--bits", "9"), "--bits"), (("--bits", "1" * 400), "--bits"),
    (("--device", "tpu"), "--device"), (("--method", "magic"), "magic"), (("--c-mode", "on"), "--c-mode"),
    (("--weights-format", "tflite"), "--weights-format"), (("--data", "imgs/"), "--data"),
    (("--finetune-steps", "-1"), "--finetune-steps"), (("--recal", "maybe"), "--recal"),
])
def test_bad_flag_values_are_usage_errors(capsys, tmp_path, flags, needle):
    code, err = _run(capsys, tmp_path, *flags)
    assert code == 2, err
    assert needle in err, err


def test_cuda_device_without_a_gpu_is_one_line(capsys, tmp_path):
    import torch
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    code, err = _run(capsys, tmp_path, "--device", "cuda")
    assert code == 1 and err.strip().splitlines() == [
        "error: --device cuda: no CUDA device is available (torch.cuda.is_available() is False); use --device cpu "
        "or auto"]


def test_values_that_look_odd_but_are_valid_are_accepted():
    """Zero synthesis steps (the config allows it), comma lists, a single width: accepted at parse time."""
    from dfmpc_deploy.build import BuildConfig
    from dfmpc_deploy.passes.base import validate_settings

    validate_settings({"synth_steps": 0, "bits": "6", "lambda1": 0.0})
    cfg = BuildConfig(model="resnet20_cifar10_optA", targets=("onnx,ort",), batch_sizes=("1,32", "8"))
    assert cfg.targets == ("onnx", "ort") and cfg.batch_sizes == (1, 32, 8)


def test_reports_never_hold_nan(tmp_path):
    """report.json is written with allow_nan=False: a NaN anywhere is refused, not written as invalid JSON."""
    from dfmpc_deploy.io.atomic import atomic_write_json

    with pytest.raises(ValueError):
        atomic_write_json(tmp_path / "r.json", {"x": float("nan")})
    assert not (tmp_path / "r.json").exists()
