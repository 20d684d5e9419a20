"""The engines on their own: a worker that dies fails only its cell, the next cell gets a fresh worker."""
import os
import signal

import pytest

from dfmpc_deploy.errors import MissingDependencyError
from dfmpc_deploy.sweep import engines as engines_mod
from dfmpc_deploy.sweep.cell import CellTask
from dfmpc_deploy.sweep.engines import LocalEngine, RayEngine, available_cpus, make_engine
from tests.sweep.helpers import R20

FAST = {"model": R20, "weights": "random", "method": "rtn"}


def _wait_all(engine, n, timeout=240.0):
    got = []
    for _ in range(int(timeout / 0.5)):
        got += engine.wait(0.5)
        if len(got) >= n:
            break
    return dict(got)


def test_a_killed_worker_fails_its_cell_only(tmp_path):
    engine = LocalEngine(max_parallel=1)
    assert engine.start(cpus_per_cell=1) == 1
    try:
        engine.submit(CellTask("a", FAST, str(tmp_path / "a")))
        os.kill(engine._workers[0].process.pid, signal.SIGKILL)
        out = _wait_all(engine, 1)
        assert out["a"]["ok"] is False and "killed by SIGKILL" in out["a"]["error"]
        engine.submit(CellTask("b", FAST, str(tmp_path / "b")))  # a fresh worker
        out = _wait_all(engine, 1)
        assert out["b"]["ok"] is True and (tmp_path / "b" / "report.json").is_file() and out["b"]["top1"] is None
        assert len(engine._workers) == 1 and engine._workers[0].alive()
    finally:
        engine.close()
    assert not engine._workers


def test_user_errors_and_bugs_in_a_cell_are_outcomes_not_exceptions(tmp_path):
    """An unknown model (a user error: its one line) and settings without a model (a bug: the type, the message
    and the traceback) both come back as failed outcomes; the worker lives on."""
    engine = LocalEngine(max_parallel=1)
    engine.start(1)
    try:
        engine.submit(CellTask("x", {"model": "no_such_model", "weights": "random"}, str(tmp_path / "x")))
        user = _wait_all(engine, 1)["x"]
        engine.submit(CellTask("y", {"weights": "random"}, str(tmp_path / "y")))
        bug = _wait_all(engine, 1)["y"]
        assert len(engine._workers) == 1
    finally:
        engine.close()
    assert user["ok"] is False and "unknown model 'no_such_model'" in user["error"] and user["detail"] is None
    assert bug["ok"] is False and bug["error"] == "KeyError: 'model'" and "Traceback" in bug["detail"]


def test_default_slots_follow_the_cpus_a_cell_declares():
    n = available_cpus()
    assert LocalEngine().start(cpus_per_cell=1) == n
    assert LocalEngine().start(cpus_per_cell=n + 1) == 1
    assert LocalEngine(max_parallel=3).start(cpus_per_cell=1) == 3
    assert isinstance(make_engine("ray", "h:1", 2), RayEngine) and isinstance(make_engine("local"), LocalEngine)


def test_ray_missing_names_the_extra(monkeypatch):
    import importlib

    real = importlib.import_module

    def no_ray(name, *a, **kw):
        if name == "ray":
            raise ImportError("No module named 'ray'")
        return real(name, *a, **kw)

    monkeypatch.setattr(importlib, "import_module", no_ray)
    with pytest.raises(MissingDependencyError, match=r"dfmpc-deploy\[sweep\]"):
        RayEngine().start(1)
    assert engines_mod.ENGINES == ("local", "ray")
