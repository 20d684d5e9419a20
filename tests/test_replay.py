"""dfmpc_deploy.replay: ``build --from-report`` rebuilds model.dfmpc bit for bit, and refuses what it cannot replay."""
from __future__ import annotations

import dataclasses
import json
import shutil

import pytest

from dfmpc_deploy.cli import main
from dfmpc_deploy.errors import DfmpcError
from dfmpc_deploy.replay import check_replayed, config_from_report, settings_from_passes
from dfmpc_deploy.report.files import read_report
from dfmpc_deploy.report.model import PassRecord
from dfmpc_deploy.zoo.models import file_sha256
from tests.conftest import R20_WEIGHTS, needs_shared

R20 = "resnet20_cifar10_optA"
FAST = ("--synth-samples", "4", "--synth-steps", "3")


def _run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def _build(capsys, out, *flags):
    code, _, err = _run(capsys, "build", R20, *flags, "--out", str(out), "-q")
    assert code == 0, err
    return out


@pytest.fixture(scope="module")
def random_build(tmp_path_factory):
    out = tmp_path_factory.mktemp("replay") / "a"
    assert main(["build", R20, "--weights", "random", *FAST, "--seed", "3", "--out", str(out), "-q"]) == 0
    return out


@pytest.mark.parametrize("method", ["dfmpc", "zeroq", "rtn"])
def test_tiny_model_is_rebuilt_bit_for_bit(capsys, tmp_path, method):
    """Seeded random weights; zeroq pins three fields, rtn runs one pass: replay is driven by the recorded recipe."""
    a = _build(capsys, tmp_path / "a", "--weights", "random", "--method", method, *FAST, "--seed", "5")
    code, _, err = _run(capsys, "build", "--from-report", str(a / "report.json"), "--out", str(tmp_path / "b"), "-q")
    assert code == 0 and "warning" not in err, err
    assert (tmp_path / "b" / "model.dfmpc").read_bytes() == (a / "model.dfmpc").read_bytes()
    first, again = read_report(a), read_report(tmp_path / "b")
    assert again.recipe.passes == tuple(
        PassRecord(name=p.name, config=p.config, seconds=q.seconds, info=q.info)
        for p, q in zip(first.recipe.passes, again.recipe.passes))
    assert again.build.options == first.build.options | {"threads": first.runtime.threads, "device": "cpu"}


@pytest.mark.parametrize("grid", ["int", "dorefa"])
def test_replay_records_and_rebuilds_the_grid(capsys, tmp_path, grid):
    a = _build(capsys, tmp_path / "a", "--weights", "random", "--method", "rtn", "--bits", "3/6", "--grid", grid)
    rep = read_report(a)
    assert rep.recipe.passes[0].config["grid"] == grid and rep.bits.grid == grid
    assert rep.bits.display() == f"3/6 {'int' if grid == 'int' else 'DoReFa'}"
    assert config_from_report(a / "report.json")[0].settings["grid"] == grid
    code, _, err = _run(capsys, "build", "--from-report", str(a / "report.json"), "--out", str(tmp_path / "b"), "-q")
    assert code == 0, err
    assert (tmp_path / "b" / "model.dfmpc").read_bytes() == (a / "model.dfmpc").read_bytes()
    assert read_report(tmp_path / "b").bits.grid == grid


@needs_shared
@pytest.mark.slow
def test_resnet20_real_weights_rebuilt_bit_for_bit_and_changed_weights_refused(capsys, tmp_path):
    weights = tmp_path / "r20.th"
    shutil.copyfile(R20_WEIGHTS, weights)
    a = _build(capsys, tmp_path / "a", "--weights", str(weights), "--synth-samples", "8", "--synth-steps", "10")
    rep = json.loads((a / "report.json").read_text())
    assert rep["build"]["weights_sha256"] == file_sha256(R20_WEIGHTS)
    assert rep["build"]["weights_path"] == str(weights.resolve())
    code, _, err = _run(capsys, "build", "--from-report", str(a / "report.json"), "--out", str(tmp_path / "b"), "-q")
    assert code == 0, err
    assert (tmp_path / "b" / "model.dfmpc").read_bytes() == (a / "model.dfmpc").read_bytes()

    with open(weights, "ab") as fh:  # the weights file changes after the build
        fh.write(b"\0")
    code, stdout, err = _run(capsys, "build", "--from-report", str(a / "report.json"), "--out", str(tmp_path / "c"))
    assert code == 1 and stdout == "" and "Traceback" not in err
    assert err.count("\n") == 1 and "changed since the build (SHA-256" in err and str(weights.resolve()) in err
    assert not (tmp_path / "c").exists()
    weights.unlink()
    code, _, err = _run(capsys, "build", "--from-report", str(a / "report.json"), "--out", str(tmp_path / "c"))
    assert code == 1 and "is gone; put it back" in err and err.count("\n") == 1


def test_report_without_build_settings_is_refused(random_build, tmp_path, capsys):
    rep = json.loads((random_build / "report.json").read_text())
    del rep["build"]
    (tmp_path / "old.json").write_text(json.dumps(rep))
    code, _, err = _run(capsys, "build", "--from-report", str(tmp_path / "old.json"), "--out", str(tmp_path / "o"))
    assert code == 1 and "records no build settings" in err and err.count("\n") == 1
    assert not (tmp_path / "o").exists()


