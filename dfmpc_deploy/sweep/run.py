"""The sweep driver: plan the cells, run the ones not done on an engine, record each outcome, write the pages.

``DIR`` (``sweep --out``) is kept between runs and added to in place, under the same lock a build takes for its
``--out`` (so two sweeps, or a sweep and a build, never write it at once)::

    DIR/results.sqlite       the one store (dfmpc_deploy.sweep.store), written here only
    DIR/sweep.json           {"engine": ..., "cells": [{"id", "settings", "status", "top1", "size_bytes", "seconds",
                             "error"}]}, rewritten (atomically) after every finished cell
    DIR/sweep.html           the page (dfmpc_deploy.sweep.html), rewritten with it
    DIR/cells/<cell id>/     each cell's build: report.json, report.md, report.html, model.dfmpc

A re-run runs only the grid's cells that are not ``done`` (and a ``done`` cell whose ``report.json`` is gone);
a changed grid adds its new cells and keeps every row already there. On Ctrl-C (or SIGTERM) the running cells are
stopped and stay ``pending`` (their half-written folders are removed), the finished ones stay recorded, the pages
are written, and :class:`KeyboardInterrupt` goes on to the caller.
"""
from __future__ import annotations

import logging
import os
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import DfmpcError
from ..io.atomic import atomic_write_json, atomic_write_text
from ..io.outdir import locked_dir
from .cell import CellTask
from .engines import Engine
from .grid import Cell, Grid
from .html import render_sweep_html
from .store import Row, Store

__all__ = ["run_sweep", "SweepResult", "write_pages", "cell_rows", "STORE_NAME"]

log = logging.getLogger("dfmpc_deploy")

STORE_NAME = "results.sqlite"


@dataclass
class SweepResult:
    """What one run of a sweep did.

    Attributes:
        cells: the grid's cells.
        skipped: cells already done before this run.
        ran: cells run this time, in the order they finished; ran_failed: how many of them failed.
        done, failed, pending: the grid's cells by status after the run.
        seconds: the driver's wall time from the first submission to the last outcome (0 when nothing ran).
        engine_start_seconds: time the engine took to start (a local Ray cluster's ``ray.init``).
        latency: per cell run, seconds from submission to its outcome reaching the driver.
        cell_seconds: per cell run, its own wall time on the worker.
        interrupted: Ctrl-C / SIGTERM stopped the run.
    """

    cells: int = 0
    skipped: int = 0
    ran: list[str] = field(default_factory=list)
    ran_failed: int = 0
    done: int = 0
    failed: int = 0
    pending: int = 0
    seconds: float = 0.0
    engine_start_seconds: float = 0.0
    latency: dict[str, float] = field(default_factory=dict)
    cell_seconds: dict[str, float] = field(default_factory=dict)
    interrupted: bool = False


def _prepare(out: Path) -> None:
    """Create ``out`` or check that it is a sweep folder (empty, or holding a results store)."""
    if out.is_symlink() or (out.exists() and not out.is_dir()):
        raise DfmpcError(f"--out '{out}' exists and is not a directory; choose a folder for the sweep")
    if out.is_dir():
        if not (out / STORE_NAME).is_file() and any(out.iterdir()):
            raise DfmpcError(f"--out '{out}' is not empty and holds no {STORE_NAME}; choose a new folder (a sweep "
                             "adds to its own folder only)")
        return
    try:
        out.mkdir()
    except FileNotFoundError:
        raise DfmpcError(f"--out '{out}': its parent directory does not exist; create it first "
                         f"(mkdir -p {out.parent})") from None
    except OSError as err:
        raise DfmpcError(f"--out '{out}' cannot be created ({err.strerror}); choose another folder") from None


def write_pages(out: Path, store: Store, engine: str) -> list[Row]:
    """Write ``out/sweep.json`` and ``out/sweep.html`` (atomically) from the store; return its rows."""

    rows = store.rows()
    atomic_write_json(out / "sweep.json", {"engine": engine, "cells": [r.to_json() for r in rows]})
    atomic_write_text(out / "sweep.html", render_sweep_html(rows, engine, f"dfmpc-deploy sweep: {out.name}"))
    return rows


