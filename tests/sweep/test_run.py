"""Real sweeps of the real ResNet-20 on the local process pool and on a real local Ray cluster: every cell a real
build into DIR/cells/<id>/, a failing cell recorded while the others finish, re-runs that touch no finished cell, a
grown grid that runs only its new cells, and Ctrl-C that leaves the store consistent."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from dfmpc_deploy.report import read_report
from dfmpc_deploy.sweep import Store, load_grid, make_engine, run_sweep
from tests.conftest import needs_shared
from tests.sweep.helpers import R20, missing_weights, r20, tree_state, write_grid

pytestmark = [needs_shared, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]


def _grid(tmp: Path, methods=("rtn", "dfmpc")) -> Path:
    return write_grid(tmp / "grid.toml", [r20(), missing_weights(tmp)], {"method": list(methods)},
                      {"synth_steps": 2})


@pytest.fixture(scope="module", params=["local", "ray"])
def swept(request, tmp_path_factory):
    """One sweep per engine (2 real builds + 2 cells whose weights are missing), 2 cells at once."""
    if request.param == "ray":
        pytest.importorskip("ray", reason="ray is not installed (pip install 'dfmpc-deploy[sweep]')")
    tmp = tmp_path_factory.mktemp(request.param)
    grid = load_grid(_grid(tmp))
    out = tmp / "sweep"
    first = run_sweep(grid, out, make_engine(request.param, max_parallel=2))
    return SimpleNamespace(engine=request.param, tmp=tmp, grid=grid, out=out, first=first)


def _rows(out: Path):
    with Store(out / "results.sqlite", create=False) as s:
        return {r.id: r for r in s.rows()}


def test_every_cell_is_a_build_and_a_bad_cell_fails_alone(swept):
    res, out = swept.first, swept.out
    assert (res.cells, res.done, res.failed, res.pending) == (4, 2, 2, 0) and len(res.ran) == 4
    rows = _rows(out)
    assert set(rows) == {c.id for c in swept.grid.cells}
    for c in swept.grid.cells:
        row = rows[c.id]
        if c.settings["weights"].endswith("no-such-weights.th"):
            assert row.status == "failed" and "no-such-weights.th" in row.error and "does not exist" in row.error
            assert "\n" not in row.error and row.detail is None and not (out / "cells" / c.id).exists()
            continue
        rep = read_report(out / "cells" / c.id)  # the report `build` writes, typed
        assert row.status == "done" and row.engine == swept.engine and rep.method == c.settings["method"]
        key = "quantized_uncompensated" if rep.method == "rtn" else rep.method
        assert row.top1 == rep.accuracy.results[key].top1 and rep.accuracy.n == row.images == 20
        assert row.top1_variants["fp32"] == rep.accuracy.results["fp32"].top1 > 50
        assert row.size_bytes == (out / "cells" / c.id / "model.dfmpc").stat().st_size == rep.size_bytes.packed.packed
        assert row.seconds > 0 and rep.runtime.threads == 1  # the cell's one CPU
    assert not [p for p in (out / "cells").iterdir() if p.name.startswith(".")]  # no partial or lock leftovers


def test_sweep_json_and_html(swept):
    doc = json.loads((swept.out / "sweep.json").read_text())
    assert doc["engine"] == swept.engine and len(doc["cells"]) == 4
    assert all(set(c) == {"id", "settings", "status", "top1", "size_bytes", "seconds", "error"} for c in doc["cells"])
    assert sorted(c["status"] for c in doc["cells"]) == ["done", "done", "failed", "failed"]
    page = (swept.out / "sweep.html").read_text()
    assert page.count("<svg") == 1 and "Pareto frontier" in page and page.count("<tr>") == 1 + 4
    assert "no-such-weights.th" in page and "http" not in page.replace("http://www.w3.org/2000/svg", "")


def test_rerun_touches_no_finished_cell(swept):
    before = tree_state(swept.out / "cells")
    rows_before = _rows(swept.out)
    again = run_sweep(swept.grid, swept.out, make_engine(swept.engine, max_parallel=2))
    failed = {i for i, r in rows_before.items() if r.status == "failed"}
    assert set(again.ran) == failed and again.skipped == 2 and (again.done, again.failed) == (2, 2)
    assert tree_state(swept.out / "cells") == before
    rows = _rows(swept.out)
    for i, r in rows.items():
        assert (r.runs, r.finished) == ((2, r.finished) if i in failed else (1, rows_before[i].finished))


def test_a_grown_grid_runs_only_its_new_cells(swept):
    if swept.engine != "local":
        pytest.skip("the driver is the same for both engines; the local one is enough here")
    before = tree_state(swept.out / "cells")
    grown = load_grid(_grid(swept.tmp, methods=("rtn", "dfmpc", "dfq")))
    new = {c.id for c in grown.cells} - {c.id for c in swept.grid.cells}
    assert len(new) == 2
    failed_before = {i for i, r in _rows(swept.out).items() if r.status == "failed"}
    res = run_sweep(grown, swept.out, make_engine("local", max_parallel=2))
    assert set(res.ran) == new | failed_before and res.cells == 6 and (res.done, res.failed) == (3, 3)
    after = tree_state(swept.out / "cells")
    assert {k: v for k, v in after.items() if k in before} == before


def test_a_cell_is_the_same_build_as_the_build_command(swept, tmp_path):
    if swept.engine != "local":
        pytest.skip("one comparison is enough")
    cell = next(c for c in swept.grid.cells if c.settings["method"] == "rtn" and "no-such" not in c.settings["weights"])
    s = cell.settings
    out = tmp_path / "b"
    r = subprocess.run([sys.executable, "-m", "dfmpc_deploy", "build", R20, "--weights", s["weights"], "--data",
                        s["data"], "--limit", "20", "--method", "rtn", "--synth-steps", "2", "--threads", "1",
                        "--out", str(out), "--quiet"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    built, swept_rep = read_report(out), read_report(swept.out / "cells" / cell.id)
    assert built.accuracy == swept_rep.accuracy and built.size_bytes == swept_rep.size_bytes
    assert built.layers == swept_rep.layers and built.recipe.passes[0].config == swept_rep.recipe.passes[0].config
    assert (out / "model.dfmpc").read_bytes() == (swept.out / "cells" / cell.id / "model.dfmpc").read_bytes()


def test_ctrl_c_stops_cleanly_and_the_next_run_goes_on(tmp_path):
    """SIGINT to the driver while a cell runs: exit 130, finished cells kept, the running one pending, its
    half-written folder removed; the same command then runs only what is left."""
    grid = write_grid(tmp_path / "grid.toml", [{"name": R20, "weights": "random"}], {"method": ["rtn", "dfmpc"]},
                      {"synth_steps": 10, "threads": 1})  # a quick cell, then one that is still running
    out = tmp_path / "sweep"
    cmd = [sys.executable, "-m", "dfmpc_deploy", "sweep", str(grid), "--out", str(out), "--max-parallel", "1"]
    # Ctrl-C reaches a sweep whose SIGINT is not ignored (a test run started with `&` or nohup would pass SIG_IGN on)
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and proc.poll() is None:
            if (out / "results.sqlite").is_file():
                try:
                    if "done" in _statuses(out).values():
                        break
                except Exception:  # the store is still being created
                    pass
            time.sleep(0.05)
        assert proc.poll() is None, "the sweep ended before it could be interrupted"
        os.kill(proc.pid, signal.SIGINT)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, err
    assert "interrupted (SIGINT)" in err and "Traceback" not in err
    statuses = _statuses(out)
    assert sorted(statuses.values()) == ["done", "pending"]
    assert not [p.name for p in (out / "cells").iterdir() if p.name.startswith(".")], "partial folder left"
    assert sorted(c["status"] for c in json.loads((out / "sweep.json").read_text())["cells"]) == sorted(
        statuses.values())
    done_before = tree_state(out / "cells")
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert set(_statuses(out).values()) == {"done"}
    after = tree_state(out / "cells")
    assert {k: v for k, v in after.items() if k in done_before} == done_before


def _statuses(out: Path) -> dict[str, str]:
    with Store(out / "results.sqlite", create=False) as s:
        return s.statuses()