def _pass(report: dict, name: str) -> dict:
    """The recorded pass called ``name`` in a report's JSON."""
    return next(p for p in report["recipe"]["passes"] if p["name"] == name)


@pytest.mark.parametrize("edit, msg", [
    (lambda r: r["recipe"]["passes"].pop(1), "cannot be rebuilt with this version"),
    (lambda r: r["recipe"]["passes"].insert(0, {"name": "newpass", "config": {}, "seconds": 0, "info": {}}),
     "ran the passes newpass -> equalize_rows -> quantize"),
    (lambda r: r["build"]["options"].update(shiny_new_option=1), "option(s) shiny_new_option"),
    (lambda r: r.update(weights="module"), "built from an nn.Module"),
    (lambda r: r["build"]["options"].update(seed="abc"), "recorded option --seed 'abc' is invalid"),
    (lambda r: r["build"]["options"].update(limit=[1, 2]), "recorded option --limit"),
    (lambda r: r["build"]["options"].update(weights_format="onnx"), "recorded option --weights-format 'onnx'"),
    (lambda r: r["build"]["options"].update(compress="yes"), "expected true or false"),
    (lambda r: [p["config"].update(bits=5) for p in r["recipe"]["passes"] if "bits" in p["config"]],
     "recorded pass configuration is invalid"),
    (lambda r: _pass(r, "calibrate")["config"].update(synth_lr=-1), "recorded pass configuration is invalid"),
    (lambda r: _pass(r, "quantize")["config"].update(bits=5), "recorded different values of bits"),
])
def test_what_cannot_be_replayed_is_one_line(random_build, tmp_path, capsys, edit, msg):
    rep = json.loads((random_build / "report.json").read_text())
    edit(rep)
    (tmp_path / "r.json").write_text(json.dumps(rep))
    code, _, err = _run(capsys, "build", "--from-report", str(tmp_path / "r.json"), "--out", str(tmp_path / "o"))
    assert code == 1 and msg in err and err.count("\n") == 1 and "Traceback" not in err, err
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("argv, msg", [
    (("build", R20, "--from-report", "{r}"), f"drop {R20}"),
    (("build", "--from-report", "{r}", "--bits", "3/6"), "drop --bits"),
    (("build", "--from-report", "{r}", "--seed", "1", "--threads", "2"), "drop --seed --threads"),
    (("build",), "give a MODEL name"),
])
def test_from_report_flag_misuse_is_a_usage_error(random_build, tmp_path, capsys, argv, msg):
    args = [a.format(r=random_build / "report.json") for a in argv]
    code, _, err = _run(capsys, *args, "--out", str(tmp_path / "o"))
    assert code == 2 and msg in err and "Traceback" not in err, err


def test_settings_come_from_the_recorded_configs_not_pass_names():
    passes = (PassRecord(name="quantize", config={"bits": "3/6", "per_channel": True}, seconds=0.1, info={}),
              PassRecord(name="calibrate", config={"recal": "synthetic", "synth_samples": 8, "synth_steps": None,
                                                   "synth_lr": 0.25}, seconds=0.1, info={}),
              PassRecord(name="recalibrate", config={"rounding": "nearest", "recal_scope": "all",
                                                     "rounding_scope": "low", "grid_search": True, "max_k": 4608,
                                                     "hessian_rows": None}, seconds=0.1, info={}))
    settings = settings_from_passes("zeroq", passes)
    # a quantize pass recorded without a grid ran before --grid existed: on DoReFa, the only grid then
    assert settings == {"bits": "3/6", "per_channel": True, "grid": "dorefa", "synth_samples": 8, "synth_steps": None,
                        "synth_lr": 0.25, "rounding_scope": "low", "grid_search": True, "max_k": 4608,
                        "hessian_rows": None}
    recorded = (PassRecord(name="quantize", config={**passes[0].config, "grid": "int"}, seconds=0.1, info={}),
                *passes[1:])
    assert settings_from_passes("zeroq", recorded)["grid"] == "int"
    pinned_differently = (passes[0], passes[1], PassRecord(name="recalibrate", config={
        **passes[2].config, "rounding": "gptq"}, seconds=0.1, info={}))
    with pytest.raises(DfmpcError, match="ran with rounding='gptq' but recipe zeroq now pins 'nearest'"):
        settings_from_passes("zeroq", pinned_differently)


def test_a_pass_that_ran_differently_fails_the_replay(random_build):
    recorded = read_report(random_build)
    passes = list(recorded.recipe.passes)
    i = next(k for k, p in enumerate(passes) if p.name == "quantize")
    passes[i] = PassRecord(name=passes[i].name, config={**passes[i].config, "bits": "3/6"}, seconds=0, info={})
    changed = dataclasses.replace(recorded, recipe=dataclasses.replace(recorded.recipe, passes=tuple(passes)))
    check_replayed(recorded, recorded)
    with pytest.raises(DfmpcError, match=r"ran pass quantize with bits='2/6', the report records '3/6'"):
        check_replayed(changed, recorded)


def test_config_uses_the_recorded_threads_and_absolute_paths(random_build, tmp_path):
    cfg, rep = config_from_report(random_build / "report.json", tmp_path / "o")
    assert cfg.threads == rep.runtime.threads and cfg.device == "cpu" and cfg.seed == 3 and cfg.weights == "random"
    assert cfg.out == tmp_path / "o" and cfg.settings["synth_samples"] == 4
