"""`dfmpc-deploy sweep` in-process: exit codes, one-line errors, --list, the summary line."""
import json
import subprocess
import sys

import pytest

from dfmpc_deploy.cli import main
from dfmpc_deploy.io.outdir import locked_dir
from tests.sweep.helpers import R20, write_grid

RANDOM = {"name": R20, "weights": "random"}


def _run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_help_has_an_example(capsys):
    code, out, _ = _run(capsys, "sweep", "--help")
    assert code == 0 and "example" in out and "--engine" in out and "[[model]]" in out


def test_the_command_line_does_not_import_ray():
    code = "import sys; from dfmpc_deploy.cli import _parser; _parser(); print('ray' in sys.modules)"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.stdout.strip() == "False", r.stderr


def test_list_shows_pending_cells_and_creates_nothing(capsys, tmp_path):
    grid = write_grid(tmp_path / "g.toml", [RANDOM], {"method": ["rtn", "dfq"], "seed": [0, 1]})
    code, out, _ = _run(capsys, "sweep", grid, "--out", tmp_path / "s", "--list")
    assert code == 0 and "4 cells: 0 done, 0 failed, 4 pending" in out and "method=dfq seed=1" in out
    assert not (tmp_path / "s").exists()
    code, out, _ = _run(capsys, "sweep", grid, "--out", tmp_path / "s", "--list", "--json")
    assert code == 0 and [c["status"] for c in json.loads(out)] == ["pending"] * 4


@pytest.mark.parametrize(("argv", "code", "needle"), [
    (["--engine", "local", "--address", "h:6379"], 2, "--address joins a Ray cluster: use it with --engine ray"),
    (["--max-parallel", "0"], 2, "--max-parallel"),
    (["--engine", "spark"], 2, "invalid choice: 'spark'"),
])
def test_usage_errors(capsys, tmp_path, argv, code, needle):
    grid = write_grid(tmp_path / "g.toml", [RANDOM], {"seed": [0]})
    got, _, err = _run(capsys, "sweep", grid, "--out", tmp_path / "s", *argv)
    assert got == code and needle in err and "Traceback" not in err and not (tmp_path / "s").exists()


def test_a_bad_grid_is_one_line_and_nothing_is_created(capsys, tmp_path):
    grid = write_grid(tmp_path / "g.toml", [RANDOM], {"seed": []})
    code, _, err = _run(capsys, "sweep", grid, "--out", tmp_path / "s")
    assert code == 1 and err.strip() == "error: g.toml [grid] seed = []: empty axis: give at least one value"
    assert not (tmp_path / "s").exists()


def test_a_folder_that_is_not_a_sweep_is_refused(capsys, tmp_path):
    grid = write_grid(tmp_path / "g.toml", [RANDOM], {"seed": [0]})
    (tmp_path / "s").mkdir()
    (tmp_path / "s" / "notes.txt").write_text("mine")
    code, _, err = _run(capsys, "sweep", grid, "--out", tmp_path / "s")
    assert code == 1 and "holds no results.sqlite" in err and sorted(p.name for p in (tmp_path / "s").iterdir()) == [
        "notes.txt"]


def test_a_folder_in_use_is_refused(capsys, tmp_path):
    grid = write_grid(tmp_path / "g.toml", [RANDOM], {"seed": [0]})
    with locked_dir(tmp_path / "s"):
        code, _, err = _run(capsys, "sweep", grid, "--out", tmp_path / "s")
    assert code == 1 and "is in use by another dfmpc-deploy" in err


def test_exit_status_says_whether_a_cell_failed(capsys, tmp_path):
    grid = write_grid(tmp_path / "g.toml", [RANDOM, {"name": R20, "weights": str(tmp_path / "gone.th")}],
                      {"method": ["rtn"]})
    code, out, err = _run(capsys, "sweep", grid, "--out", tmp_path / "s", "--max-parallel", "2")
    assert code == 1
    assert "2 cells: 1 done (1 this run, 0 already done), 1 failed, 0 pending" in out
    assert "failed (resnet20_cifar10_optA method=rtn): weights file" in err and "gone.th" in err
    code, out, _ = _run(capsys, "sweep", grid, "--out", tmp_path / "s", "--list")
    assert code == 0 and "1 done, 1 failed" in out and "error: weights file" in out


def test_an_address_where_nothing_listens_is_one_line_at_once(capsys, tmp_path):
    pytest.importorskip("ray", reason="ray is not installed (pip install 'dfmpc-deploy[sweep]')")
    import socket

    with socket.socket() as s:  # a port that was free a moment ago: nothing listens there now
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    grid = write_grid(tmp_path / "g.toml", [RANDOM], {"seed": [0]})
    code, _, err = _run(capsys, "sweep", grid, "--out", tmp_path / "s", "--engine", "ray", "--address",
                        f"127.0.0.1:{port}")
    assert code == 1 and f"--address 127.0.0.1:{port}: nothing answers there" in err and "Traceback" not in err
    code, out, _ = _run(capsys, "sweep", grid, "--out", tmp_path / "s", "--list")
    assert "1 pending" in out  # the store was made, nothing ran