def cell_rows(grid: Grid, out: Path) -> list[tuple[Cell, Row | None]]:
    """The grid's cells with their rows in ``out``'s store (None: not in it yet); reads only, takes no lock."""
    path = Path(out) / STORE_NAME
    if not path.is_file():
        return [(c, None) for c in grid.cells]
    with Store(path, create=False) as store:
        rows = {r.id: r for r in store.rows()}
    return [(c, rows.get(c.id)) for c in grid.cells]


def run_sweep(grid: Grid, out: str | os.PathLike, engine: Engine, progress=None,
              say: Callable[[str], None] | None = None) -> SweepResult:
    """Run the cells of ``grid`` that are not done into ``out`` on ``engine``.

    Args:
        grid: the validated grid (:func:`dfmpc_deploy.sweep.grid.load_grid`).
        out: the sweep folder (created if missing; its parent must exist).
        engine: a :class:`~dfmpc_deploy.sweep.engines.Engine` (not started: started here when a cell must run).
        progress: a :class:`~dfmpc_deploy.core.progress.Progress` for the progress row, or None.
        say: receives one line per failed cell (and per notice), e.g. ``print`` to stderr.

    Returns:
        What the run did (:class:`SweepResult`).

    Raises:
        DfmpcError: ``out`` cannot be used or is locked by another run.
        KeyboardInterrupt: after a clean stop (see the module docstring).
    """

    say = say or (lambda m: log.warning("%s", m))
    out = Path(out)
    _prepare(out)
    result = SweepResult(cells=len(grid.cells))
    with locked_dir(out) as out, Store(out / STORE_NAME) as store:
        store.add((c.id, c.model, c.settings) for c in grid.cells)
        status = store.statuses()
        gone = [c.id for c in grid.cells if status[c.id] == "done" and not (out / "cells" / c.id /
                                                                               "report.json").is_file()]
        if gone:
            say(f"{len(gone)} done cell(s) have no report.json any more and run again: {', '.join(gone)}")
            store.set_pending(gone)
            status.update(dict.fromkeys(gone, "pending"))
        todo = [c for c in grid.cells if status[c.id] != "done"]
        result.skipped = len(grid.cells) - len(todo)
        store.set_meta("engine", engine.name)
        (out / "cells").mkdir(exist_ok=True)
        try:
            if todo:
                _drive(todo, out, store, engine, progress, say, result)
        except KeyboardInterrupt:
            result.interrupted = True
            raise
        finally:
            write_pages(out, store, engine.name)
            final = store.statuses()
            for c in grid.cells:
                s = final[c.id]
                result.done += s == "done"
                result.failed += s == "failed"
                result.pending += s == "pending"
    return result


def _drive(todo: list[Cell], out: Path, store: Store, engine: Engine, progress, say: Callable[[str], None],
           result: SweepResult) -> None:
    update = progress.task(f"sweep ({engine.name})") if progress is not None else (lambda *a: None)
    queue = deque(todo)
    running: dict[str, tuple[Cell, float]] = {}
    t0 = time.perf_counter()
    cancel = True
    try:
        slots = engine.start(max(c.cpus for c in todo))
        result.engine_start_seconds = time.perf_counter() - t0
        t0 = time.perf_counter()
        update(0, len(todo), f"running 0, failed 0, {slots} at once")
        while queue or running:
            while queue and len(running) < slots:
                c = queue.popleft()
                engine.submit(CellTask(c.id, dict(c.settings), str(out / "cells" / c.id), c.cpus, c.gpus))
                running[c.id] = (c, time.perf_counter())
            for cid, outcome in engine.wait(0.5):
                c, sent = running.pop(cid)
                result.latency[cid] = time.perf_counter() - sent
                result.cell_seconds[cid] = float(outcome.get("seconds") or 0.0)
                if store.finish(cid, outcome, engine.name) == "failed":
                    result.ran_failed += 1
                    say(f"cell {cid} failed ({c.model} {c.label()}): {outcome.get('error')}")
                result.ran.append(cid)
                write_pages(out, store, engine.name)
            update(len(result.ran), len(todo), f"running {len(running)}, failed {result.ran_failed}")
        cancel = False
    finally:
        result.seconds = time.perf_counter() - t0
        engine.close(cancel=cancel)
